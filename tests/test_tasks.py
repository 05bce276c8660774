"""Multi-task losses and summaries (jaxrec/train/tasks.py) against numpy written the plain way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.train import metrics, tasks


def _bce(logits, y):
  p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def _data(b=64, outputs=3, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, outputs)).astype(np.float32)
  labels = (rng.random((b, 2)) < 0.4).astype(np.float32)
  return logits, labels


def test_single_task_fits_output_0_against_the_labels_or_their_first_column():
  logits, labels = _data()
  fit = tasks.task_logits(jnp.asarray(logits), 1)
  assert fit.shape == (64,)
  want = _bce(logits[:, 0], labels[:, 0])
  for y in (labels[:, 0], labels):          # [B] or [B, 2]: column 0 either way
    np.testing.assert_allclose(float(tasks.task_loss(fit, jnp.asarray(y), None)), want, rtol=1e-5)


def test_weighted_sum_over_tasks():
  logits, labels = _data()
  w = (1.0, 0.25)
  fit = jax.jit(lambda x: tasks.task_logits(x, 2))(logits)
  assert fit.shape == (64, 2)
  got = jax.jit(lambda x, y: tasks.task_loss(x, y, w))(fit, labels)
  want = w[0] * _bce(logits[:, 0], labels[:, 0]) + w[1] * _bce(logits[:, 1], labels[:, 1])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_mismatched_tasks_name_the_config():
  logits, labels = _data(outputs=1)
  with pytest.raises(ValueError, match="1 output.*fits 2 tasks.*task_weights"):
    tasks.task_logits(jnp.asarray(logits), 2)
  logits, labels = _data()
  with pytest.raises(ValueError, match="task_weights names 2 tasks.*shape \\(64,\\).*conversion"):
    tasks.task_loss(jnp.asarray(logits[:, :2]), jnp.asarray(labels[:, 0]), (1.0, 1.0))


def test_summary_per_task():
  rng = np.random.default_rng(1)
  teacher = rng.random((5000, 2))
  labels = (rng.random((5000, 2)) < teacher).astype(np.float32)
  preds = np.clip(teacher + 0.2 * rng.normal(size=teacher.shape), 0.01, 0.99)
  s = tasks.summary(labels, preds, teacher)
  for t, suffix in ((0, ""), (1, "_conversion")):
    assert s[f"test_auc{suffix}"] == metrics.auc(labels[:, t], preds[:, t])
    assert s[f"bayes_auc{suffix}"] == metrics.auc(labels[:, t], teacher[:, t])
    assert s[f"test_logloss{suffix}"] == metrics.logloss(labels[:, t], preds[:, t])
    assert s[f"bayes_auc{suffix}"] > s[f"test_auc{suffix}"] > 0.6
  # A single-task run on a two-label stream is judged on the click column only.
  one = tasks.summary(labels, preds[:, 0], teacher)
  assert one == {k: v for k, v in s.items() if not k.endswith("_conversion")}
