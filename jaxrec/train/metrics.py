"""Exact evaluation metrics on the host (numpy), used for every reported figure."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Exact ROC AUC (Mann-Whitney U with average ranks for ties). NaN if one class is absent."""
  y = np.asarray(labels, np.float64).reshape(-1)
  s = np.asarray(scores, np.float64).reshape(-1)
  if y.shape != s.shape:
    raise ValueError(f"auc: {y.shape[0]} labels but {s.shape[0]} scores")
  n1 = float(y.sum())
  n0 = float(y.size - n1)
  if n1 == 0 or n0 == 0:
    return float("nan")
  order = np.argsort(s, kind="mergesort")
  ss = s[order]
  ranks = np.empty(s.size, np.float64)
  # Average rank inside each run of tied scores.
  starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
  ends = np.r_[starts[1:], s.size]
  avg = (starts + ends + 1) / 2.0
  ranks[order] = np.repeat(avg, ends - starts)
  return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
  y = np.asarray(labels, np.float64).reshape(-1)
  p = np.clip(np.asarray(probs, np.float64).reshape(-1), eps, 1 - eps)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
