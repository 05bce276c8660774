"""Stacks: tables that share (row width, optimizer, dtype) live in one array per device.

A table is cut into column blocks ("pieces"; one unless it is column-wise), and each piece's
rows are spread over a device group: row ``r`` lives on ``devices[r % n]`` at local row
``r // n``. A stack holds pieces of equal width; on each device its array (the "slab") is the
concatenation of the segments of the pieces that device holds, so a step does one gather and
one scatter per stack, not one per feature. A replicated stack (data-parallel tables) is one
array ``[sum(rows), dim]`` held whole by every device.

``sparse_update`` is the per-shard backward: dedup touched rows, segment-sum their gradients,
run the row-wise optimizer on those rows only and scatter them (and their slots) in place.
It never forms a dense ``[rows, dim]`` gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.embedding import optimizers
from jaxrec.embedding.routing import take_rows, unique_inverse
from jaxrec.embedding.specs import SparseOptimizer, TableSpec


@dataclasses.dataclass(frozen=True)
class Piece:
  """Column block ``block`` of a table (columns ``col0 : col0 + dim``), row-sharded."""

  table: TableSpec
  block: int
  col0: int
  dim: int
  devices: tuple[int, ...]

  @property
  def n(self) -> int:
    return len(self.devices)

  @property
  def rows_per_shard(self) -> int:
    return -(-self.table.rows // self.n)


@dataclasses.dataclass(frozen=True, eq=False)
class Stack:
  """One array per device (or one replicated array) holding several pieces.

  offsets: sharded: [num_devices, num_pieces] row offset of each piece in each device's slab
    (-1 where the device holds none of it); replicated: [num_pieces].
  rows: rows of each device's slab (sharded) or of the whole array (replicated).
  grad_dim: width of the gradient the update sees (> dim only for a column-wise row-wise
    Adagrad piece, which needs the whole row's gradient for its accumulator).
  """

  name: str
  dim: int
  grad_dim: int
  optimizer: SparseOptimizer
  dtype: str
  replicated: bool
  pieces: tuple[Piece, ...]
  offsets: np.ndarray
  rows: int


def build_stacks(pieces: Sequence[Piece], replicated: Sequence[bool], num_devices: int
                 ) -> list[Stack]:
  """Groups pieces into stacks and lays out every device's slab."""
  groups: dict[tuple, list[Piece]] = {}
  for p, rep in zip(pieces, replicated):
    if p.table.rows is None:
      raise ValueError(f"table {p.table.name!r} is dynamic (rows=None); the stacked engine "
                       "needs fixed-size tables (dynamic ones go through "
                       "jaxrec.embedding.dynamic.DynamicEmbedding)")
    opt = p.table.optimizer
    grad_dim = p.table.dim if (opt.name == "rowwise_adagrad" and p.dim != p.table.dim) else p.dim
    groups.setdefault((rep, p.dim, grad_dim, opt, p.table.dtype), []).append(p)
  stacks = []
  for i, ((rep, dim, grad_dim, opt, dtype), ps) in enumerate(groups.items()):
    name = f"stack{i}_{'rep' if rep else 'shard'}_d{dim}_{opt.name}"
    if grad_dim != dim:
      name += f"_g{grad_dim}"
    if rep:
      offsets = np.cumsum([0] + [p.table.rows for p in ps[:-1]]).astype(np.int64)
      rows = int(offsets[-1] + ps[-1].table.rows)
    else:
      offsets = np.full((num_devices, len(ps)), -1, np.int64)
      cursor = np.zeros(num_devices, np.int64)
      for j, p in enumerate(ps):
        for d in p.devices:
          offsets[d, j] = cursor[d]
          cursor[d] += p.rows_per_shard
      rows = int(max(cursor.max(), 1))
      if (num_devices * rows + 1) >= 2**31:
        raise ValueError(f"stack {name}: {num_devices} x {rows} slab rows do not fit the int32 "
                         "routing key; split the tables over more stacks (e.g. other dtypes) or "
                         "use more devices")
    stacks.append(Stack(name, dim, grad_dim, opt, dtype, rep, tuple(ps), offsets, rows))
  return stacks


@dataclasses.dataclass
class EmbeddingState:
  """Arrays of the sparse side: one table and one slot dict per stack."""
  tables: dict
  slots: dict


jax.tree_util.register_dataclass(EmbeddingState, data_fields=["tables", "slots"], meta_fields=[])


def dedup_rows(rows, grads, valid, num_rows: int):
  """Unique touched rows and their summed gradients, at a static size N = len(rows).

  Invalid entries and padding of the unique list get row index ``num_rows`` (out of range),
  which the scatter drops. Returns (unique [N] int32, summed [N, D]).
  """
  n = rows.shape[0]
  r = jnp.where(valid, rows, num_rows).astype(jnp.int32)
  uniq, inverse = unique_inverse(r, num_rows)
  summed = jax.ops.segment_sum(grads.astype(jnp.float32), inverse, num_segments=n)
  return uniq, summed


def sparse_update(opt: SparseOptimizer, table, slots: dict, rows, grads, valid, step,
                  assume_unique: bool = False):
  """Applies ``opt`` to the rows touched by (rows, grads); returns (table, slots).

  ``assume_unique``: the valid rows are already distinct (skips the dedup sort).
  """
  num_rows = table.shape[0]
  dim = table.shape[1]
  if opt.name == "sgd" and table.dtype == jnp.float32:
    # Linear in the gradient: duplicates may be scattered without dedup.
    g = jnp.where(valid[:, None], grads[:, :dim], 0).astype(jnp.float32)
    r = jnp.where(valid, rows, num_rows)
    return table.at[r].add(-opt.learning_rate * g, mode="drop"), slots
  if assume_unique:
    uniq = jnp.where(valid, rows, num_rows).astype(jnp.int32)
    summed = grads.astype(jnp.float32)
  else:
    uniq, summed = dedup_rows(rows, grads, valid, num_rows)
  w = take_rows(table, uniq)
  srows = {k: jnp.take(v, uniq, axis=0, mode="fill", fill_value=0) for k, v in slots.items()}
  new_w, new_s = optimizers.apply_rows(opt, w, srows, summed, step)
  table = table.at[uniq].set(new_w.astype(table.dtype), mode="drop", unique_indices=True)
  slots = {k: slots[k].at[uniq].set(new_s[k], mode="drop", unique_indices=True) for k in slots}
  return table, slots

