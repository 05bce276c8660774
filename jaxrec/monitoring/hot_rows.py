"""Hot-row share: how concentrated one batch's embedding lookups are."""

from __future__ import annotations

import math

import numpy as np


def hot_row_share(ids: np.ndarray, mask: np.ndarray, column_tables: np.ndarray,
                  top_fraction: float = 0.01) -> float:
  """The share of this batch's lookups that hit its hottest rows.

  A row is a distinct (table, 64-bit ID) pair among the batch's valid lookups (``mask``); for
  hashed static tables this is the ID before hashing, so colliding IDs count as different rows.
  The hot rows are the ceil(``top_fraction`` x distinct rows) rows with the most lookups in the
  batch (ties broken arbitrarily, which cannot change the sum). The share is their lookups over
  all valid lookups: ``top_fraction`` for a batch with no repeats, 1.0 when a few rows take
  everything. NaN for a batch without lookups.

  ids: [B, C] uint64 IDs, or [B, C, 2] uint32 (lo, hi) pairs as the step receives them.
  mask: [B, C] bool. column_tables: [C] int, the table each column reads.
  """
  ids = np.asarray(ids)
  if ids.ndim == 3:
    ids = np.ascontiguousarray(ids, np.uint32).view(np.uint64)[..., 0]
  mask = np.asarray(mask, bool)
  if ids.shape != mask.shape or mask.shape[1] != len(column_tables):
    raise ValueError(f"hot_row_share: ids {ids.shape}, mask {mask.shape} and "
                     f"{len(column_tables)} column tables disagree")
  column_tables = np.asarray(column_tables)
  counts = np.concatenate([np.zeros(0, np.int64)] + [
      np.unique(ids[:, column_tables == t][mask[:, column_tables == t]], return_counts=True)[1]
      for t in np.unique(column_tables)])
  if not counts.sum():
    return float("nan")
  k = max(1, math.ceil(top_fraction * len(counts)))
  top = np.partition(counts, len(counts) - k)[len(counts) - k:]
  return float(top.sum() / counts.sum())
