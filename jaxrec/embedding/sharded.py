"""The sharded embedding engine: tables spread over a mesh, looked up and updated sparsely.

One ``jax.custom_vjp`` over ``jax.shard_map`` (every mesh axis manual; the batch is split over
all devices):

  forward, per stack:  hash IDs to rows -> owning device and local row -> dedup on the sender
    (sort on one packed int32 key) -> fixed-capacity per-destination buckets -> all_to_all ->
    owners gather rows -> all_to_all back -> expand to occurrences -> pool bags (masked, so
    empty bags give zeros). Data-parallel (replicated) stacks gather locally.
  backward + update, per stack: per-occurrence gradients -> segment-sum per unique row on the
    sender -> all_to_all to owners -> dedup across senders, segment-sum -> fused row-wise
    optimizer on those rows only, scattered in place (the step donates the state). Replicated
    stacks all-gather the deduplicated (row, gradient) pairs and every replica applies the
    same update. No dense ``[rows, dim]`` gradient is ever formed.

The custom_vjp follows jax-tpu-embedding: its backward returns the *updated* state as the
cotangent of the state input, so a train step differentiates w.r.t. (dense params, embedding
state) in one ``value_and_grad`` and takes the state's "gradient" as the new state. The state
must reach the loss only through one ``lookup`` call (any other use would add to that
cotangent).

Bucket capacity: by default every bucket can take all of a device's unique requests to that
destination (overflow is impossible); ``capacity_factor`` shrinks buckets to
``factor * requests / devices`` to save memory and bandwidth, and requests past a full bucket
are dropped (zeros forward, no update) and counted in the ``overflow`` stat, never silently.

Wire precision (``jaxrec.comm.codec``): the gradient all_to_all (and the replicated stacks'
gradient all_gather) can move bf16 / fp16 or per-row-scaled int8 rows instead of fp32, and so
can the forward all_to_all of looked-up rows. Row IDs travel as int32, or as uint16 with
``compact_ids`` where a stack's (or slab's) rows fit. ``dedup=False`` sends every valid
(ID, gradient) lookup instead of one per distinct row (for ablations).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.comm import codec
from jaxrec.data.batch import Batch, SparseLayout
from jaxrec.embedding import optimizers, routing
from jaxrec.embedding.engine import MeshEngine
from jaxrec.embedding.planner import ShardingPlan, plan_sharding
from jaxrec.embedding.routing import fmix32, id_rows, take_rows, unique_inverse
from jaxrec.embedding.specs import FeatureSpec, TableSpec, validate
from jaxrec.embedding.stacked import EmbeddingState, Piece, Stack, build_stacks, sparse_update


@dataclasses.dataclass(frozen=True, eq=False)
class _Lanes:
  """The batch columns a stack reads ("lanes"), with per-lane static constants.

  groups: (feature index, column block, first lane, end lane) of each pooled bag; the lanes of
  one group are contiguous.
  """

  cols: np.ndarray        # [NL] batch column of each lane
  piece: np.ndarray       # [NL] piece (index into stack.pieces)
  salt: np.ndarray        # [NL] uint32
  rows: np.ndarray        # [NL] uint32 rows of the lane's table
  mode: np.ndarray        # [NL] routing.HASHED / INDEX_OR_HASH / INDEX_OR_DROP
  n: np.ndarray           # [NL] devices the lane's piece is row-sharded over
  groups: tuple[tuple[int, int, int, int], ...]
  single: bool            # every group is one lane and pools (fast path, no slicing)

  @property
  def num(self) -> int:
    return len(self.cols)


def _cols(x, cols: np.ndarray):
  """x[:, cols] as a slice when the columns are contiguous (no gather)."""
  if len(cols) and np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))):
    return x[:, int(cols[0]):int(cols[0]) + len(cols)]
  return jnp.take(x, jnp.asarray(cols), axis=1)


def _uniform_bits(seed, salt, r, cols):
  """Uniform(0, 1) float32 from (seed, table salt, row, column): mesh-independent init."""
  x = fmix32((r * jnp.uint32(0x9E3779B1)) ^ salt ^ seed)
  x = fmix32(x ^ (cols * jnp.uint32(0x85EBCA77) + jnp.uint32(0x27D4EB2F)))
  return ((x >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24)), x


class ShardedEmbedding(MeshEngine):
  """Static plan (which lanes read which rows of which stack, on which devices) plus pure
  functions of the arrays: ``init``, ``lookup`` (the custom_vjp), ``forward``, ``update``.

  Args:
    tables, features: the specs (tables no feature reads are dropped).
    mesh: a ``jax.sharding.Mesh``; the batch and every sharded stack are split over all its
      axes (``("host", "local")`` makes ``table_row_wise`` place tables per host).
    plan: a ShardingPlan; None runs the planner with ``batch_size`` and ``planner`` kwargs.
    capacity_factor: None (buckets never overflow) or a bucket size relative to the mean
      requests per destination (e.g. 2.0).
    precision: "fp32" | "bf16" | "fp16" | "int8": rows of the gradient exchange on the wire.
    forward_precision: the same for the rows the forward all_to_all returns.
    dedup: False sends every lookup, not one request per distinct row (ablation).
    compact_ids: row IDs travel as uint16 where every row index (and the padding sentinel)
      fits, else int32.
  """

  def __init__(self, tables: Sequence[TableSpec], features: Sequence[FeatureSpec], mesh,
               plan: ShardingPlan | None = None, *, batch_size: int = 1,
               capacity_factor: float | None = None, precision: str = "fp32",
               forward_precision: str = "fp32", dedup: bool = True, compact_ids: bool = False,
               **planner):
    tables, features = list(tables), list(features)
    validate(tables, features)
    self.precision = codec.check_precision(precision, "embedding precision")
    self.forward_precision = codec.check_precision(forward_precision,
                                                   "embedding forward precision")
    self.dedup = bool(dedup)
    self.compact_ids = bool(compact_ids)
    self.mesh = mesh
    self.axes = tuple(mesh.axis_names)
    self.num_devices = int(mesh.size)
    self.num_hosts = int(mesh.shape["host"]) if self.axes == ("host", "local") else 1
    self.capacity_factor = capacity_factor
    used = {f.table for f in features}
    self.table_specs = {t.name: t for t in tables if t.name in used}
    dynamic = [n for n, t in self.table_specs.items() if t.dynamic is not None]
    if dynamic:
      raise ValueError(f"tables {dynamic} are dynamic (rows=None): ShardedEmbedding holds "
                       "fixed-size tables; use jaxrec.embedding.dynamic.DynamicEmbedding")
    self.features = tuple(features)
    self.layout = SparseLayout(tuple(f.name for f in features),
                               tuple(f.max_ids for f in features))
    if plan is None:
      plan = plan_sharding(list(self.table_specs.values()), features,
                           num_devices=self.num_devices, num_hosts=self.num_hosts,
                           batch_size=batch_size, **planner)
    self.plan = plan
    pieces, replicated = [], []
    for t in self.table_specs.values():
      pl = plan[t.name]
      if pl.kind != "data_parallel" and max(d for g in pl.groups for d in g) >= self.num_devices:
        raise ValueError(f"table {t.name!r}: the plan places it on devices {pl.devices}, but "
                         f"the mesh has {self.num_devices}")
      k = pl.column_shards
      if t.dim % k:
        raise ValueError(f"table {t.name!r}: {k} column blocks do not divide dim {t.dim}")
      for b, g in enumerate(pl.groups):
        pieces.append(Piece(t, b, b * (t.dim // k), t.dim // k, tuple(g)))
        replicated.append(pl.kind == "data_parallel")
    self.stacks = build_stacks(pieces, replicated, self.num_devices)
    self._build_lanes()
    dims = {f: sum(p.dim for p in pieces if p.table.name == f.table) for f in features}
    self.feature_dims = tuple(dims[f] for f in features)
    self.dim = self.feature_dims[0] if len(set(self.feature_dims)) == 1 else None
    self.lookup = self._make_lookup()

  # ---- static layout -----------------------------------------------------------------------

  def _build_lanes(self):
    col0 = self.layout.offsets
    self.lanes: list[_Lanes] = []
    # (column block, stack index, group index) of each block of each feature, in block order.
    self.feature_parts: list[list[tuple[int, int]]] = [[] for _ in self.features]
    for si, s in enumerate(self.stacks):
      cols, piece, groups = [], [], []
      for fi, f in enumerate(self.features):
        for pi, p in enumerate(s.pieces):
          if p.table.name != f.table:
            continue
          l0 = len(cols)
          cols += list(range(col0[fi], col0[fi + 1]))
          piece += [pi] * f.max_ids
          groups.append((fi, p.block, l0, len(cols)))
      for gi, (fi, k, _, _) in enumerate(groups):
        self.feature_parts[fi].append((k, si, gi))
      tabs = [s.pieces[p].table for p in piece]
      mode = [routing.HASHED if t.ids == "hashed" else
              routing.INDEX_OR_HASH if t.out_of_range == "hash" else routing.INDEX_OR_DROP
              for t in tabs]
      single = all(l1 - l0 == 1 and self.features[fi].pooling != "none"
                   for fi, _, l0, l1 in groups)
      self.lanes.append(_Lanes(
          np.asarray(cols, np.int32), np.asarray(piece, np.int32),
          np.asarray([routing.table_salt(t.name) for t in tabs], np.uint32),
          np.asarray([t.rows for t in tabs], np.uint32), np.asarray(mode, np.int32),
          np.asarray([s.pieces[p].n for p in piece], np.int32), tuple(groups), single))
    for parts in self.feature_parts:
      parts.sort()
    for fi, f in enumerate(self.features):
      if not self.feature_parts[fi]:
        raise ValueError(f"feature {f.name!r}: no stack holds table {f.table!r}")

  def _routing_constants(self, s: Stack):
    """[P, nmax] devices of each piece (padded) and [N, P] slab offsets."""
    nmax = max(p.n for p in s.pieces)
    gdev = np.zeros((len(s.pieces), nmax), np.int32)
    for i, p in enumerate(s.pieces):
      gdev[i, :p.n] = p.devices
    return gdev, np.maximum(s.offsets, 0).astype(np.int32)

  def capacity(self, s: Stack, local_batch: int) -> int:
    """Bucket size of a sharded stack for a per-device batch of ``local_batch`` examples."""
    ln = self.lanes[self.stacks.index(s)]
    per_dst = np.zeros(self.num_devices, np.int64)
    for p in range(len(s.pieces)):
      per_dst[list(s.pieces[p].devices)] += local_batch * int((ln.piece == p).sum())
    safe = int(per_dst.max())
    if self.dedup:
      safe = min(safe, s.rows)  # distinct requests: never more than the device's rows
    if self.capacity_factor is None:
      return max(safe, 1)
    mean = local_batch * ln.num / self.num_devices
    return max(1, min(safe, int(np.ceil(self.capacity_factor * mean / 8) * 8)))

  # ---- state ---------------------------------------------------------------------------------

  def _spec(self, s: Stack) -> P:
    """A sharded stack's arrays are [devices, rows, ...]: the leading axis over every device."""
    return P() if s.replicated else P(self.axes)

  def state_specs(self) -> EmbeddingState:
    tables = {s.name: self._spec(s) for s in self.stacks}
    slots = {s.name: {k: self._spec(s) for k in optimizers.slot_shapes(s.optimizer, s.dim)}
             for s in self.stacks}
    return EmbeddingState(tables, slots)


  def _lead(self, s: Stack) -> tuple[int, ...]:
    return (s.rows,) if s.replicated else (self.num_devices, s.rows)

  def init(self, seed: int | jax.Array = 0) -> EmbeddingState:
    """Tables from a hash of (seed, table, row, column): the same logical values on any mesh
    and plan; slots at their initial values. Built directly in their sharded layout."""
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
      seed = jax.random.bits(seed, (), jnp.uint32)
    shardings = self.state_shardings()

    @functools.partial(jax.jit, out_shardings=shardings)
    def make(seed):
      seed = jnp.asarray(seed).astype(jnp.uint32)
      tables, slots = {}, {}
      for s in self.stacks:
        if s.replicated:
          tables[s.name] = self._init_slab(s, seed, None)
        else:
          tables[s.name] = jax.shard_map(
              lambda sd, s=s: self._init_slab(s, sd, jax.lax.axis_index(self.axes))[None],
              mesh=self.mesh, in_specs=P(), out_specs=self._spec(s),
              check_vma=False)(seed)  # per-device values from the device index
        slots[s.name] = optimizers.init_slots(s.optimizer, self._lead(s), s.dim)
      return EmbeddingState(tables, slots)

    return make(seed)

  def _init_slab(self, s: Stack, seed, device):
    """Initial rows of one device's slab (or the replicated array)."""
    if s.replicated:
      starts = jnp.asarray(s.offsets, jnp.int32)
      seg_piece = jnp.arange(len(s.pieces), dtype=jnp.int32)
      spos = jnp.zeros((len(s.pieces),), jnp.int32)
    else:
      # Per device: its segments sorted by offset, padded with start = rows (never matched).
      order = np.argsort(np.where(s.offsets >= 0, s.offsets, s.rows), axis=1, kind="stable")
      st = np.take_along_axis(np.where(s.offsets >= 0, s.offsets, s.rows), order, 1)
      sp = np.zeros_like(s.offsets)
      for i, p in enumerate(s.pieces):
        for j, d in enumerate(p.devices):
          sp[d, i] = j
      starts = jnp.asarray(st, jnp.int32)[device]
      seg_piece = jnp.asarray(order, jnp.int32)[device]
      spos = jnp.asarray(sp, jnp.int32)[device]
    # Built block by block into one buffer: no [rows, dim] temporaries next to the table.
    blk = min(s.rows, 1 << 16)

    def block(b, out):
      start = jnp.minimum(b * blk, s.rows - blk)  # the last block overlaps: same values
      i = start + jnp.arange(blk, dtype=jnp.int32)
      seg = jnp.clip(jnp.searchsorted(starts, i, side="right") - 1, 0, len(s.pieces) - 1)
      p = seg_piece[seg]
      local = i - starts[seg]
      # A replicated piece holds every row; a sharded one every n-th, from its shard position.
      n = jnp.asarray([1 if s.replicated else pc.n for pc in s.pieces], jnp.int32)[p]
      per_shard = [pc.table.rows if s.replicated else pc.rows_per_shard for pc in s.pieces]
      r = local * n + spos[p]
      live = (local >= 0) & (local < jnp.asarray(per_shard)[p]) & (
          r < jnp.asarray([pc.table.rows for pc in s.pieces])[p])
      salt = jnp.asarray([routing.table_salt(pc.table.name) for pc in s.pieces], jnp.uint32)[p]
      col0 = jnp.asarray([pc.col0 for pc in s.pieces], jnp.uint32)[p]
      cols = col0[:, None] + jnp.arange(s.dim, dtype=jnp.uint32)[None, :]
      u, bits = _uniform_bits(seed, salt[:, None], r.astype(jnp.uint32)[:, None], cols)
      scale = jnp.asarray([0.0 if pc.table.initializer == "zeros" else pc.table.scale
                           for pc in s.pieces], jnp.float32)[p]
      vals = 2.0 * u - 1.0
      if any(pc.table.initializer == "normal" for pc in s.pieces):
        u2 = ((fmix32(bits ^ jnp.uint32(0x165667B1)) >> 8).astype(jnp.float32) + 0.5) / (1 << 24)
        normal = jnp.sqrt(-2.0 * jnp.log(u)) * jnp.cos(2.0 * np.pi * u2)
        is_normal = jnp.asarray([pc.table.initializer == "normal" for pc in s.pieces])[p]
        vals = jnp.where(is_normal[:, None], normal, vals)
      vals = jnp.where(live[:, None], vals * scale[:, None], 0.0)
      return jax.lax.dynamic_update_slice(out, vals.astype(s.dtype), (start, 0))

    return jax.lax.fori_loop(0, -(-s.rows // blk), block,
                             jnp.zeros((s.rows, s.dim), s.dtype))

  # ---- host-side views (tests, export) ---------------------------------------------------------

  def _piece_rows(self, s: Stack, pi: int):
    """(device, slab row) of every row of piece ``pi``, as numpy [rows] arrays."""
    p = s.pieces[pi]
    r = np.arange(p.table.rows)
    if s.replicated:
      return None, s.offsets[pi] + r
    dev = np.asarray(p.devices)[r % p.n]
    return dev, s.offsets[dev, pi] + r // p.n

  def to_dense(self, state: EmbeddingState) -> tuple[dict, dict]:
    """Host copies: ({table: [rows, dim]}, {table: {slot: [rows] or [rows, dim]}}).

    Materialises every table on the host: for tests and small exports only. A column-wise
    row-wise Adagrad table keeps one accumulator per block (all equal); block 0's is shown.
    """
    tables = {n: np.zeros((t.rows, t.dim), np.float32) for n, t in self.table_specs.items()}
    slots: dict[str, dict] = {n: {} for n in self.table_specs}
    for s in self.stacks:
      arr = np.asarray(jax.device_get(state.tables[s.name]), np.float32)
      sl = {k: np.asarray(jax.device_get(v)) for k, v in state.slots[s.name].items()}
      for pi, p in enumerate(s.pieces):
        dev, row = self._piece_rows(s, pi)
        pick = (lambda a: a[row]) if dev is None else (lambda a: a[dev, row])
        tables[p.table.name][:, p.col0:p.col0 + p.dim] = pick(arr)
        for k, v in sl.items():
          vals = pick(v)
          if vals.ndim == 1:
            if p.block == 0:
              slots[p.table.name][k] = vals.copy()
          else:
            full = slots[p.table.name].setdefault(
                k, np.zeros((p.table.rows, p.table.dim), np.float32))
            full[:, p.col0:p.col0 + p.dim] = vals
    return tables, slots

  def from_dense(self, tables: dict, slots: dict | None = None) -> EmbeddingState:
    """The sharded state holding these dense per-table values (host numpy in, e.g. to_dense's
    output); tables absent from ``tables`` are zero, absent slots take their initial value."""
    out_t, out_s = {}, {}
    for s in self.stacks:
      arr = np.zeros(self._lead(s) + (s.dim,), np.float32)
      sl = {k: np.full(self._lead(s) + shape, v, np.float32)
            for k, (shape, v) in optimizers.slot_shapes(s.optimizer, s.dim).items()}
      for pi, p in enumerate(s.pieces):
        dev, row = self._piece_rows(s, pi)
        idx = (row,) if dev is None else (dev, row)
        if p.table.name in tables:
          arr[idx] = np.asarray(tables[p.table.name])[:, p.col0:p.col0 + p.dim]
        for k in sl:
          src = (slots or {}).get(p.table.name, {}).get(k)
          if src is not None:
            src = np.asarray(src)
            sl[k][idx] = src if src.ndim == 1 else src[:, p.col0:p.col0 + p.dim]
      out_t[s.name] = arr.astype(s.dtype)
      out_s[s.name] = sl
    return jax.device_put(EmbeddingState(out_t, out_s), self.state_shardings())

  def check_batch(self, batch: Batch) -> Batch:
    """Rejects a host batch with out-of-range IDs for an ``ids="index"`` table whose policy is
    "error" (naming the feature), before it can reach the step. Returns the batch."""
    offsets = self.layout.offsets
    for fi, f in enumerate(self.features):
      t = self.table_specs[f.table]
      if t.ids != "index" or t.out_of_range != "error":
        continue
      ids = np.asarray(batch.ids[:, offsets[fi]:offsets[fi + 1]], np.uint64)
      bad = np.asarray(batch.mask[:, offsets[fi]:offsets[fi + 1]]) & (ids >= np.uint64(t.rows))
      if bad.any():
        ex, col = (int(v[0]) for v in np.nonzero(bad))
        raw = ids[ex, col]
        shown = int(raw.view(np.int64)) if raw >= np.uint64(2**63) else int(raw)
        raise ValueError(f"feature {f.name!r} (table {t.name!r}, rows={t.rows}, ids='index'): "
                         f"ID {shown} at example {ex}, slot {col} is outside [0, {t.rows}) "
                         f"({int(bad.sum())} such IDs in the batch); fix the input or set "
                         f"TableSpec(out_of_range='hash') for table {t.name!r}")
    return batch

  # ---- forward -------------------------------------------------------------------------------

  def _forward_local(self, tables: dict, ids, mask):
    """Per device: pooled features, residuals for the update, and (overflow, invalid)."""
    groups_out, res = [], {}
    overflow = jnp.zeros((), jnp.int32)
    invalid = jnp.zeros((), jnp.int32)
    for s, ln in zip(self.stacks, self.lanes):
      lane_ids = _cols(ids, ln.cols)
      valid = _cols(mask, ln.cols)
      row, bad = id_rows(lane_ids, ln.salt, ln.rows, ln.mode)
      invalid += jnp.sum(valid & bad, dtype=jnp.int32)
      valid = valid & ~bad
      if s.replicated:
        offs = jnp.asarray(s.offsets[ln.piece].astype(np.int32))
        grow = jnp.where(valid, row + offs, s.rows).reshape(-1)
        # One gather per occurrence: a dedup-then-expand pair of gathers is fused back into
        # one by XLA anyway, with the binary search of the inverse redone per element.
        occ = take_rows(tables[s.name], grow).reshape(*valid.shape, s.dim)
        if self._scatter_occurrences(s):
          res[s.name] = {"rows": grow[None], "valid": valid}
        else:  # the backward sums gradients per distinct row
          uniq, inverse = self._requests(grow, s.rows)
          res[s.name] = {"uniq": uniq[None], "inverse": inverse.reshape(valid.shape),
                         "valid": valid}
      else:
        occ, r, of = self._route_and_gather(s, ln, tables[s.name][0], row, valid)
        res[s.name] = r
        overflow += of
      groups_out.append(self._pool(ln, occ, valid))
    feats = []
    for fi in range(len(self.features)):
      parts = [groups_out[si][gi] for _, si, gi in self.feature_parts[fi]]
      feats.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1))
    stats = jax.lax.psum(jnp.stack([overflow, invalid]), self.axes)
    return feats, res, stats

  def _scatter_occurrences(self, s: Stack) -> bool:
    """Whether a replicated stack's backward scatter-adds per occurrence (no dedup sort):
    plain SGD on fp32 is linear in the gradient, and one device has nothing to exchange."""
    return (s.replicated and self.num_devices == 1 and s.optimizer.name == "sgd"
            and np.dtype(s.dtype) == np.float32)

  def _route_and_gather(self, s: Stack, ln: _Lanes, slab, row, valid):
    """Dedup, bucket by owner, all_to_all, gather on owners, all_to_all back, expand."""
    nd, rows_l = self.num_devices, s.rows
    b = row.shape[0]
    m = b * ln.num
    cap = self.capacity(s, b)
    gdev, offs = self._routing_constants(s)
    if (ln.n == 1).all():
      shard, local = 0, row
    else:
      n = jnp.asarray(ln.n)
      shard, local = row % n, row // n
    piece = jnp.asarray(ln.piece)
    dst = jnp.take(jnp.asarray(gdev.reshape(-1)), piece * gdev.shape[1] + shard)
    lrow = local + jnp.take(jnp.asarray(offs.reshape(-1)), dst * offs.shape[1] + piece)
    sentinel = nd * rows_l
    key = jnp.where(valid, dst * rows_l + lrow, sentinel).reshape(-1)
    uniq, inverse = self._requests(key, sentinel)
    dst_u = uniq // rows_l
    live = dst_u < nd
    # uniq is sorted, so each destination's requests are contiguous: position = rank in run.
    start = jnp.searchsorted(uniq, jnp.arange(nd, dtype=jnp.int32) * rows_l, side="left")
    pos = jnp.arange(m, dtype=jnp.int32) - jnp.take(start, jnp.minimum(dst_u, nd - 1))
    ok = live & (pos < cap)
    overflow = jnp.sum(live & ~ok, dtype=jnp.int32)
    slot = jnp.where(ok, dst_u * cap + pos, nd * cap)
    send = jnp.full((nd * cap,), rows_l, jnp.int32).at[slot].set(
        uniq - dst_u * rows_l, mode="drop", unique_indices=True)
    recv = self._exchange_ids(send.reshape(nd, cap), rows_l, lambda x: jax.lax.all_to_all(
        x, self.axes, 0, 0, tiled=True)).reshape(-1)
    vals = take_rows(slab, recv)
    back = self._exchange(vals.reshape(nd, cap, s.dim), self.forward_precision,
                          lambda w: jax.lax.all_to_all(w, self.axes, 0, 0, tiled=True))
    occ = take_rows(back.reshape(nd * cap, s.dim), jnp.take(slot, inverse))
    # Which unique request fills each send slot: the backward gathers gradients with it.
    src = jnp.full((nd * cap,), m, jnp.int32).at[slot].set(
        jnp.arange(m, dtype=jnp.int32), mode="drop", unique_indices=True)
    res = {"inverse": inverse.reshape(b, ln.num), "valid": valid, "src": src[None],
           "recv": recv[None]}
    return occ.reshape(b, ln.num, s.dim), res, overflow

  def _requests(self, keys, sentinel: int):
    """(sorted requests, inverse): one per distinct key, or with ``dedup`` off one per lookup
    (sorted all the same, so each destination's requests stay contiguous)."""
    if self.dedup:
      return unique_inverse(keys, sentinel)
    order = jnp.argsort(keys, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(
        jnp.arange(keys.shape[0], dtype=jnp.int32), unique_indices=True)
    return jnp.take(keys, order), inverse

  def _exchange_ids(self, ids, sentinel: int, collective):
    """``collective`` applied to int32 row IDs in [0, sentinel], narrowed when allowed."""
    if self.compact_ids and sentinel < (1 << 16):
      return collective(ids.astype(jnp.uint16)).astype(jnp.int32)
    return collective(ids)

  @staticmethod
  def _exchange(rows, precision: str, collective):
    """``collective`` applied to ``rows`` [..., d] as they travel at ``precision``."""
    if precision == "fp32":
      return collective(rows)
    return codec.decode(collective(codec.encode(rows, precision)), precision)

  def _pool(self, ln: _Lanes, occ, valid) -> list:
    """Per group: the pooled bag [b, dim] (or the masked bag [b, L, dim] for pooling none)."""
    occ = occ.astype(jnp.float32) * valid[..., None]
    if ln.single:  # one lane a bag: sum and mean both equal the masked row
      return [occ[:, g] for g in range(len(ln.groups))]
    out = []
    for fi, _, l0, l1 in ln.groups:
      e = occ[:, l0:l1]
      pooling = self.features[fi].pooling
      if pooling == "none":
        out.append(e)
      elif pooling == "sum":
        out.append(e.sum(1))
      else:
        cnt = valid[:, l0:l1].sum(1, keepdims=True).astype(jnp.float32)
        out.append(e.sum(1) / jnp.maximum(cnt, 1.0))
    return out

  def _sm_specs(self):
    table_specs = {s.name: self._spec(s) for s in self.stacks}
    feat_specs = [P(self.axes)] * len(self.features)
    return table_specs, feat_specs

  def forward(self, state: EmbeddingState, ids, mask):
    """(features, residuals, stats): the lookup without its custom_vjp. ``features`` is a list
    of [B, dim] (or [B, max_ids, dim] for pooling "none") in feature order; stats = [overflow,
    invalid_ids] summed over devices."""
    self._check_batch_shape(ids)
    table_specs, feat_specs = self._sm_specs()
    fn = jax.shard_map(self._forward_local, mesh=self.mesh,
                       in_specs=(table_specs, P(self.axes), P(self.axes)),
                       out_specs=(feat_specs, P(self.axes), P()))
    return fn(state.tables, ids, mask)

  # ---- backward + update -----------------------------------------------------------------------

  def _lane_grads(self, s: Stack, ln: _Lanes, g_feats, valid):
    """[b, NL, grad_dim] gradient of each lane's row (masked, scaled for mean pooling)."""
    b = valid.shape[0]
    parts, scales = [], []
    for fi, k, l0, l1 in ln.groups:
      p = next(pc for pc in s.pieces if pc.table.name == self.features[fi].table
               and pc.block == k)
      g = g_feats[fi].astype(jnp.float32)
      # A column-wise row-wise Adagrad block takes the whole row, its own columns first.
      g = g[..., p.col0:p.col0 + p.dim] if s.grad_dim == s.dim else jnp.roll(g, -p.col0, -1)
      pooling = self.features[fi].pooling
      v = valid[:, l0:l1].astype(jnp.float32)
      if pooling == "mean":
        v = v / jnp.maximum(v.sum(1, keepdims=True), 1.0)
      scales.append(v)
      parts.append(g if pooling == "none" else g[:, None, :])
    if ln.single:
      g = jnp.concatenate(parts, axis=1)
    else:
      g = jnp.concatenate([jnp.broadcast_to(x, (b, l1 - l0, s.grad_dim))
                           for x, (_, _, l0, l1) in zip(parts, ln.groups)], axis=1)
    scale = scales[0] if len(scales) == 1 else jnp.concatenate(scales, axis=1)
    return g * scale[..., None]

  def _update_local(self, tables: dict, slots: dict, res: dict, g_feats, step):
    tables, slots = dict(tables), dict(slots)
    for s, ln in zip(self.stacks, self.lanes):
      r = res[s.name]
      g = self._lane_grads(s, ln, g_feats, r["valid"])
      m = g.shape[0] * ln.num
      g = g.reshape(m, s.grad_dim)
      if s.replicated and "rows" in r:  # SGD on one device: scatter-add every occurrence
        rows = r["rows"][0]
        tables[s.name], slots[s.name] = sparse_update(
            s.optimizer, tables[s.name], slots[s.name], rows, g, rows < s.rows, step)
        continue
      if s.replicated:
        g = jax.ops.segment_sum(g, r["inverse"].reshape(-1), num_segments=m)
        rows = r["uniq"][0]
        if self.num_devices > 1:
          # Every replica applies the same update from the same gathered (row, gradient)
          # pairs, deduplicated again across devices.
          rows = self._exchange_ids(rows, s.rows,
                                    lambda x: jax.lax.all_gather(x, self.axes, tiled=True))
          g = self._exchange(g, self.precision,
                             lambda w: jax.lax.all_gather(w, self.axes, tiled=True))
        tables[s.name], slots[s.name] = sparse_update(
            s.optimizer, tables[s.name], slots[s.name], rows, g, rows < s.rows, step,
            assume_unique=self.num_devices == 1 and self.dedup)
        continue
      g_u = jax.ops.segment_sum(g, r["inverse"].reshape(-1), num_segments=m)
      send = jnp.take(g_u, r["src"][0], axis=0, mode="fill", fill_value=0)
      nd = self.num_devices
      recv_g = self._exchange(
          send.reshape(nd, -1, s.grad_dim), self.precision,
          lambda w: jax.lax.all_to_all(w, self.axes, 0, 0, tiled=True)).reshape(-1, s.grad_dim)
      rows = r["recv"][0]
      slab, sl = sparse_update(s.optimizer, tables[s.name][0],
                               {k: v[0] for k, v in slots[s.name].items()}, rows, recv_g,
                               rows < s.rows, step, assume_unique=nd == 1 and self.dedup)
      tables[s.name] = slab[None]
      slots[s.name] = {k: v[None] for k, v in sl.items()}
    return tables, slots

  def update(self, state: EmbeddingState, residuals, g_feats, step) -> EmbeddingState:
    """The backward: route feature gradients to owners and apply each table's optimizer.
    ``step`` is the 1-based global step (Adam's bias correction)."""
    table_specs, feat_specs = self._sm_specs()
    slot_specs = self.state_specs().slots
    # check_vma=False: replicated stacks are updated from all-gathered (identical) pairs, which
    # the type system cannot see as invariant (all_gather's result is typed device-varying).
    fn = jax.shard_map(self._update_local, mesh=self.mesh,
                       in_specs=(table_specs, slot_specs, P(self.axes), feat_specs, P()),
                       out_specs=(table_specs, slot_specs), check_vma=False)
    tables, slots = fn(state.tables, state.slots, residuals, list(g_feats),
                       jnp.asarray(step, jnp.int32))
    return EmbeddingState(tables, slots)

  # ---- the custom_vjp ------------------------------------------------------------------------

  def _make_lookup(self):
    @jax.custom_vjp
    def lookup_vjp(state, ids, mask, step):
      feats, _, stats = self.forward(state, ids, mask)
      return feats, stats

    def fwd(state, ids, mask, step):
      feats, res, stats = self.forward(state, ids, mask)
      return (feats, stats), (state, res, step)

    def bwd(saved, cts):
      state, res, step = saved
      g_feats, _ = cts
      # The "cotangent" of the state is the updated state (see the module docstring).
      return self.update(state, res, g_feats, step), None, None, None

    lookup_vjp.defvjp(fwd, bwd)

    def lookup(state: EmbeddingState, ids, mask, step=1):
      """(features, stats) with the sparse update as its VJP.

      ids [B, C, 2] uint32, mask [B, C] bool, both split over the mesh; step: the 1-based
      global step of the update this lookup's gradient will make. Differentiating w.r.t.
      ``state`` yields the *updated* state. stats: int32 [overflow, invalid_ids].
      """
      return lookup_vjp(state, ids, mask, jnp.asarray(step, jnp.int32))

    return lookup
