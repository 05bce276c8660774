"""The sharding planner: a type and a placement for every table, printed as a table.

Types (TorchRec's names): ``data_parallel`` (every device holds the table; gradients are
all-gathered and every replica applies the same update), ``table_wise`` (one device),
``row_wise`` (rows spread over every device by ``row % n``), ``column_wise`` (the dim cut into
blocks, each on one device), ``table_row_wise`` (row-wise over the devices of one host,
table-wise across hosts; on a 1-D mesh the whole mesh is one host).

Automatic choice, in order, for a table of B bytes (rows + optimizer slots):
  1. one device: data_parallel (nothing to route);
  2. B <= replicate_below: data_parallel (a copy everywhere is cheaper than routing);
  3. B <= the table-wise limit (half the per-device budget, and at most an even share of all
     sharded bytes): table_wise on the device with the least (memory, lookup traffic) load;
  4. wide tables (dim >= 2 * column_block) whose blocks pass 3: column_wise;
  5. several hosts and B fits half a host: table_row_wise on the least loaded host;
  6. else row_wise.
A ``TableSpec.sharding`` override always wins. The plan fails, printing itself, when a device
would need more than ``memory_budget`` bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import SHARDING_TYPES, FeatureSpec, TableSpec, validate

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def table_bytes(t: TableSpec) -> int:
  """Bytes of a table's rows plus its optimizer slots (float32)."""
  return t.rows * (t.dim * _ITEMSIZE[t.dtype] + 4 * optimizers.slot_floats_per_row(
      t.optimizer, t.dim))


