"""Monitor values computed inside the jitted train step (on device, every step, no sync).

The step returns them among its metrics; the host ``Monitor`` fetches them in batches:

  grad_norm/<group>   L2 norm of the dense gradient of one top-level NNX module (``bottom``,
                      ``top``, ...: the first key of the parameter path)
  grad_norm/embedding L2 norm of the gradient w.r.t. the pooled embedding outputs the model
                      reads (what the sparse backward routes to the rows; rows hit by several
                      lookups receive the sum of theirs)
  nonfinite           number of NaN/Inf values among the loss, the logits, the dense gradients
                      and the embedding-output gradients
  auc_hist            int32 [2, bins]: negatives (row 0) and positives (row 1) per bin of the
                      logit, bins uniform over [-logit_range, logit_range] (outside: end bins);
                      non-finite logits are left out (``nonfinite`` counts them); with
                      several labels per example, the first one's
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class StepMonitors:
  """What the train step computes for the monitors.

  auc_bins: bins of the streaming-AUC histograms (its resolution, see ``binned_auc``).
  logit_range: the histograms cover logits in [-logit_range, logit_range]; bins are uniform in
    the logit (not the probability), so a 3% click rate still spreads over many bins.
  """

  auc_bins: int = 1024
  logit_range: float = 8.0

  def __post_init__(self):
    if self.auc_bins < 2:
      raise ValueError(f"StepMonitors.auc_bins={self.auc_bins}: need at least 2 bins")
    if not self.logit_range > 0:
      raise ValueError(f"StepMonitors.logit_range={self.logit_range}: must be positive")


def _group_name(path) -> str:
  k = path[0]
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def grad_norms_by_group(grads) -> dict:
  """{"grad_norm/<first path key>": L2 norm} over the leaves of ``grads``."""
  sq: dict[str, jax.Array] = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = _group_name(path) if path else "params"
    s = jnp.sum(jnp.square(g.astype(jnp.float32)))
    sq[name] = sq[name] + s if name in sq else s
  return {f"grad_norm/{k}": jnp.sqrt(v) for k, v in sorted(sq.items())}


def count_nonfinite(tree) -> jax.Array:
  """Number of NaN/Inf entries over the floating leaves of ``tree`` (int32)."""
  total = jnp.zeros((), jnp.int32)
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
      total = total + jnp.sum(~jnp.isfinite(x)).astype(jnp.int32)
  return total


def logit_histograms(logits, labels, bins: int, logit_range: float) -> jax.Array:
  """int32 [2, bins]: row 0 counts the negatives, row 1 the positives per logit bin."""
  z = logits.reshape(-1).astype(jnp.float32)
  y = (labels.reshape(-1) > 0.5).astype(jnp.int32)
  ok = jnp.isfinite(z)
  pos = (jnp.clip(z, -logit_range, logit_range) + logit_range) * (bins / (2 * logit_range))
  b = jnp.clip(jnp.floor(jnp.where(ok, pos, 0.0)).astype(jnp.int32), 0, bins - 1)
  return jnp.zeros((2, bins), jnp.int32).at[y, b].add(ok.astype(jnp.int32))


def step_monitor_metrics(spec: StepMonitors, loss, logits, labels, g_params, g_feats) -> dict:
  """The monitors' per-step values (see the module docstring)."""
  norms = {**grad_norms_by_group(g_params), "grad_norm/embedding": optax.tree.norm(g_feats)}
  # A NaN/Inf anywhere makes its sum or norm non-finite, so a healthy step (all finite) skips
  # the elementwise count; an overflowing norm of finite values counts 0, as it should.
  healthy = jnp.all(jnp.isfinite(jnp.stack([loss, jnp.sum(logits), *norms.values()])))
  tree = (loss, logits, g_params, g_feats)
  nonfinite = jax.lax.cond(healthy, lambda t: jnp.zeros((), jnp.int32), count_nonfinite, tree)
  if logits.ndim and labels.ndim > logits.ndim:   # several tasks: the first label's AUC
    labels = labels.reshape(logits.shape[0], -1)[:, 0]
  return {**norms, "nonfinite": nonfinite,
          "auc_hist": logit_histograms(logits, labels, spec.auc_bins, spec.logit_range)}
