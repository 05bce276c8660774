"""Multi-task labels: which model outputs the step fits, the weighted loss, per-task metrics.

A batch's labels are [B] (one task) or [B, T] (column t is task t; the synthetic stream with
``conversion=True`` gives (click, conversion)). A run fits ``len(task_weights)`` tasks: output t
of the model against label column t, loss = sum_t w_t * mean BCE_t. Without task weights it
fits one task, output 0 against the labels or their first column, exactly as a single-task
run always did, so single-task models read a multi-label stream unchanged.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.train import metrics

# Names of label columns in the summary: task 0 keeps the unsuffixed keys (test_auc, ...).
TASK_NAMES = ("click", "conversion")


def num_tasks(task_weights: Sequence[float] | None) -> int:
  return len(task_weights) if task_weights else 1


def task_logits(logits, n: int):
  """Model logits [B, outputs] -> what the step fits: [B] for one task, else [B, n]."""
  if logits.shape[1] < n:
    raise ValueError(f"the model has {logits.shape[1]} output(s) but the run fits {n} tasks "
                     "(config.model.task_weights); give the model num_tasks outputs")
  return logits[:, 0] if n == 1 else logits[:, :n]


def task_loss(logits, labels, task_weights: Sequence[float] | None):
  """sum_t w_t * mean_b BCE(logits[b, t], labels[b, t]); logits from ``task_logits``."""
  n = num_tasks(task_weights)
  if n == 1:
    y = labels[:, 0] if labels.ndim == 2 else labels
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()
  if labels.ndim != 2 or labels.shape[1] < n:
    raise ValueError(f"config.model.task_weights names {n} tasks but the batch's labels have "
                     f"shape {tuple(labels.shape)}; enable the stream's extra labels "
                     "(e.g. --config.data.synthetic.conversion=True)")
  per_task = optax.sigmoid_binary_cross_entropy(logits, labels[:, :n]).mean(0)
  return jnp.dot(per_task, jnp.asarray(task_weights, jnp.float32))


def task_name(t: int) -> str:
  return TASK_NAMES[t] if t < len(TASK_NAMES) else f"task{t}"


def summary(labels: np.ndarray, preds: np.ndarray, teacher: np.ndarray | None) -> dict:
  """AUC and logloss of the predictions and of the teacher (the Bayes-optimal scorer), per task.

  labels/teacher [N] or [N, T]; preds [N] or [N, n]. Task 0's figures keep the plain keys
  (test_auc, bayes_auc, ...); task t > 0 adds them suffixed with its name, e.g.
  test_auc_conversion, for every task the run predicts. Without a teacher (real data) the
  Bayes figures are None.
  """
  as_2d = lambda x: x[:, None] if x.ndim == 1 else x
  labels, preds = as_2d(labels), as_2d(preds)
  teacher = None if teacher is None else as_2d(teacher)
  out = {}
  for t in range(preds.shape[1]):
    y, p = labels[:, t], preds[:, t]
    q = None if teacher is None else teacher[:, t]
    suffix = "" if t == 0 else f"_{task_name(t)}"
    out.update({
        f"test_auc{suffix}": metrics.auc(y, p),
        f"test_logloss{suffix}": metrics.logloss(y, p),
        f"bayes_auc{suffix}": None if q is None else metrics.auc(y, q),
        f"bayes_logloss{suffix}": None if q is None else metrics.logloss(y, q),
        f"constant_logloss{suffix}": metrics.logloss(y, np.full_like(p, y.mean())),
    })
  return out
