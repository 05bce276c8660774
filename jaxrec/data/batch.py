"""The host-side batch every reader produces and every model consumes.

Sparse features are laid out as a padded jagged block: feature ``f`` owns the static column
range ``layout.columns(f)`` of ``ids``; ``mask`` says which of those slots hold a real ID.
One-hot features take one column each, a multi-hot feature with at most L IDs takes L columns.
This keeps every shape static under jit while bags stay variable-length.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SparseLayout:
  """Static description of the sparse columns: feature names and max IDs per example."""

  names: tuple[str, ...]
  max_ids: tuple[int, ...]

  def __post_init__(self):
    if len(self.names) != len(self.max_ids):
      raise ValueError(f"{len(self.names)} feature names but {len(self.max_ids)} max_ids")
    if len(set(self.names)) != len(self.names):
      raise ValueError(f"duplicate feature names in {self.names}")
    for n, m in zip(self.names, self.max_ids):
      if m < 1:
        raise ValueError(f"feature {n!r}: max_ids must be >= 1, got {m}")

  @classmethod
  def one_hot(cls, names: Sequence[str]) -> "SparseLayout":
    return cls(tuple(names), (1,) * len(names))

  @property
  def num_features(self) -> int:
    return len(self.names)

  @property
  def num_columns(self) -> int:
    return int(sum(self.max_ids))

  @property
  def is_one_hot(self) -> bool:
    return all(m == 1 for m in self.max_ids)

  @property
  def offsets(self) -> tuple[int, ...]:
    """Start column of each feature, plus the total at the end."""
    return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.max_ids)]))

  def columns(self, f: int) -> slice:
    o = self.offsets
    return slice(o[f], o[f + 1])

  def column_feature(self) -> np.ndarray:
    """[num_columns] int32: which feature each column belongs to."""
    return np.repeat(np.arange(self.num_features, dtype=np.int32), self.max_ids)


@dataclasses.dataclass
class Batch:
  """One batch of examples on the host.

  dense:  float32 [B, num_dense]  (already transformed, e.g. log1p)
  ids:    uint64  [B, num_columns] raw 64-bit feature IDs; padding slots hold 0
  mask:   bool    [B, num_columns] True where ``ids`` holds a real ID
  labels: float32 [B] or [B, num_tasks]
  """

  dense: np.ndarray
  ids: np.ndarray
  mask: np.ndarray
  labels: np.ndarray

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])

  def slice(self, start: int, stop: int) -> "Batch":
    return Batch(self.dense[start:stop], self.ids[start:stop], self.mask[start:stop],
                 self.labels[start:stop])

  @staticmethod
  def concat(batches: Sequence["Batch"]) -> "Batch":
    return Batch(*(np.concatenate([getattr(b, f.name) for b in batches])
                   for f in dataclasses.fields(Batch)))

  def without_features(self, layout: SparseLayout, names: Sequence[str]) -> "Batch":
    """A copy with the named sparse features blanked (empty bags): for feature ablations."""
    unknown = sorted(set(names) - set(layout.names))
    if unknown:
      raise ValueError(f"cannot drop unknown features {unknown}; known: {list(layout.names)}")
    mask = self.mask.copy()
    for n in names:
      mask[:, layout.columns(layout.names.index(n))] = False
    return Batch(self.dense, np.where(mask, self.ids, np.uint64(0)), mask, self.labels)

  def ids_as_u32_pairs(self) -> np.ndarray:
    """[B, num_columns, 2] uint32 (lo, hi) view of ``ids``: how 64-bit IDs travel to devices
    without enabling jax_enable_x64."""
    ids = np.ascontiguousarray(self.ids, dtype=np.uint64)
    return ids.view(np.uint32).reshape(*ids.shape, 2)
