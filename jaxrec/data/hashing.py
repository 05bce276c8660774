"""64-bit feature-ID hashing shared by every reader and the synthetic generator.

A raw categorical value (a Criteo hex string, a synthetic item index) becomes a 64-bit ID by
mixing it with a per-feature salt, so equal raw values in two features never share an ID.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser, vectorised over a uint64 array (a bijection on 64 bits)."""
  x = np.asarray(x, dtype=np.uint64)
  with np.errstate(over="ignore"):
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def feature_salt(feature_index: int) -> np.uint64:
  return splitmix64(np.uint64(0xC0FFEE00 + feature_index))


def feature_ids(feature_index: int, raw: np.ndarray) -> np.ndarray:
  """Maps raw uint64 values of one feature to collision-free (bijective) 64-bit IDs."""
  return splitmix64(np.asarray(raw, dtype=np.uint64) ^ feature_salt(feature_index))


def missing_id(feature_index: int) -> np.uint64:
  """The ID a feature takes when its value is absent (an empty Criteo field).

  It equals ``feature_ids(feature_index, 2**64 - 1)``: that one raw value is reserved for
  "missing" (real Criteo values are 32-bit, so no real value is affected).
  """
  return splitmix64(feature_salt(feature_index) ^ np.uint64(0xFFFFFFFFFFFFFFFF))
