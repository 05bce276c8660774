"""Single-device stacked embedding tables with a sparse, row-wise update.

Tables with the same (dim, optimizer, dtype) live in one array with per-table row offsets, so a
step does one gather and one scatter per stack rather than one per feature. IDs (64-bit, as
uint32 (lo, hi) pairs) are hashed into each table's row range inside the jitted step. The
backward pass never forms a dense [rows, dim] gradient: the caller differentiates with respect
to the gathered rows, and ``apply_gradients`` deduplicates them, sums gradients per unique row
and runs the table's optimizer on those rows only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.data.batch import SparseLayout
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec, validate


def fmix32(h):
  """murmur3's 32-bit finaliser (a bijection), on uint32 arrays."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_u64_pair(ids_u32, salt):
  """A 32-bit hash of 64-bit IDs given as [..., 2] uint32 (lo, hi)."""
  lo, hi = ids_u32[..., 0], ids_u32[..., 1]
  return fmix32(lo ^ fmix32(hi ^ salt))


@dataclasses.dataclass(frozen=True)
class Stack:
  name: str
  dim: int
  optimizer: SparseOptimizer
  dtype: str
  tables: tuple[TableSpec, ...]
  offsets: tuple[int, ...]            # row offset of each table inside the stack

  @property
  def rows(self) -> int:
    return int(self.offsets[-1] + self.tables[-1].rows)

  def offset(self, table: str) -> int:
    return self.offsets[[t.name for t in self.tables].index(table)]


def build_stacks(tables: Sequence[TableSpec]) -> list[Stack]:
  groups: dict[tuple, list[TableSpec]] = {}
  for t in tables:
    if t.rows is None:
      raise ValueError(f"table {t.name!r} is dynamic (rows=None); the stacked single-device "
                       "path needs fixed-size tables")
    groups.setdefault(t.stack_key, []).append(t)
  stacks = []
  for i, ((dim, opt, dtype), ts) in enumerate(groups.items()):
    offsets = tuple(int(x) for x in np.cumsum([0] + [t.rows for t in ts[:-1]]))
    stacks.append(Stack(f"stack{i}_d{dim}_{opt.name}", dim, opt, dtype, tuple(ts), offsets))
  return stacks


@dataclasses.dataclass
class EmbeddingState:
  """Arrays of the sparse side: one table and one slot dict per stack."""
  tables: dict
  slots: dict


jax.tree_util.register_dataclass(EmbeddingState, data_fields=["tables", "slots"], meta_fields=[])


