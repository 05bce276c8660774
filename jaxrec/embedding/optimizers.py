"""Row-wise sparse optimizers: each updates a block of touched rows and their slots.

Every function takes the current values of U unique touched rows ``w [U, D]``, their slots, and
the summed gradient of each row ``g [U, D]``, and returns new rows and slots. The caller gathers
and scatters; nothing here ever sees a whole table.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrec.embedding.specs import SparseOptimizer


def init_slots(opt: SparseOptimizer, rows: int, dim: int) -> dict[str, jnp.ndarray]:
  """Slot arrays for a table of ``rows`` x ``dim`` (row-wise Adagrad keeps one float a row)."""
  acc = opt.initial_accumulator
  if opt.name == "sgd":
    return {}
  if opt.name == "rowwise_adagrad":
    return {"acc": jnp.full((rows,), acc, jnp.float32)}
  if opt.name == "adagrad":
    return {"acc": jnp.full((rows, dim), acc, jnp.float32)}
  if opt.name == "adam":
    return {"m": jnp.zeros((rows, dim), jnp.float32), "v": jnp.zeros((rows, dim), jnp.float32)}
  if opt.name == "ftrl":
    return {"z": jnp.zeros((rows, dim), jnp.float32),
            "n": jnp.full((rows, dim), acc, jnp.float32)}
  raise ValueError(f"unknown sparse optimizer {opt.name!r}")


def apply_rows(opt: SparseOptimizer, w, slots: dict, g, step):
  """New (rows, slots) for touched rows. ``step`` is the 1-based global step (for Adam)."""
  lr = opt.learning_rate
  g = g.astype(jnp.float32)
  if opt.name == "sgd":
    return w - lr * g, {}
  if opt.name == "rowwise_adagrad":
    acc = slots["acc"] + jnp.mean(g * g, axis=-1)
    return w - lr * g / (jnp.sqrt(acc)[:, None] + opt.eps), {"acc": acc}
  if opt.name == "adagrad":
    acc = slots["acc"] + g * g
    return w - lr * g / (jnp.sqrt(acc) + opt.eps), {"acc": acc}
  if opt.name == "adam":
    m = opt.beta1 * slots["m"] + (1 - opt.beta1) * g
    v = opt.beta2 * slots["v"] + (1 - opt.beta2) * g * g
    t = jnp.asarray(step, jnp.float32)
    m_hat = m / (1 - opt.beta1 ** t)
    v_hat = v / (1 - opt.beta2 ** t)
    return w - lr * m_hat / (jnp.sqrt(v_hat) + opt.eps), {"m": m, "v": v}
  if opt.name == "ftrl":
    p = -opt.lr_power
    n_old = slots["n"]
    n = n_old + g * g
    sigma = (n ** p - n_old ** p) / lr
    z = slots["z"] + g - sigma * w
    denom = (opt.l2 * 2 + (n ** p) / lr)  # FTRL-Proximal closed form, l2 folded into beta term
    new_w = jnp.where(jnp.abs(z) <= opt.l1, 0.0, -(z - jnp.sign(z) * opt.l1) / denom)
    return new_w.astype(w.dtype), {"z": z, "n": n}
  raise ValueError(f"unknown sparse optimizer {opt.name!r}")
