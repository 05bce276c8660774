"""Row-wise sparse optimizers: each updates a block of touched rows and their slots.

Every function takes the current values of U unique touched rows ``w [U, D]``, their slots, and
the summed gradient of each row ``g [U, G]``, and returns new rows and slots. The caller gathers
and scatters; nothing here ever sees a whole table. ``G == D`` except for a column-sharded
row-wise Adagrad table: there ``g`` carries the whole row's gradient (``G`` = full dim), this
shard's own columns first, so the row-wise accumulator sees every column.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrec.embedding.specs import SparseOptimizer


def slot_shapes(opt: SparseOptimizer, dim: int) -> dict[str, tuple[tuple[int, ...], float]]:
  """Per-row slot shape (after the row axes) and initial value of each slot."""
  acc = opt.initial_accumulator
  return {
      "sgd": {},
      "rowwise_adagrad": {"acc": ((), acc)},
      "adagrad": {"acc": ((dim,), acc)},
      "adam": {"m": ((dim,), 0.0), "v": ((dim,), 0.0)},
      "ftrl": {"z": ((dim,), 0.0), "n": ((dim,), acc)},
  }[opt.name]


def slot_floats_per_row(opt: SparseOptimizer, dim: int) -> int:
  return sum(max(1, dim if s else 1) for s, _ in slot_shapes(opt, dim).values())


def init_slots(opt: SparseOptimizer, rows: int | tuple[int, ...], dim: int
               ) -> dict[str, jnp.ndarray]:
  """Slot arrays for a table of ``rows`` x ``dim`` (row-wise Adagrad keeps one float a row).

  ``rows`` may be a shape (e.g. ``(shards, rows_per_shard)``) for a sharded layout.
  """
  lead = (rows,) if isinstance(rows, int) else tuple(rows)
  return {k: jnp.full(lead + s, v, jnp.float32) for k, (s, v) in slot_shapes(opt, dim).items()}


def apply_rows(opt: SparseOptimizer, w, slots: dict, g, step):
  """New (rows, slots) for touched rows. ``step`` is the 1-based global step (for Adam)."""
  lr = opt.learning_rate
  g_full = g.astype(jnp.float32)
  g = g_full[:, :w.shape[-1]]
  w = w.astype(jnp.float32)
  if g_full.shape[-1] != w.shape[-1] and opt.name != "rowwise_adagrad":
    raise ValueError(f"{opt.name}: gradient width {g_full.shape[-1]} != row width {w.shape[-1]}")
  if opt.name == "sgd":
    return w - lr * g, {}
  if opt.name == "rowwise_adagrad":
    acc = slots["acc"] + jnp.mean(g_full * g_full, axis=-1)
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
    return new_w, {"z": z, "n": n}
  raise ValueError(f"unknown sparse optimizer {opt.name!r}")
