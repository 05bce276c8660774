"""Dynamic embedding tables: one device hash table per shard, inside the jitted step.

A dynamic table (``TableSpec(rows=None, dynamic=DynamicSpec(...))``) is row-sharded over every
device of the mesh; each device holds one ``hash_table.HashTableState`` of ``capacity /
devices`` rows (rounded up to a power of two). All of a step's dynamic work runs in
``jax.shard_map`` (every mesh axis manual, the batch split over all devices):

  forward_train, per table: route each ID to its owner by ``hash32(id, table salt) % devices``
    (the hash row-wise static tables route with, ``routing.hash_u64_pair``) -> per-destination
    buckets in batch order -> all_to_all -> on the owner: ``maybe_evict`` (every K steps or past
    a load factor), then ``find_or_insert`` (admission, inserts, full-table policy) -> gather
    rows (-1, i.e. not admitted or rejected, reads the default row) -> all_to_all back -> pool.
  update (the backward), per table: per-occurrence gradients -> the same buckets ->
    all_to_all to owners -> ``stacked.sparse_update`` (dedup by row, segment-sum, the table's
    row-wise optimizer on values and slots). Rows of -1 take no update; with
    ``DynamicSpec(default_row="trainable")`` their gradient trains the table's default row.

Tables of the same shape (capacity, dim, optimizer, policies: ``TableGroup``) run as one
program: their states are stacked on a leading table axis and the per-table code above runs
in a ``lax.map`` over it (one compiled body), with the table's salt and init scale as traced
inputs, so the 26 tables of a Criteo-like model compile a few hash-table programs instead of
26 (one all_to_all per group, too). A group of one table runs without the loop. Opt-in
(``group_tables=True``): it compiles ~1.5x faster but steps ~2x slower on CPU, since the
states are stacked and unstacked every step (benchmarks/dynamic_compile.py).

Why not a custom_vjp like ``ShardedEmbedding.lookup``: the forward itself changes the state
(inserts, evictions, counters, all integer arrays), and integer leaves cannot travel as a
custom_vjp cotangent. So a step calls ``forward_train`` (new state, features, residuals,
stats), differentiates the dense model w.r.t. the features, and calls ``update``.

Owners see their queries in global batch order whatever the mesh size, and initial rows are
a hash of (ID, column, table seed), so one device and eight give the same values and slots for
every ID (row positions differ; compare with ``export``). A trainable default row sums its
gradient over devices (a psum): equal across meshes up to float summation order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.data.batch import Batch, SparseLayout
from jaxrec.embedding import hash_table as ht
from jaxrec.embedding import optimizers, routing
from jaxrec.embedding.engine import MeshEngine
from jaxrec.embedding.admission import AdmissionPolicy
from jaxrec.embedding.specs import FeatureSpec, TableSpec, validate
from jaxrec.embedding.stacked import sparse_update

# Per-table counters summed over shards each step (order of the stats vector).
STAT_NAMES = ("size", "admitted", "not_admitted", "rejected", "insert_failures", "evicted",
              "hits", "lookups", "overflow")


def _next_pow2(n: int) -> int:
  return 1 << max(3, int(np.ceil(np.log2(max(n, 1)))))


def _cols(x, cols: np.ndarray):
  """x[:, cols] as a slice when the columns are contiguous (no gather)."""
  if len(cols) and np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))):
    return x[:, int(cols[0]):int(cols[0]) + len(cols)]
  return jnp.take(x, jnp.asarray(cols), axis=1)


@dataclasses.dataclass(frozen=True)
class _TableLanes:
  """The batch columns one table reads; groups: (feature index, first lane, end lane)."""

  cols: np.ndarray
  groups: tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class DynamicPlan:
  """Where the dynamic tables live (every table row-sharded over every device)."""

  shards: int
  capacity_per_shard: dict

  def describe(self) -> str:
    return "\n".join(f"  {n}: dynamic, {self.shards} shards x {c:,} slots"
                     for n, c in self.capacity_per_shard.items())


def hash_spec(t: TableSpec, shards: int) -> ht.HashTableSpec:
  """The per-shard hash table of dynamic table ``t`` on ``shards`` devices."""
  d = t.dynamic
  if t.initializer == "normal":
    raise ValueError(f"table {t.name!r}: dynamic tables start uniform or zeros, not normal; "
                     "set TableSpec(initializer='uniform')")
  admission = None
  if d.min_count > 1 or d.admit_probability < 1.0:
    admission = AdmissionPolicy(min_count=d.min_count, probability=d.admit_probability,
                                sketch_width=d.sketch_width)
  slots = tuple(ht.SlotSpec(k, shape, jnp.float32, v)
                for k, (shape, v) in optimizers.slot_shapes(t.optimizer, t.dim).items())
  return ht.HashTableSpec(
      name=t.name, capacity=_next_pow2(-(-d.capacity // shards)), dim=t.dim,
      dtype=jnp.dtype(t.dtype), slots=slots,
      initializer="zeros" if t.initializer == "zeros" else "hash_uniform",
      init_scale=t.scale, seed=routing.table_salt(t.name), max_probes=d.max_probes,
      on_full=d.on_full, eviction_score="lru", admission=admission)


def eviction_policy(t: TableSpec) -> ht.EvictionPolicy | None:
  d = t.dynamic
  if (d.steps_to_live, d.min_frequency, d.min_l2_norm, d.max_load_factor) == (None,) * 4:
    return None
  return ht.EvictionPolicy(steps_to_live=d.steps_to_live, min_frequency=d.min_frequency,
                           min_l2_norm=d.min_l2_norm, max_load_factor=d.max_load_factor)


@dataclasses.dataclass(frozen=True)
class TableGroup:
  """Dynamic tables that run as one program: the same hash-table shape (capacity, dim, slots,
  admission, full-table policy), optimizer, eviction policy, lanes a row and default row.
  They differ only in their salt (routing, row init, admission coin) and init scale, which
  the program takes per table."""

  name: str
  tables: tuple[str, ...]
  spec: ht.HashTableSpec      # the first table's (its seed and init_scale are replaced)
  salts: np.ndarray           # uint32 [T]
  scales: np.ndarray          # float32 [T]


DEFAULTS = "@default"  # state key of the trainable default rows: {table: {"values", "slots"}}


class DynamicEmbedding(MeshEngine):
  """Dynamic tables over a mesh: the same surface as ``ShardedEmbedding`` where a train step
  needs it (``init``, ``forward``, ``state_shardings``, ``batch_sharding``, ``check_batch``),
  plus ``forward_train`` / ``update`` (see the module docstring) and ``export``.

  Args:
    tables, features: the specs; every table a feature reads must be dynamic.
    mesh: the batch and every table are split over all its axes.
    capacity_factor: None (buckets never overflow) or a bucket size relative to the mean
      requests per destination; requests past a full bucket read the default row (zeros
      unless trainable), are not updated, and are counted in the ``overflow`` stat.
    group_tables: run same-shaped tables as one program (``TableGroup``): the same results,
      about 1.5x less compile time for 26 tables, but (measured on CPU) about 2x slower steps,
      because the group's states are stacked and unstacked every step. Off by default.
  """

  is_dynamic = True

  def __init__(self, tables: Sequence[TableSpec], features: Sequence[FeatureSpec], mesh, *,
               batch_size: int = 1, capacity_factor: float | None = None,
               group_tables: bool = False):
    tables, features = list(tables), list(features)
    validate(tables, features)
    del batch_size  # the buckets are sized from the traced batch
    self.mesh = mesh
    self.axes = tuple(mesh.axis_names)
    self.num_devices = int(mesh.size)
    self.capacity_factor = capacity_factor
    used = {f.table for f in features}
    self.table_specs = {t.name: t for t in tables if t.name in used}
    static = [n for n, t in self.table_specs.items() if t.dynamic is None]
    if static:
      raise ValueError(f"tables {static} are static (rows set): DynamicEmbedding holds dynamic "
                       "tables only (TableSpec(rows=None, dynamic=DynamicSpec(...))); a model "
                       "with both kinds uses jaxrec.embedding.mixed.MixedEmbedding")
    if DEFAULTS in self.table_specs:
      raise ValueError(f"table name {DEFAULTS!r} is reserved for the default rows; rename it")
    self.features = tuple(features)
    self.layout = SparseLayout(tuple(f.name for f in features),
                               tuple(f.max_ids for f in features))
    self.specs = {n: hash_spec(t, self.num_devices) for n, t in self.table_specs.items()}
    self.policies = {n: eviction_policy(t) for n, t in self.table_specs.items()}
    self.plan = DynamicPlan(self.num_devices, {n: s.capacity for n, s in self.specs.items()})
    col0 = self.layout.offsets
    self.lanes = {}
    for n in self.table_specs:
      cols, groups = [], []
      for fi, f in enumerate(features):
        if f.table == n:
          l0 = len(cols)
          cols += list(range(col0[fi], col0[fi + 1]))
          groups.append((fi, l0, len(cols)))
      self.lanes[n] = _TableLanes(np.asarray(cols, np.int32), tuple(groups))
    self.feature_dims = tuple(self.table_specs[f.table].dim for f in features)
    self.dim = self.feature_dims[0] if len(set(self.feature_dims)) == 1 else None
    self.trainable_default = tuple(n for n, t in self.table_specs.items()
                                   if t.dynamic.default_row == "trainable")
    self.table_groups = self._group_tables(group_tables)
    self.groups = {g.name: g.tables for g in self.table_groups}

  def _group_tables(self, group: bool) -> tuple[TableGroup, ...]:
    """Same-shaped tables together (first-seen order), so 26 tables cost a few programs."""
    by_key: dict[tuple, list[str]] = {}
    for n, t in self.table_specs.items():
      d = t.dynamic
      key = (dataclasses.replace(self.specs[n], name="", seed=0, init_scale=0.0), t.optimizer,
             self.policies[n], d.evict_every_steps, d.evict_above_load_factor,
             len(self.lanes[n].cols), d.default_row, None if group else n)
      by_key.setdefault(key, []).append(n)
    out = []
    for i, names in enumerate(by_key.values()):
      s = self.specs[names[0]]
      out.append(TableGroup(
          f"group{i}_c{s.capacity}_d{s.dim}", tuple(names), s,
          np.asarray([self.specs[n].seed for n in names], np.uint32),
          np.asarray([self.specs[n].init_scale for n in names], np.float32)))
    return tuple(out)

  # ---- state ---------------------------------------------------------------------------------

  def _default_row(self, name: str) -> dict:
    t = self.table_specs[name]
    return {"values": jnp.zeros((t.dim,), jnp.dtype(t.dtype)),
            "slots": {k: jnp.full(shape, v, jnp.float32)
                      for k, (shape, v) in optimizers.slot_shapes(t.optimizer, t.dim).items()}}

  def state_specs(self) -> dict:
    """Every leaf of every table's state is [devices, ...]: split on its leading axis. The
    trainable default rows (``DEFAULTS``) are replicated."""
    out = {n: jax.tree.map(lambda _: P(self.axes), jax.eval_shape(lambda: ht.init(s)))
           for n, s in self.specs.items()}
    if self.trainable_default:
      out[DEFAULTS] = {n: jax.tree.map(lambda _: P(), jax.eval_shape(
          functools.partial(self._default_row, n))) for n in self.trainable_default}
    return out

  def init(self, seed: int | jax.Array = 0) -> dict:
    """Empty tables ({table: HashTableState with a leading device axis}, plus ``DEFAULTS``:
    zero default rows). Initial rows are a hash of (ID, column, table name), so ``seed`` is
    unused: the same on every mesh."""
    del seed
    nd = self.num_devices

    @functools.partial(jax.jit, out_shardings=self.state_shardings())
    def make():
      out = {n: jax.tree.map(lambda x: jnp.broadcast_to(x, (nd,) + x.shape), ht.init(s))
             for n, s in self.specs.items()}
      if self.trainable_default:
        out[DEFAULTS] = {n: self._default_row(n) for n in self.trainable_default}
      return out

    return make()

  def check_batch(self, batch: Batch) -> Batch:
    return batch  # dynamic tables take every 64-bit ID

  # ---- one program per group -----------------------------------------------------------------

  def _map_tables(self, g: TableGroup, fn, *args):
    """``fn(spec, *args)`` for every table of ``g``; each arg has a leading table axis. One
    table: called directly; more: ``lax.map`` (one compiled body, the table's seed and init
    scale traced). Not vmap: batched while-loop predicates and conds turn every probe round
    and eviction into selects over whole tables (measured slower to compile and to run)."""
    if len(g.tables) == 1:
      out = fn(self.specs[g.tables[0]], *jax.tree.map(lambda x: x[0], args))
      return jax.tree.map(lambda x: x[None], out)

    def one(a):
      salt, scale, *rest = a
      return fn(dataclasses.replace(g.spec, seed=salt, init_scale=scale), *rest)

    return jax.lax.map(one, (jnp.asarray(g.salts), jnp.asarray(g.scales), *args))

  @staticmethod
  def _stack(state: dict, g: TableGroup):
    """The group's local states ([1, ...] each) as one [T, ...] state."""
    if len(g.tables) == 1:
      return state[g.tables[0]]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[state[n] for n in g.tables])

  @staticmethod
  def _unstack(st, g: TableGroup, out: dict):
    for i, n in enumerate(g.tables):
      out[n] = jax.tree.map(lambda x: x[i:i + 1], st)

  def _exchange(self, x):
    """[T, nd * cap, W] buckets per destination -> the same from every source (all_to_all)."""
    nd = self.num_devices
    if nd == 1:
      return x
    t, n, w = x.shape
    return jax.lax.all_to_all(x.reshape(t, nd, n // nd, w), self.axes, 1, 1,
                              tiled=True).reshape(t, n, w)

  # ---- routing -------------------------------------------------------------------------------

  def _capacity(self, m: int) -> int:
    """Bucket size per destination for ``m`` requests a device (m: never overflows)."""
    if self.capacity_factor is None or self.num_devices == 1:
      return m
    return max(1, min(m, int(np.ceil(self.capacity_factor * m / self.num_devices / 8) * 8)))

  def _bucket(self, spec: ht.HashTableSpec, flat, v):
    """Buckets one table's occurrences by owner, batch order kept (no communication yet).

    flat [m, 2] IDs, v [m] valid. Returns (slot [m] send position or nd*cap, send [nd*cap, 3]
    keys and a valid word, overflow count). Owner: ``hash32(id, salt) % devices``.
    """
    nd = self.num_devices
    m = flat.shape[0]
    cap = self._capacity(m)
    if nd == 1:
      dst = jnp.zeros((m,), jnp.int32)
      pos = jnp.arange(m, dtype=jnp.int32)
    else:
      salt = jnp.asarray(spec.seed, jnp.uint32)  # = routing.table_salt(name), see hash_spec
      dst = (routing.hash_u64_pair(flat, salt) % jnp.uint32(nd)).astype(jnp.int32)
      onehot = ((dst[:, None] == jnp.arange(nd, dtype=jnp.int32)[None, :]) & v[:, None])
      # Rank among this device's requests to the same owner, in batch order.
      pos = jnp.take_along_axis(jnp.cumsum(onehot.astype(jnp.int32), axis=0),
                                dst[:, None], axis=1)[:, 0] - 1
    ok = v & (pos < cap)
    overflow = jnp.sum(v & ~ok, dtype=jnp.int32)
    slot = jnp.where(ok, dst * cap + pos, nd * cap)
    packed = jnp.concatenate([flat, jnp.ones((m, 1), jnp.uint32)], axis=1)
    send = jnp.zeros((nd * cap, 3), jnp.uint32).at[slot].set(packed, mode="drop",
                                                             unique_indices=True)
    return slot, send, overflow

  def _group_lanes(self, g: TableGroup, ids, mask):
    """The group's IDs [T, m, 2], valid [T, m] and lane mask [T, b, L]."""
    valid = jnp.stack([_cols(mask, self.lanes[n].cols) for n in g.tables])
    flat = jnp.stack([_cols(ids, self.lanes[n].cols) for n in g.tables])
    t, b, lanes = valid.shape
    return flat.reshape(t, b * lanes, 2), valid.reshape(t, b * lanes), valid

  def _pool(self, name: str, occ, valid, feats: list, default=None):
    """Pools one table's per-occurrence rows [b, L, D] into its features. ``default``: the
    trainable default row, read where the owner found no row (``occ[..., D]`` is 0)."""
    d = self.table_specs[name].dim
    if default is not None:
      occ = jnp.where(occ[..., d:] > 0, occ[..., :d], default.astype(occ.dtype))
    occ = occ.astype(jnp.float32) * valid[..., None]
    for fi, l0, l1 in self.lanes[name].groups:
      e = occ[:, l0:l1]
      pooling = self.features[fi].pooling
      if pooling == "none":
        feats[fi] = e
      elif pooling == "sum":
        feats[fi] = e.sum(1)
      else:
        cnt = valid[:, l0:l1].sum(1, keepdims=True).astype(jnp.float32)
        feats[fi] = e.sum(1) / jnp.maximum(cnt, 1.0)

  # ---- forward -------------------------------------------------------------------------------

  def _evict(self, g: TableGroup, st, step):
    """``maybe_evict`` of every table of the group; returns (state, evicted [T])."""
    policy = self.policies[g.tables[0]]
    if policy is None:
      return st, jnp.zeros((len(g.tables),), jnp.int32)
    d = self.table_specs[g.tables[0]].dynamic

    def one(spec, s):
      s, es = ht.maybe_evict(spec, s, step, policy, every_steps=d.evict_every_steps,
                             above_load_factor=d.evict_above_load_factor)
      return s, es.evicted

    return self._map_tables(g, one, st)

  def _forward_local(self, state: dict, ids, mask, step, train: bool):
    feats = [None] * len(self.features)
    res, stats, new_state = {}, {}, {}
    defaults = state.get(DEFAULTS, {})
    for g in self.table_groups:
      st = self._stack(state, g)
      flat, v, valid = self._group_lanes(g, ids, mask)
      slot, send, overflow = self._map_tables(g, self._bucket, flat, v)
      send = self._exchange(send)
      keys, kvalid = send[..., :2], send[..., 2] > 0
      with_flag = g.tables[0] in defaults

      def owner(spec, st, keys, kvalid):
        if train:
          rng = None
          if spec.admission is not None and spec.admission.uses_rng:
            # The same on every device.
            rng = jax.random.fold_in(jax.random.key(spec.seed), step)
          st, rows, s = ht.find_or_insert(spec, st, keys, step, kvalid, rng=rng)
          counts = [s.size, s.inserted, s.not_admitted, s.rejected, s.insert_failures,
                    s.evicted, s.hits, s.lookups]
        else:
          rows, s = ht.find(spec, st, keys, kvalid)
          counts = [s.size, 0, 0, 0, 0, 0, s.hits, s.lookups]
        vals = ht.gather_values(st, rows)   # not admitted / rejected / padding: zeros
        if with_flag:  # tells the sender which lookups read the default row
          vals = jnp.concatenate([vals, (rows >= 0)[:, None].astype(vals.dtype)], axis=1)
        counts = jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])
        return st, rows, vals, counts, s.probe_histogram

      evicted = 0
      if train:
        st, evicted = self._evict(g, st, step)
      st, rows, vals, counts, hist = self._map_tables(g, owner, st, keys, kvalid)
      back = self._exchange(vals)
      occ = jax.vmap(lambda x, s: jnp.take(x, s, axis=0, mode="fill", fill_value=0))(back, slot)
      b, lanes = valid.shape[1:]
      counts = counts.at[:, 5].add(evicted)
      for i, name in enumerate(g.tables):
        self._pool(name, occ[i].reshape(b, lanes, -1), valid[i], feats,
                   defaults[name]["values"] if with_flag else None)
        stats[name] = (jnp.concatenate([counts[i], overflow[i][None]]), hist[i])
      res[g.name] = {"slot": slot[None], "rows": rows[None], "valid": valid[None]}
      if with_flag:
        d = g.spec.dim
        res[g.name]["has"] = (occ[..., d] > 0).reshape(valid.shape)[None]
      if train:
        self._unstack(st, g, new_state)
    if train and defaults:
      new_state[DEFAULTS] = defaults
    stats = jax.lax.psum(stats, self.axes)
    return new_state, feats, res, stats

  def _run_forward(self, state, ids, mask, step, train: bool):
    self._check_batch_shape(ids)
    sp = P(self.axes)
    specs = self.state_specs()
    feat_specs = [sp] * len(self.features)
    fn = jax.shard_map(
        lambda st, i, mk, s: self._forward_local(st, i, mk, s, train), mesh=self.mesh,
        in_specs=(specs, sp, sp, P()),
        out_specs=(specs if train else P(), feat_specs, sp, P()), check_vma=False)
    new_state, feats, res, raw = fn(state, ids, mask, jnp.asarray(step, jnp.int32))
    return new_state, feats, res, self._stats(raw)

  def _stats(self, raw: dict) -> dict:
    """{"<table>/<stat>": scalar} with load factor and mean probe length (buckets per hit)."""
    out = {}
    for name, (counts, hist) in raw.items():
      for k, c in zip(STAT_NAMES, counts):
        out[f"{name}/{k}"] = c
      out[f"{name}/load_factor"] = counts[0].astype(jnp.float32) / (
          self.specs[name].capacity * self.num_devices)
      out[f"{name}/probe_mean"] = jnp.sum(
          hist * jnp.arange(1, hist.shape[0] + 1)) / jnp.maximum(jnp.sum(hist), 1)
    return out

  def forward_train(self, state: dict, ids, mask, step):
    """(new state, features, residuals, stats): the training lookup, inserting admitted IDs
    and evicting by policy. ``step``: the 1-based global step (stamped into last_seen)."""
    return self._run_forward(state, ids, mask, step, train=True)

  def forward(self, state: dict, ids, mask):
    """(features, residuals, stats): a read-only lookup (eval); unknown IDs read the default
    row (zeros unless trainable)."""
    _, feats, res, stats = self._run_forward(state, ids, mask, 0, train=False)
    return feats, res, stats

  # ---- backward + update -----------------------------------------------------------------------

  def _lane_grads(self, name: str, g_feats, valid):
    b = valid.shape[0]
    parts = []
    for fi, l0, l1 in self.lanes[name].groups:
      g = g_feats[fi].astype(jnp.float32)
      v = valid[:, l0:l1].astype(jnp.float32)
      pooling = self.features[fi].pooling
      if pooling == "mean":
        v = v / jnp.maximum(v.sum(1, keepdims=True), 1.0)
      if pooling != "none":
        g = jnp.broadcast_to(g[:, None, :], (b, l1 - l0, g.shape[-1]))
      parts.append(g * v[..., None])
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

  def _update_default(self, name: str, row: dict, g, has, valid, step) -> dict:
    """The default row's update: the gradient summed over the lookups that read it (all
    devices), through the table's optimizer; untouched rows keep their value (lazy, like
    every sparse row)."""
    miss = valid & ~has
    g_sum = jax.lax.psum(jnp.sum(g * miss[..., None], axis=(0, 1)), self.axes)
    touched = jax.lax.psum(jnp.sum(miss, dtype=jnp.int32), self.axes) > 0
    opt = self.table_specs[name].optimizer
    w, s = optimizers.apply_rows(opt, row["values"][None], {k: v[None] for k, v in
                                                             row["slots"].items()},
                                 g_sum[None], step)
    keep = lambda new, old: jnp.where(touched, new[0].astype(old.dtype), old)
    return {"values": keep(w, row["values"]),
            "slots": {k: keep(s[k], v) for k, v in row["slots"].items()}}

  def _update_local(self, state: dict, res: dict, g_feats, step):
    out = {}
    defaults = state.get(DEFAULTS, {})
    new_defaults = {}
    for g in self.table_groups:
      st = self._stack(state, g)
      r = res[g.name]
      slot, rows, valid = r["slot"][0], r["rows"][0], r["valid"][0]
      grads = jnp.stack([self._lane_grads(n, g_feats, valid[i])
                         for i, n in enumerate(g.tables)])       # [T, b, L, D]
      t, b, lanes, dim = grads.shape
      send = jax.vmap(lambda s, gr: jnp.zeros((rows.shape[1], dim), jnp.float32).at[s].set(
          gr, mode="drop", unique_indices=True))(slot, grads.reshape(t, b * lanes, dim))
      send = self._exchange(send)
      opt = self.table_specs[g.tables[0]].optimizer

      def apply(spec, st, rows, send):
        ok = rows >= 0
        values, slots = sparse_update(opt, st.values, st.slots,
                                      jnp.where(ok, rows, spec.capacity), send, ok, step)
        return dataclasses.replace(st, values=values, slots=slots)

      st = self._map_tables(g, apply, st, rows, send)
      self._unstack(st, g, out)
      if g.tables[0] in defaults:
        for i, n in enumerate(g.tables):
          new_defaults[n] = self._update_default(n, defaults[n], grads[i], r["has"][0][i],
                                                 valid[i], step)
    if defaults:
      out[DEFAULTS] = new_defaults
    return out

  def update(self, state: dict, residuals, g_feats, step) -> dict:
    """The backward: route feature gradients to owners, apply each table's optimizer to the
    rows the forward found (rows of -1 are untouched; their gradient goes to a trainable
    default row, if the table has one)."""
    sp = P(self.axes)
    specs = self.state_specs()
    fn = jax.shard_map(self._update_local, mesh=self.mesh,
                       in_specs=(specs, sp, [sp] * len(self.features), P()), out_specs=specs,
                       check_vma=False)
    return fn(state, residuals, list(g_feats), jnp.asarray(step, jnp.int32))

  # ---- host-side views -----------------------------------------------------------------------

  def export(self, state: dict) -> dict:
    """{table: {"keys": uint64 [n], "values", "slots", "frequency", "last_seen"}} of every live
    entry over all shards, sorted by key (mesh-independent, for tests and export); tables
    with a trainable default row also hold "default": {"values", "slots"}."""
    out = {}
    for name, spec in self.specs.items():
      host = jax.device_get(state[name])
      parts = [ht.export_numpy(spec, jax.tree.map(lambda x: x[d], host))
               for d in range(self.num_devices)]
      keys = np.concatenate([p["keys"] for p in parts])
      order = np.argsort(keys, kind="stable")
      cat = lambda k: np.concatenate([p[k] for p in parts])[order]
      out[name] = {"keys": keys[order], "values": cat("values"),
                   "slots": {k: np.concatenate([p["slots"][k] for p in parts])[order]
                             for k in parts[0]["slots"]},
                   "frequency": cat("frequency"), "last_seen": cat("last_seen")}
      if name in state.get(DEFAULTS, {}):
        out[name]["default"] = jax.device_get(state[DEFAULTS][name])
    return out