@dataclasses.dataclass(frozen=True)
class TablePlacement:
  """Where one table lives. ``groups[k]``: the devices (linear mesh indices) over which
  column block k's rows are spread; one block unless column_wise."""

  table: str
  kind: str
  groups: tuple[tuple[int, ...], ...]

  @property
  def column_shards(self) -> int:
    return len(self.groups)

  @property
  def devices(self) -> tuple[int, ...]:
    return tuple(sorted({d for g in self.groups for d in g}))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  num_devices: int
  num_hosts: int
  placements: tuple[TablePlacement, ...]
  tables: tuple[TableSpec, ...]
  lookups: tuple[int, ...]           # estimated IDs per step of each table (global batch)
  memory_budget: int | None

  def __getitem__(self, table: str) -> TablePlacement:
    for p in self.placements:
      if p.table == table:
        return p
    raise KeyError(f"the plan has no table {table!r}")

  def device_bytes(self) -> np.ndarray:
    load = np.zeros(self.num_devices)
    for t, p in zip(self.tables, self.placements):
      b = table_bytes(t)
      if p.kind == "data_parallel":
        load += b
        continue
      for g in p.groups:
        for d in g:
          load[d] += b / len(p.groups) / len(g)
    return load

  def describe(self) -> str:
    head = ("table", "rows", "dim", "bytes", "lookups/step", "type", "devices")
    rows = [head]
    for t, p, n in zip(self.tables, self.placements, self.lookups):
      if p.kind == "data_parallel":
        devs = f"all {self.num_devices} (replicated)"
      else:
        devs = " | ".join(_ranges(g) for g in p.groups)
      rows.append((t.name, f"{t.rows:,}", str(t.dim), _mib(table_bytes(t)), f"{n:,}", p.kind,
                   devs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if 0 < i < 5 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    load = self.device_bytes()
    budget = f" of {_mib(self.memory_budget)}" if self.memory_budget else ""
    lines.append(f"per-device bytes{budget}: " + ", ".join(
        f"{d}: {_mib(b)}" for d, b in enumerate(load)))
    return "\n".join(lines)


def _mib(b) -> str:
  return f"{b / 2**20:,.1f} MiB" if b >= 2**16 else f"{b / 1024:,.1f} KiB"


def _ranges(devs: Sequence[int]) -> str:
  devs = sorted(devs)
  out, start = [], devs[0]
  for a, b in zip(devs, devs[1:] + [None]):
    if b != a + 1:
      out.append(f"{start}" if start == a else f"{start}-{a}")
      start = b
  return ",".join(out)


def plan_sharding(tables: Sequence[TableSpec], features: Sequence[FeatureSpec], *,
                  num_devices: int, num_hosts: int = 1, batch_size: int = 1,
                  memory_budget: int | None = None, replicate_below: int = 1 << 20,
                  column_block: int = 128, min_column_dim: int = 8) -> ShardingPlan:
  """Assigns a sharding type and devices to every table (see the module docstring).

  batch_size: global examples per step (lookup traffic = batch x max_ids of each reader).
  memory_budget: bytes of tables + slots one device may hold (None: unchecked).
  """
  tables, features = list(tables), list(features)
  validate(tables, features)
  if num_devices % num_hosts:
    raise ValueError(f"{num_devices} devices do not split into {num_hosts} hosts")
  local = num_devices // num_hosts
  lookups = {t.name: 0 for t in tables}
  for f in features:
    lookups[f.table] += batch_size * f.max_ids
  sizes = {t.name: table_bytes(t) for t in tables}
  mem = np.zeros(num_devices)
  traffic = np.zeros(num_devices)
  total_traffic = max(sum(lookups.values()), 1)
  budget = float(memory_budget) if memory_budget else np.inf

  def kind_of(t: TableSpec) -> str:
    if t.rows is None:
      raise ValueError(f"table {t.name!r} is dynamic (rows=None): the planner places "
                       "fixed-size tables only")
    if t.sharding is not None:
      return t.sharding
    b = sizes[t.name]
    if num_devices == 1 or b <= replicate_below:
      return "data_parallel"
    sharded = sum(v for n, v in sizes.items() if v > replicate_below)
    tw_limit = min(budget / 2, sharded / num_devices)
    if b <= tw_limit:
      return "table_wise"
    blocks = t.dim // column_block
    if blocks >= 2 and t.dim % column_block == 0 and b / blocks <= tw_limit:
      return "column_wise"
    if num_hosts > 1 and b <= budget * local / 2:
      return "table_row_wise"
    return "row_wise"

  # Loads are compared as fractions: memory of the budget (or of an even share of all bytes),
  # lookups of all lookups; a device's cost is the larger of the two.
  mem_scale = budget if np.isfinite(budget) else max(sum(sizes.values()) / num_devices, 1.0)

  def least_loaded(candidates, b, n) -> int:
    cost = [max((mem[d] + b) / mem_scale, (traffic[d] + n) / total_traffic)
            for d in candidates]
    return candidates[int(np.argmin(cost))]

  kinds = {t.name: kind_of(t) for t in tables}
  placements: dict[str, TablePlacement] = {}
  everyone = tuple(range(num_devices))
  # Spread the replicated and row-wise tables first (every device pays them), then place the
  # rest largest first so the greedy balance has room.
  order = sorted(tables, key=lambda t: (kinds[t.name] not in ("data_parallel", "row_wise"),
                                        -sizes[t.name]))
  for t in order:
    kind, b, n = kinds[t.name], sizes[t.name], lookups[t.name]
    if kind == "data_parallel":
      groups = (everyone,)
      mem[:] += b
    elif kind == "row_wise":
      groups = (everyone,)
      mem[:] += b / num_devices
      traffic[:] += n / num_devices
    elif kind == "table_wise":
      d = least_loaded(list(everyone), b, n)
      groups = ((d,),)
      mem[d] += b
      traffic[d] += n
    elif kind == "column_wise":
      if t.column_shards:
        k = t.column_shards
      elif t.sharding == "column_wise":  # an override: as many blocks as devices allow
        k = _divisor_at_most(t.dim, min(num_devices, max(t.dim // min_column_dim, 1)))
      else:
        k = _divisor_at_most(t.dim, min(num_devices, t.dim // column_block))
      used: list[int] = []
      for _ in range(k):
        free = [d for d in everyone if d not in used] or list(everyone)
        d = least_loaded(free, b / k, n)
        used.append(d)
        mem[d] += b / k
        traffic[d] += n
      groups = tuple((d,) for d in used)
    elif kind == "table_row_wise":
      hosts = [tuple(range(h * local, (h + 1) * local)) for h in range(num_hosts)]
      cost = [max((mem[list(g)].max() + b / local) / mem_scale,
                  (traffic[list(g)].sum() + n) / total_traffic) for g in hosts]
      g = hosts[int(np.argmin(cost))]
      groups = (g,)
      mem[list(g)] += b / local
      traffic[list(g)] += n / local
    else:
      raise ValueError(f"table {t.name!r}: unknown sharding {kind!r}; expected one of "
                       f"{SHARDING_TYPES}")
    placements[t.name] = TablePlacement(t.name, kind, groups)
  plan = ShardingPlan(num_devices, num_hosts, tuple(placements[t.name] for t in tables),
                      tuple(tables), tuple(lookups[t.name] for t in tables), memory_budget)
  if memory_budget and (plan.device_bytes() > memory_budget).any():
    raise ValueError("embedding tables do not fit the per-device memory budget of "
                     f"{_mib(memory_budget)}; raise the budget, use more devices, or make "
                     f"tables smaller:\n{plan.describe()}")
  return plan


def _divisor_at_most(dim: int, k: int) -> int:
  """The largest divisor of ``dim`` that is <= k (at least 1)."""
  k = max(1, k)
  while dim % k:
    k -= 1
  return k
