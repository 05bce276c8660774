"""AUC from binned score histograms: the streaming AUC of the training monitors."""

from __future__ import annotations

import numpy as np


def binned_auc(hist: np.ndarray) -> float:
  """ROC AUC of scores known only by bin: ``hist`` [2, bins] counts negatives (row 0) and
  positives (row 1) per bin, bins in increasing score order. Pairs in one bin count as ties
  (1/2), so the exact AUC of the raw scores differs by at most ``tie_bound(hist)``. NaN if a
  class is absent."""
  neg, pos = (np.asarray(hist, np.float64)[i] for i in (0, 1))
  n0, n1 = neg.sum(), pos.sum()
  if n0 == 0 or n1 == 0:
    return float("nan")
  neg_below = np.cumsum(neg) - neg
  return float((pos * (neg_below + 0.5 * neg)).sum() / (n0 * n1))


def tie_bound(hist: np.ndarray) -> float:
  """The most ``binned_auc`` can be off the exact AUC: each positive-negative pair inside one
  bin is counted 1/2 where the exact AUC counts it 0, 1/2 or 1."""
  neg, pos = (np.asarray(hist, np.float64)[i] for i in (0, 1))
  n0, n1 = neg.sum(), pos.sum()
  if n0 == 0 or n1 == 0:
    return float("nan")
  return float(0.5 * (pos * neg).sum() / (n0 * n1))