class StackedEmbedding:
  """Static plan (which column reads which rows of which stack) plus pure array functions."""

  def __init__(self, tables: Sequence[TableSpec], features: Sequence[FeatureSpec]):
    tables, features = list(tables), list(features)
    validate(tables, features)
    self.table_specs = {t.name: t for t in tables}
    self.features = tuple(features)
    self.layout = SparseLayout(tuple(f.name for f in features),
                               tuple(f.max_ids for f in features))
    used = {f.table for f in features}
    self.stacks = build_stacks([t for t in tables if t.name in used])
    stack_of_table = {t.name: s for s in self.stacks for t in s.tables}
    # Per stack: which columns of the batch read it, and each column's hashing constants.
    col_feature = self.layout.column_feature()
    self.stack_columns: dict[str, np.ndarray] = {}
    self._col_salt, self._col_rows, self._col_offset = {}, {}, {}
    for s in self.stacks:
      cols = [c for c in range(self.layout.num_columns)
              if stack_of_table[features[col_feature[c]].table] is s]
      tnames = [features[col_feature[c]].table for c in cols]
      self.stack_columns[s.name] = np.asarray(cols, np.int32)
      self._col_salt[s.name] = np.asarray(
          [0x9E3779B9 * (1 + list(self.table_specs).index(t)) & 0xFFFFFFFF for t in tnames],
          np.uint32)
      self._col_rows[s.name] = np.asarray([self.table_specs[t].rows for t in tnames], np.uint32)
      self._col_offset[s.name] = np.asarray([s.offset(t) for t in tnames], np.int32)
    dims = {s.dim for s in self.stacks}
    self.dim = dims.pop() if len(dims) == 1 else None

  # ---- state -------------------------------------------------------------------------------

  def init(self, rng: jax.Array) -> EmbeddingState:
    tables, slots = {}, {}
    for s, key in zip(self.stacks, jax.random.split(rng, len(self.stacks))):
      parts = []
      for t, k in zip(s.tables, jax.random.split(key, len(s.tables))):
        scale = t.init_scale if t.init_scale is not None else 1.0 / np.sqrt(t.rows)
        parts.append(jax.random.uniform(k, (t.rows, s.dim), jnp.float32, -scale, scale))
      tables[s.name] = jnp.concatenate(parts).astype(s.dtype)
      slots[s.name] = optimizers.init_slots(s.optimizer, s.rows, s.dim)
    return EmbeddingState(tables, slots)

  # ---- forward -----------------------------------------------------------------------------

  def rows(self, ids_u32) -> dict[str, jax.Array]:
    """[B, C, 2] uint32 IDs -> per stack, [B, C_s] int32 global rows of that stack."""
    out = {}
    for s in self.stacks:
      cols = self.stack_columns[s.name]
      h = hash_u64_pair(ids_u32[:, cols], jnp.asarray(self._col_salt[s.name]))
      out[s.name] = (h % jnp.asarray(self._col_rows[s.name])).astype(jnp.int32) + \
          jnp.asarray(self._col_offset[s.name])
    return out

  def gather(self, state: EmbeddingState, rows: dict) -> dict[str, jax.Array]:
    return {s.name: jnp.take(state.tables[s.name], rows[s.name], axis=0) for s in self.stacks}

  def pool(self, gathered: dict, mask) -> list[jax.Array]:
    """Per feature (in declaration order) its pooled [B, D] (or [B, L, D] for pooling none)."""
    col_to = {}
    for s in self.stacks:
      for j, c in enumerate(self.stack_columns[s.name]):
        col_to[int(c)] = (s.name, j)
    out = []
    for f, spec in enumerate(self.features):
      cols = range(*self.layout.columns(f).indices(self.layout.num_columns))
      sname = col_to[cols[0]][0]
      js = [col_to[c][1] for c in cols]
      e = gathered[sname][:, js[0]:js[-1] + 1].astype(jnp.float32)   # [B, L, D]
      m = mask[:, cols[0]:cols[-1] + 1].astype(jnp.float32)[..., None]
      e = e * m
      if spec.pooling == "none":
        out.append(e)
      elif spec.pooling == "sum" or len(js) == 1:
        out.append(e.sum(1) if spec.pooling == "sum" else e.sum(1) / jnp.maximum(m.sum(1), 1.0))
      else:
        out.append(e.sum(1) / jnp.maximum(m.sum(1), 1.0))
    return out

  # ---- backward / update -------------------------------------------------------------------

  def apply_gradients(self, state: EmbeddingState, rows: dict, grads: dict, mask, step
                      ) -> EmbeddingState:
    """Sparse update: grads[stack] is d loss / d gathered rows, [B, C_s, D]."""
    tables, slots = dict(state.tables), dict(state.slots)
    for s in self.stacks:
      cols = self.stack_columns[s.name]
      valid = mask[:, cols].reshape(-1)
      r = rows[s.name].reshape(-1)
      g = grads[s.name].reshape(-1, s.dim)
      tables[s.name], slots[s.name] = sparse_update(
          s.optimizer, tables[s.name], slots[s.name], r, g, valid, step)
    return EmbeddingState(tables, slots)


def dedup_rows(rows, grads, valid, num_rows: int):
  """Unique touched rows and their summed gradients, at a static size N = len(rows).

  Invalid entries and padding of the unique list get row index ``num_rows`` (out of range),
  which the scatter drops. Returns (unique [N] int32, summed [N, D]).
  """
  n = rows.shape[0]
  r = jnp.where(valid, rows, num_rows)
  uniq, inverse = jnp.unique(r, size=n, fill_value=num_rows, return_inverse=True)
  summed = jax.ops.segment_sum(grads.astype(jnp.float32), inverse.reshape(-1), num_segments=n)
  return uniq.astype(jnp.int32), summed


def sparse_update(opt: SparseOptimizer, table, slots: dict, rows, grads, valid, step):
  """Applies ``opt`` to the rows touched by (rows, grads); returns (table, slots)."""
  num_rows = table.shape[0]
  if opt.name == "sgd":  # linear in the gradient: duplicates may be scattered without dedup
    g = jnp.where(valid[:, None], grads, 0).astype(table.dtype)
    r = jnp.where(valid, rows, num_rows)
    return table.at[r].add(-opt.learning_rate * g, mode="drop"), slots
  uniq, summed = dedup_rows(rows, grads, valid, num_rows)
  w = jnp.take(table, uniq, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
  srows = {k: jnp.take(v, uniq, axis=0, mode="fill", fill_value=0) for k, v in slots.items()}
  new_w, new_s = optimizers.apply_rows(opt, w, srows, summed, step)
  table = table.at[uniq].set(new_w.astype(table.dtype), mode="drop")
  slots = {k: slots[k].at[uniq].set(new_s[k], mode="drop") for k in slots}
  return table, slots
