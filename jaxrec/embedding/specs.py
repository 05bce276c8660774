"""Declarative embedding specs: what a table is, which optimizer it carries, who reads it."""

from __future__ import annotations

import dataclasses
from typing import Literal

OptimizerName = Literal["sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl"]
Pooling = Literal["sum", "mean", "none"]
OutOfRange = Literal["hash", "error"]


@dataclasses.dataclass(frozen=True)
class SparseOptimizer:
  """A row-wise optimizer applied by the sparse path to touched rows only.

  ``adam`` is lazy (only touched rows' moments move; bias correction uses the global step, as
  TensorFlow's LazyAdam). ``ftrl`` is FTRL-Proximal with l1/l2 (McMahan et al. 2013).
  """

  name: OptimizerName = "rowwise_adagrad"
  learning_rate: float = 0.01
  initial_accumulator: float = 0.0
  eps: float = 1e-8
  beta1: float = 0.9
  beta2: float = 0.999
  l1: float = 0.0
  l2: float = 0.0
  lr_power: float = -0.5

  def __post_init__(self):
    if self.name not in ("sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl"):
      raise ValueError(f"unknown sparse optimizer {self.name!r}; expected one of "
                       "sgd, adagrad, rowwise_adagrad, adam, ftrl")
    if self.learning_rate <= 0:
      raise ValueError(f"sparse optimizer {self.name}: learning_rate must be > 0")


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One embedding table.

  rows: fixed row count (IDs are hashed into it), or None for a dynamic table (later issue).
  init_scale: rows start uniform in [-init_scale, init_scale]; None means 1/sqrt(rows)
    (the DLRM reference initialiser).
  sharding: None lets the planner choose; else "data_parallel", "table_wise", "row_wise",
    "column_wise" or "table_row_wise".
  out_of_range: what to do with IDs for which hashing is not wanted (raw row indices): "hash"
    folds them into range, "error" raises naming the feature.
  """

  name: str
  rows: int | None
  dim: int
  optimizer: SparseOptimizer = SparseOptimizer()
  init_scale: float | None = None
  sharding: str | None = None
  dtype: str = "float32"
  out_of_range: OutOfRange = "hash"

  def __post_init__(self):
    if not self.name:
      raise ValueError("TableSpec.name must be non-empty")
    if self.rows is not None and self.rows < 1:
      raise ValueError(f"table {self.name!r}: rows must be >= 1, got {self.rows}")
    if self.dim < 1:
      raise ValueError(f"table {self.name!r}: dim must be >= 1, got {self.dim}")

  @property
  def stack_key(self) -> tuple:
    """Tables with equal keys are stacked into one array (one gather/scatter per stack)."""
    return (self.dim, self.optimizer, self.dtype)


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One sparse input feature and the table it reads."""

  name: str
  table: str
  pooling: Pooling = "sum"
  max_ids: int = 1

  def __post_init__(self):
    if self.pooling not in ("sum", "mean", "none"):
      raise ValueError(f"feature {self.name!r}: pooling must be sum, mean or none")
    if self.max_ids < 1:
      raise ValueError(f"feature {self.name!r}: max_ids must be >= 1")


def validate(tables: list[TableSpec], features: list[FeatureSpec]) -> None:
  names = [t.name for t in tables]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate table names: {sorted(n for n in names if names.count(n) > 1)}")
  for f in features:
    if f.table not in names:
      raise ValueError(f"feature {f.name!r} reads table {f.table!r}, which is not declared "
                       f"(declared: {names})")
