"""Declarative embedding specs: what a table is, which optimizer it carries, who reads it."""

from __future__ import annotations

import dataclasses
from typing import Literal

OptimizerName = Literal["sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl"]
Pooling = Literal["sum", "mean", "none"]
IdKind = Literal["hashed", "index"]
OutOfRange = Literal["hash", "error"]
Initializer = Literal["uniform", "normal", "zeros"]

SHARDING_TYPES = ("data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise")
_DTYPES = ("float32", "bfloat16", "float16")


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
class DynamicSpec:
  """A dynamic table: one device hash table per shard (jaxrec.embedding.dynamic).

  capacity: rows over all shards (each shard holds capacity / shards, a power of two >= 8).
  min_count: admission threshold: an ID gets a row once seen this many times (1: at once);
    IDs without a row read zeros and are not updated.
  admit_probability: admit a new ID with this probability (a per-ID coin from the step).
  steps_to_live, min_frequency, min_l2_norm, max_load_factor: the eviction rules
    (``hash_table.EvictionPolicy``), run every ``evict_every_steps`` steps and whenever the
    load factor passes ``evict_above_load_factor``.
  on_full: a new ID meeting a full probe window "evict"s the least recently used entry or
    is "reject"ed; either way it is counted, never dropped silently.
  default_row: what a lookup of an ID without a row reads (not admitted, rejected, or dropped
    by a full all_to_all bucket): "zeros", or "trainable": one row per table, starting at
    zero, that those lookups read and whose gradient (the sum over them) the table's
    optimizer applies, slots included. Their IDs still get no row and no update.
  """

  capacity: int
  min_count: int = 1
  admit_probability: float = 1.0
  sketch_width: int = 1 << 16
  steps_to_live: int | None = None
  min_frequency: int | None = None
  min_l2_norm: float | None = None
  max_load_factor: float | None = None
  evict_every_steps: int | None = None
  evict_above_load_factor: float | None = None
  on_full: Literal["evict", "reject"] = "evict"
  max_probes: int = 64
  default_row: Literal["zeros", "trainable"] = "zeros"

  def __post_init__(self):
    if self.default_row not in ("zeros", "trainable"):
      raise ValueError(f"DynamicSpec.default_row must be 'zeros' or 'trainable', "
                       f"got {self.default_row!r}")
    if self.capacity < 8:
      raise ValueError(f"DynamicSpec.capacity must be >= 8, got {self.capacity}")
    if self.min_count < 1:
      raise ValueError(f"DynamicSpec.min_count must be >= 1, got {self.min_count}")
    if self.on_full not in ("evict", "reject"):
      raise ValueError(f"DynamicSpec.on_full must be 'evict' or 'reject', got {self.on_full!r}")
    if self.evict_every_steps is not None and self.evict_every_steps < 1:
      raise ValueError(f"DynamicSpec.evict_every_steps must be >= 1, "
                       f"got {self.evict_every_steps}")


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One embedding table.

  rows: fixed row count, or None for a dynamic table (then ``dynamic`` says its capacity,
    admission and eviction; jaxrec.embedding.dynamic).
  ids: "hashed" (default) hashes every 64-bit ID into [0, rows); "index" takes IDs as row
    numbers, and IDs outside [0, rows) (negative ones included) follow ``out_of_range``.
  out_of_range: for ``ids="index"``: "hash" folds bad IDs into range by hashing, "error"
    rejects the batch on the host naming the feature (in the step they are treated as padding
    and counted in ``invalid_ids``, so bad input never updates a row).
  initializer, init_scale: rows start uniform in [-s, s] or normal(0, s), s = init_scale or
    1/sqrt(rows) (the DLRM reference initialiser); "zeros" starts at 0.
  sharding: None lets the planner choose; else one of SHARDING_TYPES (the override wins).
  column_shards: column blocks of a "column_wise" table (None: the planner picks).
  dtype: storage dtype of the rows; lookups pool and optimizers update in float32.
  """

  name: str
  rows: int | None
  dim: int
  optimizer: SparseOptimizer = SparseOptimizer()
  initializer: Initializer = "uniform"
  init_scale: float | None = None
  sharding: str | None = None
  column_shards: int | None = None
  dtype: str = "float32"
  ids: IdKind = "hashed"
  out_of_range: OutOfRange = "hash"
  dynamic: DynamicSpec | None = None

  def __post_init__(self):
    if not self.name:
      raise ValueError("TableSpec.name must be non-empty")
    if (self.rows is None) != (self.dynamic is not None):
      raise ValueError(f"table {self.name!r}: a dynamic table has rows=None and a DynamicSpec "
                       f"(dynamic=DynamicSpec(capacity=...)); a static one has rows and no "
                       f"DynamicSpec; got rows={self.rows}, dynamic={self.dynamic}")
    if self.dynamic is not None and self.ids != "hashed":
      raise ValueError(f"table {self.name!r}: a dynamic table keys rows by the exact ID; "
                       f"ids={self.ids!r} applies to static tables only")
    if self.rows is not None and self.rows < 1:
      raise ValueError(f"table {self.name!r}: rows must be >= 1, got {self.rows}")
    if self.rows is not None and self.rows >= 2**31:
      raise ValueError(f"table {self.name!r}: rows must be < 2^31, got {self.rows}")
    if self.dim < 1:
      raise ValueError(f"table {self.name!r}: dim must be >= 1, got {self.dim}")
    if self.sharding is not None and self.sharding not in SHARDING_TYPES:
      raise ValueError(f"table {self.name!r}: sharding={self.sharding!r}; expected None (let "
                       f"the planner choose) or one of {SHARDING_TYPES}")
    if self.column_shards is not None and (self.column_shards < 1
                                           or self.dim % self.column_shards):
      raise ValueError(f"table {self.name!r}: column_shards={self.column_shards} must divide "
                       f"dim={self.dim}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"table {self.name!r}: dtype={self.dtype!r}; expected one of {_DTYPES}")
    if self.ids not in ("hashed", "index"):
      raise ValueError(f"table {self.name!r}: ids={self.ids!r}; expected 'hashed' or 'index'")
    if self.out_of_range not in ("hash", "error"):
      raise ValueError(f"table {self.name!r}: out_of_range={self.out_of_range!r}; expected "
                       "'hash' or 'error'")
    if self.initializer not in ("uniform", "normal", "zeros"):
      raise ValueError(f"table {self.name!r}: initializer={self.initializer!r}; expected "
                       "uniform, normal or zeros")

  @property
  def scale(self) -> float:
    rows = self.rows if self.rows is not None else self.dynamic.capacity
    return self.init_scale if self.init_scale is not None else 1.0 / float(rows) ** 0.5


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One sparse input feature and the table it reads (several features may share a table)."""

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
  fnames = [f.name for f in features]
  if len(set(fnames)) != len(fnames):
    raise ValueError(f"duplicate feature names: "
                     f"{sorted(n for n in fnames if fnames.count(n) > 1)}")
  for f in features:
    if f.table not in names:
      raise ValueError(f"feature {f.name!r} reads table {f.table!r}, which is not declared "
                       f"(declared: {names})")
