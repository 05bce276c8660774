"""Dynamic embedding tables: one device hash table per shard, inside the jitted step.

A dynamic table (``TableSpec(rows=None, dynamic=DynamicSpec(...))``) is row-sharded over every
device of the mesh; each device holds one ``hash_table.HashTableState`` of ``capacity /
devices`` rows (rounded up to a power of two). All of a step's dynamic work runs in
``jax.shard_map`` (every mesh axis manual, the batch split over all devices):

  forward_train, per table: route each ID to its owner by ``hash32(id, table salt) % devices``
    (the hash row-wise static tables route with, ``routing.hash_u64_pair``) -> per-destination
    buckets in batch order -> all_to_all -> on the owner: ``maybe_evict`` (every K steps or past
    a load factor), then ``find_or_insert`` (admission, inserts, full-table policy) -> gather
    rows (-1, i.e. not admitted or rejected, reads zeros) -> all_to_all back -> pool bags.
  update (the backward), per table: per-occurrence gradients -> the same buckets ->
    all_to_all to owners -> ``stacked.sparse_update`` (dedup by row, segment-sum, the table's
    row-wise optimizer on values and slots). Rows of -1 take no update.

Why not a custom_vjp like ``ShardedEmbedding.lookup``: the forward itself changes the state
(inserts, evictions, counters, all integer arrays), and integer leaves cannot travel as a
custom_vjp cotangent. So a step calls ``forward_train`` (new state, features, residuals,
stats), differentiates the dense model w.r.t. the features, and calls ``update``.

Owners see their queries in global batch order whatever the mesh size, and initial rows are
a hash of (ID, column, table seed), so one device and eight give the same values and slots for
every ID (row positions differ; compare with ``export``).
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


class DynamicEmbedding(MeshEngine):
  """Dynamic tables over a mesh: the same surface as ``ShardedEmbedding`` where a train step
  needs it (``init``, ``forward``, ``state_shardings``, ``batch_sharding``, ``check_batch``),
  plus ``forward_train`` / ``update`` (see the module docstring) and ``export``.

  Args:
    tables, features: the specs; every table a feature reads must be dynamic.
    mesh: the batch and every table are split over all its axes.
    capacity_factor: None (buckets never overflow) or a bucket size relative to the mean
      requests per destination; requests past a full bucket read zeros, are not updated, and
      are counted in the ``overflow`` stat.
  """

  is_dynamic = True

  def __init__(self, tables: Sequence[TableSpec], features: Sequence[FeatureSpec], mesh, *,
               batch_size: int = 1, capacity_factor: float | None = None):
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
                       "tables only (TableSpec(rows=None, dynamic=DynamicSpec(...))); mixing "
                       "static and dynamic tables in one model is not supported yet")
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

  # ---- state ---------------------------------------------------------------------------------

  def state_specs(self) -> dict:
    """Every leaf of every table's state is [devices, ...]: split on its leading axis."""
    return {n: jax.tree.map(lambda _: P(self.axes), jax.eval_shape(lambda: ht.init(s)))
            for n, s in self.specs.items()}


  def init(self, seed: int | jax.Array = 0) -> dict:
    """Empty tables ({table: HashTableState with a leading device axis}). Initial rows are a
    hash of (ID, column, table name), so ``seed`` is unused: the same on every mesh."""
    del seed
    nd = self.num_devices

    @functools.partial(jax.jit, out_shardings=self.state_shardings())
    def make():
      return {n: jax.tree.map(lambda x: jnp.broadcast_to(x, (nd,) + x.shape), ht.init(s))
              for n, s in self.specs.items()}

    return make()

  def check_batch(self, batch: Batch) -> Batch:
    return batch  # dynamic tables take every 64-bit ID

  def _check_batch_shape(self, ids):
    if ids.ndim != 3 or ids.shape[1] != self.layout.num_columns or ids.shape[2] != 2:
      raise ValueError(f"ids must be [batch, {self.layout.num_columns}, 2] uint32 (lo, hi) "
                       f"pairs for features {self.layout.names}; got shape {ids.shape}")
    if ids.shape[0] % self.num_devices:
      raise ValueError(f"batch size {ids.shape[0]} is not divisible by the {self.num_devices} "
                       "devices of the mesh")

  # ---- routing -------------------------------------------------------------------------------

  def _capacity(self, m: int) -> int:
    """Bucket size per destination for ``m`` requests a device (m: never overflows)."""
    if self.capacity_factor is None or self.num_devices == 1:
      return m
    return max(1, min(m, int(np.ceil(self.capacity_factor * m / self.num_devices / 8) * 8)))

  def _route(self, name: str, ids, mask):
    """Buckets each occurrence by owner (batch order kept) and sends the keys.

    Returns (slot [m] send position or nd*cap, keys [nd*cap, 2] and valid [nd*cap] received
    on this owner, overflow count, lane mask [b, L]).
    """
    ln = self.lanes[name]
    nd = self.num_devices
    valid = _cols(mask, ln.cols)
    b, lanes = valid.shape
    m = b * lanes
    flat = _cols(ids, ln.cols).reshape(m, 2)
    v = valid.reshape(m)
    cap = self._capacity(m)
    if nd == 1:
      dst = jnp.zeros((m,), jnp.int32)
      pos = jnp.arange(m, dtype=jnp.int32)
    else:
      salt = jnp.uint32(routing.table_salt(name))
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
    if nd > 1:
      send = jax.lax.all_to_all(send.reshape(nd, cap, 3), self.axes, 0, 0,
                                tiled=True).reshape(nd * cap, 3)
    return slot, send[:, :2], send[:, 2] > 0, overflow, valid

  def _send_back(self, rows_vals, slot, shape):
    """Owner-side [nd*cap, D] -> sender-side per occurrence [*shape, D] (dropped: zeros)."""
    nd = self.num_devices
    d = rows_vals.shape[-1]
    if nd > 1:
      rows_vals = jax.lax.all_to_all(rows_vals.reshape(nd, -1, d), self.axes, 0, 0,
                                     tiled=True).reshape(-1, d)
    occ = jnp.take(rows_vals, slot, axis=0, mode="fill", fill_value=0)
    return occ.reshape(*shape, d)

  def _pool(self, name: str, occ, valid, feats: list):
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

  def _forward_local(self, state: dict, ids, mask, step, train: bool):
    feats = [None] * len(self.features)
    res, stats, new_state = {}, {}, {}
    for name, spec in self.specs.items():
      st = jax.tree.map(lambda x: x[0], state[name])
      slot, keys, kvalid, overflow, valid = self._route(name, ids, mask)
      if train:
        evicted = jnp.zeros((), jnp.int32)
        if self.policies[name] is not None:
          d = self.table_specs[name].dynamic
          st, es = ht.maybe_evict(spec, st, step, self.policies[name],
                                  every_steps=d.evict_every_steps,
                                  above_load_factor=d.evict_above_load_factor)
          evicted = es.evicted
        rng = None
        if spec.admission is not None and spec.admission.uses_rng:
          rng = jax.random.fold_in(jax.random.key(spec.seed), step)  # same on every device
        st, rows, s = ht.find_or_insert(spec, st, keys, step, kvalid, rng=rng)
        new_state[name] = jax.tree.map(lambda x: x[None], st)
        counts = [s.size, s.inserted, s.not_admitted, s.rejected, s.insert_failures,
                  s.evicted + evicted, s.hits, s.lookups, overflow]
      else:
        rows, s = ht.find(spec, st, keys, kvalid)
        counts = [s.size, 0, 0, 0, 0, 0, s.hits, s.lookups, overflow]
      vals = ht.gather_values(st, rows)   # not admitted / rejected / padding: zeros
      self._pool(name, self._send_back(vals, slot, valid.shape), valid, feats)
      res[name] = {"slot": slot[None], "rows": rows[None], "valid": valid}
      stats[name] = (jnp.stack([jnp.asarray(c, jnp.int32) for c in counts]),
                     s.probe_histogram)
    stats = jax.lax.psum(stats, self.axes)
    return new_state, feats, res, stats

  def _run_forward(self, state, ids, mask, step, train: bool):
    self._check_batch_shape(ids)
    sp = P(self.axes)
    feat_specs = [sp] * len(self.features)
    fn = jax.shard_map(
        lambda st, i, mk, s: self._forward_local(st, i, mk, s, train), mesh=self.mesh,
        in_specs=(sp, sp, sp, P()),
        out_specs=(sp if train else P(), feat_specs, sp, P()), check_vma=False)
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
    """(features, residuals, stats): a read-only lookup (eval); unknown IDs read zeros."""
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

  def _update_local(self, state: dict, res: dict, g_feats, step):
    nd = self.num_devices
    out = {}
    for name, spec in self.specs.items():
      st = jax.tree.map(lambda x: x[0], state[name])
      r = res[name]
      g = self._lane_grads(name, g_feats, r["valid"])
      g = g.reshape(-1, g.shape[-1])
      rows = r["rows"][0]
      send = jnp.zeros((rows.shape[0], g.shape[-1]), jnp.float32).at[r["slot"][0]].set(
          g, mode="drop", unique_indices=True)
      if nd > 1:
        send = jax.lax.all_to_all(send.reshape(nd, -1, g.shape[-1]), self.axes, 0, 0,
                                  tiled=True).reshape(-1, g.shape[-1])
      ok = rows >= 0
      values, slots = sparse_update(self.table_specs[name].optimizer, st.values, st.slots,
                                    jnp.where(ok, rows, spec.capacity), send, ok, step)
      st = dataclasses.replace(st, values=values, slots=slots)
      out[name] = jax.tree.map(lambda x: x[None], st)
    return out

  def update(self, state: dict, residuals, g_feats, step) -> dict:
    """The backward: route feature gradients to owners, apply each table's optimizer to the
    rows the forward found (rows of -1 are untouched)."""
    sp = P(self.axes)
    fn = jax.shard_map(self._update_local, mesh=self.mesh,
                       in_specs=(sp, sp, [sp] * len(self.features), P()), out_specs=sp,
                       check_vma=False)
    return fn(state, residuals, list(g_feats), jnp.asarray(step, jnp.int32))

  # ---- host-side views -----------------------------------------------------------------------

  def export(self, state: dict) -> dict:
    """{table: {"keys": uint64 [n], "values", "slots", "frequency", "last_seen"}} of every live
    entry over all shards, sorted by key (mesh-independent, for tests and export)."""
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
    return out
