"""A fixed-capacity device hash table from 64-bit feature IDs to embedding rows.

One table per shard lives in device memory as plain arrays (a pytree), and every operation is
a pure jnp function with static shapes, usable inside ``jax.jit`` and ``jax.shard_map``.

Keys are exact 64-bit IDs carried as uint32 (lo, hi) pairs, shape ``[..., 2]`` (how IDs
travel without ``jax_enable_x64``, see ``Batch.ids_as_u32_pairs``). Occupancy is kept in a
separate bit mask, so every 64-bit value, 0 and 2**64-1 included, is a valid ID, and two
distinct IDs never share a row.

Layout: ``capacity = 8 * num_buckets`` slots in buckets of 8; slot ``s`` of bucket ``b`` is
row ``8 * b + s`` of ``keys``, ``values``, the optimizer slots and the metadata, so a key's
row is its slot and needs no indirection. ``buckets`` is ``[num_buckets, 3]`` uint32: two
words of 8-bit tags (a hash byte of each slot's key) and one meta word (bits 0-7: which slots
are live; bits 8-31: how many live keys were displaced past this bucket). A probe gathers 12
bytes of tags and then the full key of the (almost always single) tag match: on XLA:CPU a
gather costs per element, and this is 3x cheaper than gathering all 8 keys of the bucket.

Probing is double hashing over buckets: key k visits ``home(k) + i * step(k)`` (mod
num_buckets, ``step`` odd so every bucket is reachable) for ``i < max_probes``. A key sits in
the first bucket of its sequence that had a free slot when it arrived. A lookup stops at the
key, or at a bucket whose displaced-past count is 0: nobody who started earlier in a sequence
went on from there. Counting instead of tombstones means erase and eviction leave no debris,
so lookups do not slow down under churn.

``find_or_insert`` runs in three steps (see PERF-NOTES.md):
  1. one probe of every query's home bucket (most hits end here); a miss is settled there
     when the bucket holds no other candidate and no key went past it (most new keys);
  2. the unsettled rest, compacted into fixed-size chunks, finish probing (with an admission
     sketch every miss is counted, so the settled ones walk these chunks too); the absent
     ones are collected, the settled misses first, then the others, each in batch order; the
     metadata of the rows found is updated batch-wide;
  3. claim rounds for the absent admitted keys, chunk by chunk: each proposes a free slot of
     its current bucket; races are settled by scatter-min of the query's position, so the
     outcome is deterministic; losers retry the same bucket, keys meeting a full bucket move
     on. After the first round the keys still looking continue in narrower sub-chunks.
     Copies of one new key walk in lockstep and the later ones find the winner's key, so the
     batch needs no separate dedup.

A full probe window never loses a key silently: per ``HashTableSpec.on_full`` the key either
replaces an entry not used in this step (the lowest-scored, LRU or LFU, of the first bucket
along its probe sequence that has one), counted in ``evicted``, or gets row -1, counted in
``rejected``. Table-wide LRU/LFU eviction is ``evict`` with ``max_load_factor``: run it
before the table fills (``maybe_evict``) and the insert-time fallback stays rare.

New rows are initialised deterministically from the key (see ``HashTableSpec.initializer``):
the same ID gets the same initial vector on every shard, mesh size and batch order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrec.embedding import admission as admission_lib
from jaxrec.embedding.admission import AdmissionPolicy, fmix32, hash_pair

SLOTS_PER_BUCKET = 8
_META = 2  # column of the meta word in ``buckets``
_ROW_WIDTH = 3
_OVERFLOW_ONE = 1 << 8  # one displaced key in the meta word
_INT_MAX = np.iinfo(np.int32).max
_HOME_SEED = 0x2545F491
_STEP_SEED = 0x6A09E667
_INIT_SEED = 0x3C6EF372
PROBE_HISTOGRAM_BINS = 8  # probe lengths 1..7 buckets, then 8 or more


# --------------------------------------------------------------------------------------------
# Specs, state and stats.


@dataclasses.dataclass(frozen=True)
class SlotSpec:
  """One optimizer slot kept per row, e.g. a row-wise Adagrad accumulator: shape (), init 0.1."""

  name: str
  shape: tuple[int, ...] = ()
  dtype: Any = jnp.float32
  init: float = 0.0


@dataclasses.dataclass(frozen=True)
class HashTableSpec:
  """Static description of one table shard (hashable: a jit static argument).

  capacity: slots in this shard; a power of two, at least 8.
  dim: embedding width.
  slots: optimizer slots kept per row.
  initializer: "hash_uniform" draws each new row's values uniformly in
    [-init_scale, init_scale) from a hash of (key, column, seed): deterministic per key.
    "zeros" starts rows at 0.
  seed, init_scale: may be traced scalars (uint32, float32) where tables that differ only
    in them run as one program (``dynamic.DynamicEmbedding`` maps over tables).
  max_probes: buckets a key may visit; past that its probe window counts as full.
  on_full: what a new admitted key does when its probe window is full: "reject" (row -1,
    counted in ``rejected``) or "evict" (replace the lowest-scored entry not used in this step
    of the first bucket along its probe sequence that has one, counted in ``evicted``;
    ``rejected`` if every entry of the window was used in this step).
  eviction_score: "lru" (last-seen step) or "lfu" (frequency) for ``on_full="evict"``.
  admission: who earns a row (None: every new key).
  track_frequency, track_last_seen: keep these per-row counters (each costs one scatter over
    the batch per lookup). LRU scores and age eviction need last_seen, LFU needs frequency.
  """

  name: str
  capacity: int
  dim: int
  dtype: Any = jnp.float32
  slots: tuple[SlotSpec, ...] = ()
  initializer: Literal["hash_uniform", "zeros"] = "hash_uniform"
  init_scale: float = 0.05
  seed: int = 0
  max_probes: int = 64
  on_full: Literal["reject", "evict"] = "reject"
  eviction_score: Literal["lru", "lfu"] = "lru"
  admission: AdmissionPolicy | None = None
  track_frequency: bool = True
  track_last_seen: bool = True

  def __post_init__(self):
    where = f"hash table {self.name!r}"
    c = self.capacity
    if c < SLOTS_PER_BUCKET or c & (c - 1):
      raise ValueError(f"{where}: capacity must be a power of two >= 8, got {c}")
    if self.dim < 0:
      raise ValueError(f"{where}: dim must be >= 0, got {self.dim}")
    if self.max_probes < 1:
      raise ValueError(f"{where}: max_probes must be >= 1, got {self.max_probes}")
    if self.on_full not in ("reject", "evict"):
      raise ValueError(f"{where}: on_full must be 'reject' or 'evict', got {self.on_full!r}")
    if self.eviction_score not in ("lru", "lfu"):
      raise ValueError(f"{where}: eviction_score must be 'lru' or 'lfu', "
                       f"got {self.eviction_score!r}")
    if self.initializer not in ("hash_uniform", "zeros"):
      raise ValueError(f"{where}: initializer must be 'hash_uniform' or 'zeros', "
                       f"got {self.initializer!r}")
    if self.on_full == "evict" and not self.track_last_seen:
      raise ValueError(f"{where}: on_full='evict' needs track_last_seen=True (it must know "
                       "which entries the current step used)")
    if self.on_full == "evict" and self.eviction_score == "lfu" and not self.track_frequency:
      raise ValueError(f"{where}: eviction_score='lfu' needs track_frequency=True")
    names = [s.name for s in self.slots]
    if len(set(names)) != len(names):
      raise ValueError(f"{where}: duplicate slot names {names}")

  @property
  def num_buckets(self) -> int:
    return self.capacity // SLOTS_PER_BUCKET

  @property
  def probe_limit(self) -> int:
    """Buckets actually visited at most: more than num_buckets would revisit buckets."""
    return min(self.max_probes, self.num_buckets)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["buckets", "keys", "values", "slots", "frequency", "last_seen", "sketch",
                 "size"],
    meta_fields=[])
@dataclasses.dataclass(frozen=True)
class HashTableState:
  """One table shard's arrays; pass it in and take the new one back from every update.

  buckets:   [num_buckets, 3] uint32 tag words and the meta word (see the module doc).
  keys:      [capacity, 2] uint32 (lo, hi) key of each row (meaningless where not live).
  values:    [capacity, dim] embedding rows; row r belongs to slot r.
  slots:     {name: [capacity, *shape]} optimizer slots.
  frequency: [capacity] int32 lookups of the row's key since it was inserted.
  last_seen: [capacity] int32 step of the last lookup (or insert) of the row's key.
  sketch:    [depth, width] int32 admission count-min sketch ([0, 1] when unused).
  size:      [] int32 live keys.
  """

  buckets: jax.Array
  keys: jax.Array
  values: jax.Array
  slots: dict[str, jax.Array]
  frequency: jax.Array
  last_seen: jax.Array
  sketch: jax.Array
  size: jax.Array

  def live_mask(self) -> jax.Array:
    """[capacity] bool: which rows hold a key."""
    meta = self.buckets[:, _META]
    bits = (meta[:, None] >> jnp.arange(SLOTS_PER_BUCKET, dtype=jnp.uint32)) & 1
    return bits.reshape(-1).astype(bool)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["size", "load_factor", "lookups", "hits", "inserted", "not_admitted",
                 "rejected", "insert_failures", "evicted", "probe_histogram"],
    meta_fields=[])
@dataclasses.dataclass(frozen=True)
class HashTableStats:
  """Counters of one call (plus the table's size after it); all cheap to return every step.

  size:            live keys after the call.
  load_factor:     size / capacity (float32).
  lookups:         valid queries.
  hits:            queries whose key was in the table when the call started.
  inserted:        keys that took a new row in this call (each key once).
  not_admitted:    queries answered -1 by the admission filter.
  rejected:        queries of admitted keys answered -1 because no slot was available.
  insert_failures: queries of new keys whose whole probe window was full (then either an
                   entry was evicted for them or they were rejected).
  evicted:         keys removed in this call (to make room, or by ``evict`` / ``erase``).
  probe_histogram: [8] hits by buckets visited: 1, 2, ..., 7, 8 or more.
  """

  size: jax.Array
  load_factor: jax.Array
  lookups: jax.Array
  hits: jax.Array
  inserted: jax.Array
  not_admitted: jax.Array
  rejected: jax.Array
  insert_failures: jax.Array
  evicted: jax.Array
  probe_histogram: jax.Array

  @property
  def admitted(self) -> jax.Array:
    """Queries of new keys that passed admission."""
    return self.lookups - self.hits - self.not_admitted

  @property
  def probe_mean(self) -> jax.Array:
    """Mean buckets visited per hit (8+ counted as 8)."""
    h = self.probe_histogram
    n = jnp.maximum(jnp.sum(h), 1)
    return jnp.sum(h * jnp.arange(1, PROBE_HISTOGRAM_BINS + 1)) / n


def _stats(spec: HashTableSpec, size: jax.Array, **counts: jax.Array) -> HashTableStats:
  zero = jnp.zeros((), jnp.int32)
  fields = {f: jnp.asarray(counts.get(f, zero), jnp.int32) for f in
            ("lookups", "hits", "inserted", "not_admitted", "rejected", "insert_failures",
             "evicted")}
  hist = counts.get("probe_histogram", jnp.zeros((PROBE_HISTOGRAM_BINS,), jnp.int32))
  return HashTableStats(size=size, load_factor=size.astype(jnp.float32) / spec.capacity,
                        probe_histogram=hist.astype(jnp.int32), **fields)


def init(spec: HashTableSpec) -> HashTableState:
  """An empty table shard. Values and slots are zero until a key's insert initialises them."""
  cap = spec.capacity
  slots = {s.name: jnp.full((cap, *s.shape), s.init, s.dtype) for s in spec.slots}
  return HashTableState(
      buckets=jnp.zeros((spec.num_buckets, _ROW_WIDTH), jnp.uint32),
      keys=jnp.zeros((cap, 2), jnp.uint32),
      values=jnp.zeros((cap, spec.dim), spec.dtype),
      slots=slots,
      frequency=jnp.zeros((cap if spec.track_frequency else 0,), jnp.int32),
      last_seen=jnp.zeros((cap if spec.track_last_seen else 0,), jnp.int32),
      sketch=admission_lib.init_sketch(spec.admission),
      size=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------
# Host-side key conversion.


def keys_to_pairs(ids: np.ndarray) -> np.ndarray:
  """uint64 IDs [...] -> uint32 [..., 2] (lo, hi), the layout the table takes."""
  ids = np.ascontiguousarray(ids, dtype=np.uint64)
  return ids.view(np.uint32).reshape(*ids.shape, 2)


def pairs_to_keys(pairs: np.ndarray) -> np.ndarray:
  """uint32 [..., 2] (lo, hi) -> uint64 IDs [...]."""
  pairs = np.ascontiguousarray(np.asarray(pairs), dtype=np.uint32)
  return pairs.view(np.uint64).reshape(pairs.shape[:-1])


# --------------------------------------------------------------------------------------------
# Hashing and bucket arithmetic (all uint32, wrapping).


def _hashes(spec: HashTableSpec, lo: jax.Array, hi: jax.Array):
  """(home bucket, odd step, first slot to try, 8-bit tag) of each key."""
  mask = jnp.uint32(spec.num_buckets - 1)
  h = hash_pair(lo, hi, _HOME_SEED)
  g = hash_pair(lo, hi, _STEP_SEED)
  home = h & mask
  step = (g & mask) | jnp.uint32(1)
  rot = h >> 29  # which slot to try first, so racing keys spread over a bucket
  tag = g >> 24
  return home, step, rot, tag


def _bucket_at(spec: HashTableSpec, home, step, pos) -> jax.Array:
  b = (home + jnp.asarray(pos).astype(jnp.uint32) * step) & jnp.uint32(spec.num_buckets - 1)
  return b.astype(jnp.int32)


def _inverse_odd(x: jax.Array) -> jax.Array:
  """Multiplicative inverse of odd x modulo 2**32 (Newton: each step doubles correct bits)."""
  y = x
  for _ in range(5):
    y = y * (jnp.uint32(2) - x * y)
  return y


def _ctz(x: jax.Array) -> jax.Array:
  """Count trailing zeros of uint32 (32 for 0)."""
  return lax.population_count((x & (~x + jnp.uint32(1))) - jnp.uint32(1)).astype(jnp.int32)


def _slot_bits() -> jax.Array:
  return jnp.uint32(1) << jnp.arange(SLOTS_PER_BUCKET, dtype=jnp.uint32)


def _read_bucket(buckets: jax.Array, b: jax.Array, tag: jax.Array):
  """Gathers buckets b: (live slots whose tag matches, live bits, displaced-past count, row)."""
  row = buckets.at[b].get(mode="promise_in_bounds")
  live = row[:, _META] & jnp.uint32(0xFF)
  # All 8 tag bytes as one [n, 8] compare and a sum of slot bits: XLA:CPU runs this ~4x
  # faster than 8 unrolled byte compares of [n] columns.
  shifts = jnp.arange(4, dtype=jnp.uint32) * jnp.uint32(8)
  tags = ((row[:, :2, None] >> shifts) & jnp.uint32(0xFF)).reshape(-1, SLOTS_PER_BUCKET)
  cand = jnp.sum(jnp.where(tags == tag[:, None], _slot_bits(), jnp.uint32(0)), axis=1,
                 dtype=jnp.uint32)
  return cand & live, live, row[:, _META] >> 8, row


def _key_at(keys: jax.Array, rows: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  k = keys.at[rows].get(mode="promise_in_bounds")
  return (k[:, 0] == lo) & (k[:, 1] == hi)


def _match(keys, b, cand, lo, hi):
  """Bit of the slot of bucket b holding (lo, hi) among the tag candidates ``cand`` (or 0).

  Checks candidates one at a time: almost always there is at most one.
  """

  def cond(c):
    return jnp.any(c[0] != 0)

  def body(c):
    rem, match = c
    slot = _ctz(rem)
    ok = (rem != 0) & _key_at(keys, b * 8 + (slot & 7), lo, hi)
    match = jnp.where(ok, jnp.uint32(1) << (slot & 7).astype(jnp.uint32), match)
    rem = jnp.where(ok, jnp.uint32(0), rem & (rem - jnp.uint32(1)))
    return rem, match

  return lax.while_loop(cond, body, (cand, jnp.zeros_like(cand)))[1]


def _pick_free(live: jax.Array, rot: jax.Array) -> jax.Array:
  """First free slot at or after slot ``rot`` (cyclically); garbage when the bucket is full."""
  free = ~live & jnp.uint32(0xFF)
  rolled = ((free >> rot) | (free << (jnp.uint32(8) - rot))) & jnp.uint32(0xFF)
  return (_ctz(rolled) + rot.astype(jnp.int32)) & 7


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


def _default_chunk(n: int) -> int:
  """Chunk for the compacted second phase: an eighth of the batch up to 8192, then a 32nd.

  Narrow chunks waste less width on the last, partly filled one and on keys that settle
  early (at 10^6 keys, 2^15 ran find_or_insert ~15% faster than 2^17, lf 0.5 and 0.9), but
  each chunk costs a few loop launches, which small batches feel (2^11 was ~8% slower than
  2^13 at 2^16 keys).
  """
  n8, n32 = _next_pow2(-(-n // 8)), _next_pow2(-(-n // 32))
  return min(_next_pow2(max(n, 1)), max(1024, min(8192, n8), n32))


def _flatten_keys(spec: HashTableSpec, keys: jax.Array, valid: jax.Array | None):
  keys = jnp.asarray(keys)
  if keys.ndim < 1 or keys.shape[-1] != 2:
    raise ValueError(f"hash table {spec.name!r}: keys must be uint32 [..., 2] (lo, hi) pairs, "
                     f"got shape {keys.shape}; convert uint64 IDs with keys_to_pairs")
  if keys.dtype != jnp.uint32:
    raise ValueError(f"hash table {spec.name!r}: keys must be uint32 (lo, hi) pairs, got "
                     f"{keys.dtype}; convert uint64 IDs with keys_to_pairs")
  shape = keys.shape[:-1]
  flat = keys.reshape(-1, 2)
  if valid is None:
    v = jnp.ones((flat.shape[0],), bool)
  else:
    valid = jnp.asarray(valid)
    if valid.shape != shape:
      raise ValueError(f"hash table {spec.name!r}: valid has shape {valid.shape}, keys "
                       f"{keys.shape} need {shape}")
    v = valid.reshape(-1).astype(bool)
  return flat[:, 0], flat[:, 1], v, shape


def _compact(mask: jax.Array, chunk: int):
  """Positions of True entries, in order, padded to a multiple of ``chunk``; and their count."""
  n = mask.shape[0]
  n_pad = -(-n // chunk) * chunk
  rank = lax.associative_scan(jnp.add, mask.astype(jnp.int32)) - 1
  target = jnp.where(mask, rank, n_pad)
  order = jnp.zeros((n_pad,), jnp.int32).at[target].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop", unique_indices=True)
  return order, jnp.sum(mask, dtype=jnp.int32)


def _compact_two(first: jax.Array, second: jax.Array, chunk: int):
  """Positions of the True entries of ``first``, then those of ``second`` (disjoint masks),
  each in order; padded to a multiple of ``chunk`` plus one more chunk, so that a chunk may
  start anywhere in the used part. Returns (positions, count of first, count of second)."""
  n = first.shape[0]
  n_pad = -(-n // chunk) * chunk + chunk
  if n == 0:
    zero = jnp.zeros((), jnp.int32)
    return jnp.zeros((n_pad,), jnp.int32), zero, zero
  ranks = lax.associative_scan(jnp.add, jnp.stack([first, second], axis=1).astype(jnp.int32))
  rf, rs = ranks[:, 0], ranks[:, 1]
  n_first, n_second = rf[-1], rs[-1]
  target = jnp.where(first, rf - 1, jnp.where(second, n_first + rs - 1, n_pad))
  order = jnp.zeros((n_pad,), jnp.int32).at[target].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop", unique_indices=True)
  return order, n_first, n_second


def _histogram(pos: jax.Array, mask: jax.Array) -> jax.Array:
  bins = jnp.clip(pos, 0, PROBE_HISTOGRAM_BINS - 1)
  onehot = (bins[:, None] == jnp.arange(PROBE_HISTOGRAM_BINS)) & mask[:, None]
  return jnp.sum(onehot, axis=0, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------
# Lookup.


def _probe(spec, buckets, keys, lo, hi, home, step, tag, active):
  """Full probe: until found, a bucket nobody passed, or the window's end. (row, position)."""
  limit = spec.probe_limit

  def cond(c):
    return jnp.any(c[0])

  def body(c):
    active, pos, row = c
    b = _bucket_at(spec, home, step, pos)
    cand, _, overflow, _ = _read_bucket(buckets, b, tag)
    match = _match(keys, b, jnp.where(active, cand, jnp.uint32(0)), lo, hi)
    found = active & (match != 0)
    row = jnp.where(found, b * 8 + _ctz(match), row)
    done = found | (overflow == 0) | (pos + 1 >= limit)
    active = active & ~done
    return active, pos + active.astype(jnp.int32), row

  # *_like keeps the inputs' shard_map variance on the loop carries.
  init_c = (active, jnp.zeros_like(lo, jnp.int32), jnp.full_like(lo, -1, jnp.int32))
  _, pos, row = lax.while_loop(cond, body, init_c)
  return row, pos


# Batch-wide work on at least this many rows runs as independent pieces (``_in_parts``):
# XLA:CPU runs one gather (and the loop fusion around it) on one thread, separate pieces on
# both cores (10^6 rows of 64 floats from 2^23: 99 -> 39 ms as two halves). On a GPU the
# pieces cost what the whole does.
_SPLIT_ROWS = 1 << 15


def _in_parts(fn, *args, parts: int):
  """``fn(*args)`` on [n, ...] arrays as ``parts`` independent pieces when n is large, each
  behind an optimization barrier (the measured form; XLA:CPU expands barriers before fusion,
  so a barrier alone does not keep a piece out of a consumer's loop).

  XLA:CPU's thunk executor hands ready work to a second thread only while more than eight
  thunks are ready at once (ThunkExecutor's split threshold), so two halves of a long chain
  of work often still run one after the other: the home probe of 10^6 keys takes about 30 ms
  as two halves and 15 ms as eight pieces. A single gather is fine as two halves, and in
  eight pieces the value gather made some calls 5x slower.
  """
  n = args[0].shape[0]
  if n < _SPLIT_ROWS:
    return lax.optimization_barrier(fn(*args))
  bounds = [n * k // parts for k in range(parts + 1)]
  outs = [lax.optimization_barrier(fn(*[x[bounds[k]:bounds[k + 1]] for x in args]))
          for k in range(parts)]
  return jax.tree.map(lambda *u: jnp.concatenate(u, axis=0), *outs)


def _lookup(spec, buckets, keys, lo, hi, valid, chunk, sketch=None, collect_misses=False):
  """Rows of the keys (-1 if absent), the probe histogram, and the sketch counting misses.

  Also returns, with ``collect_misses``, the positions of the valid queries whose key is
  absent, with their count (``find_or_insert`` inserts them in this order: the misses
  settled at home first, then those found absent by the full probe, each part ascending;
  all copies of a key fall in the same part).
  """
  n = lo.shape[0]

  def home_probe(lo, hi, valid):
    home, step, rot, tag = _hashes(spec, lo, hi)
    b = home.astype(jnp.int32)
    cand, _, overflow, _ = _read_bucket(buckets, b, tag)
    slot = _ctz(cand) & 7
    hit = valid & (cand != 0) & _key_at(keys, b * 8 + slot, lo, hi)
    rows = jnp.where(hit, b * 8 + slot, -1)
    # Settled misses: no other tag candidate at home and nobody passed home.
    settled = (overflow == 0) | (spec.probe_limit == 1)
    settled = settled & ((cand & (cand - jnp.uint32(1))) == 0)
    return rows, hit, settled

  # The hashes stay in the pieces: the loops below rehash the few keys they handle, which
  # is cheaper than joining and gathering four more batch-wide arrays. (Returning ``hit``
  # keeps the key gather a loop of its own: with rows its only user, XLA:CPU fused it into
  # the pieces' concatenation, one thread, element by element.)
  rows, hit, settled = _in_parts(home_probe, lo, hi, valid, parts=8)
  hist0 = jnp.zeros((PROBE_HISTOGRAM_BINS,), jnp.int32).at[0].set(jnp.sum(hit, dtype=jnp.int32))
  counting = sketch is not None and sketch.shape[0] > 0
  # Misses settled at home (about half of them at load factor 0.5, nearly all new keys) need
  # no further probe: they go first in ``order``, the ones to probe after them. Only the
  # sketch, which counts every miss, makes the loop below walk the settled ones too.
  miss = valid & ~hit
  order, n_settled, n_probe = _compact_two(miss & settled, miss & ~settled, chunk)
  start = jnp.zeros_like(n_settled) if counting else n_settled
  n_more = n_settled + n_probe - start
  # Materialise the batch-wide arrays once: fused into the loops below they would be
  # recomputed on every iteration.
  rows, settled, order = lax.optimization_barrier((rows, settled, order))

  def chunk_body(c, carry):
    rows, hist, sketch, misses, n_misses = carry
    i = lax.dynamic_slice_in_dim(order, start + c * chunk, chunk)
    inrange = c * chunk + jnp.arange(chunk) < n_more
    # Without a sketch the chunks hold only keys to probe; with one, settled misses too.
    cact = inrange & ~settled[i] if counting else inrange
    # The barrier keeps XLA from fusing these batch-wide gathers into the probe loop's body,
    # which re-ran them every round (measured 3.5x slower lookups on XLA:CPU).
    clo, chi, cact = lax.optimization_barrier((lo[i], hi[i], cact))
    chome, cstep, _, ctag = _hashes(spec, clo, chi)
    crow, cpos = _probe(spec, buckets, keys, clo, chi, chome, cstep, ctag, cact)
    found = inrange & (crow >= 0)
    rows = rows.at[jnp.where(found, i, n)].set(crow, mode="drop")
    hist = hist + _histogram(cpos, found)
    miss = inrange & ~found
    if counting:
      sketch = admission_lib.sketch_add(sketch, clo, chi, miss)
    if collect_misses:
      # Append this chunk's misses: the insert loop then walks only absent keys.
      rank = lax.associative_scan(jnp.add, miss.astype(jnp.int32)) - 1
      at = jnp.where(miss, n_misses + rank, misses.shape[0])
      misses = misses.at[at].set(i, mode="drop", unique_indices=True)
      n_misses = n_misses + jnp.sum(miss, dtype=jnp.int32)
    return rows, hist, sketch, misses, n_misses

  n_chunks = (n_more + chunk - 1) // chunk
  if collect_misses:
    # Settled misses are absent already: they stay where they are, at the head of the list.
    misses, n_misses = order, start
  else:
    misses, n_misses = jnp.zeros((0,), jnp.int32), jnp.zeros_like(start)
  carry = (rows, hist0, sketch, misses, n_misses)
  rows, hist, sketch, misses, n_misses = lax.fori_loop(0, n_chunks, chunk_body, carry)
  if collect_misses:
    order, n_more = misses, n_misses
  return rows, hist, sketch, order, n_more


def find(spec: HashTableSpec, state: HashTableState, keys: jax.Array,
         valid: jax.Array | None = None, *, chunk: int | None = None
         ) -> tuple[jax.Array, HashTableStats]:
  """Row of each key, -1 where absent or not ``valid``; changes nothing (e.g. for eval).

  keys: uint32 [..., 2] (lo, hi). Returns rows int32 [...] and the call's stats.
  """
  lo, hi, v, shape = _flatten_keys(spec, keys, valid)
  chunk = chunk or _default_chunk(lo.shape[0])
  rows, hist, _, _, _ = _lookup(spec, state.buckets, state.keys, lo, hi, v, chunk)
  stats = _stats(spec, state.size, lookups=jnp.sum(v), hits=jnp.sum(rows >= 0),
                 probe_histogram=hist)
  return rows.reshape(shape), stats


# --------------------------------------------------------------------------------------------
# Insert.


def _initial_values(spec: HashTableSpec, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """[n, dim] deterministic per-key uniform values in [-init_scale, init_scale)."""
  n = lo.shape[0]
  if spec.initializer == "zeros" or spec.dim == 0:
    return jnp.zeros((n, spec.dim), spec.dtype)
  # Wrapping uint32 arithmetic (the old `% 2**32`), so ``spec.seed`` may also be a traced
  # scalar: dynamic.py runs one program over same-shaped tables with different seeds.
  seed = jnp.uint32(_INIT_SEED) + jnp.asarray(spec.seed, jnp.uint32) * jnp.uint32(0x9E3779B9)
  k = fmix32(lo ^ fmix32(hi ^ seed))
  col = jnp.arange(spec.dim, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
  bits = fmix32(k[:, None] ^ col[None, :])
  unit = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)  # [0, 1)
  return ((unit * 2.0 - 1.0) * spec.init_scale).astype(spec.dtype)


def _claim_rounds(spec, phase, tables, step_now, lo, hi, home, step, rot, tag, active, eidx,
                  row, pos=None, max_rounds=None):
  """Claim rounds of one chunk; phase 0 takes free slots, phase 1 replaces unused entries.

  tables: (buckets, keys, last_seen, frequency). Entries start at probe position ``pos``
  (default 0) and stop after ``max_rounds`` rounds (default: when all are done). Returns the
  new tables, each entry's row and probe position, which entries took a slot, which ran out
  of window, (phase 1) the keys they replaced, and which are still active.
  """
  n = lo.shape[0]
  nb = spec.num_buckets
  cap = spec.capacity
  limit = spec.probe_limit
  scratch_size = _next_pow2(4 * n)
  frequency = tables[3]

  def cond(c):
    more = jnp.any(c[1])
    return more if max_rounds is None else more & (c[-1] < max_rounds)

  def body(c):
    (buckets, keys, last_seen), active, pos, row, won, exhausted, vlo, vhi, rounds = c
    b = _bucket_at(spec, home, step, pos)
    cand, live, _, brow = _read_bucket(buckets, b, tag)
    match = _match(keys, b, jnp.where(active, cand, jnp.uint32(0)), lo, hi)
    matched = active & (match != 0)
    row = jnp.where(matched, b * 8 + _ctz(match), row)
    if phase == 0:
      can = live != jnp.uint32(0xFF)
      slot = _pick_free(live, rot)
    else:
      cand_rows = b[:, None] * 8 + jnp.arange(8)
      used = last_seen.at[cand_rows].get(mode="promise_in_bounds") >= step_now
      is_live = ((live[:, None] >> jnp.arange(8, dtype=jnp.uint32)) & 1) == 1
      ok = is_live & ~used
      src = last_seen if spec.eviction_score == "lru" else frequency
      score = jnp.where(ok, src.at[cand_rows].get(mode="promise_in_bounds"), _INT_MAX)
      can = jnp.any(ok, axis=1)
      slot = jnp.argmin(score, axis=1).astype(jnp.int32)
    propose = active & ~matched & can
    target = b * 8 + slot
    cell = jnp.where(propose, target & (scratch_size - 1), scratch_size)
    claim = jnp.full((scratch_size,), _INT_MAX, jnp.int32).at[cell].min(eidx, mode="drop")
    win = propose & (claim.at[cell].get(mode="fill", fill_value=-1) == eidx)
    wrow = jnp.where(win, target, cap)
    if phase == 1:
      old = keys.at[jnp.where(win, target, 0)].get(mode="promise_in_bounds")
      vlo = jnp.where(win, old[:, 0], vlo)
      vhi = jnp.where(win, old[:, 1], vhi)
    keys = keys.at[wrow].set(jnp.stack([lo, hi], axis=1), mode="drop")
    # The slot's tag byte becomes ours: add (new - old) so racing winners in one word commute.
    shift = (8 * (slot % 4)).astype(jnp.uint32)
    word = jnp.take_along_axis(brow, (slot // 4)[:, None], 1)[:, 0]
    old_tag = (word >> shift) & jnp.uint32(0xFF)
    wb = jnp.where(win, b, nb)
    buckets = buckets.at[wb, slot // 4].add((tag << shift) - (old_tag << shift), mode="drop")
    if phase == 0:
      buckets = buckets.at[wb, _META].add(jnp.uint32(1) << slot.astype(jnp.uint32),
                                          mode="drop")
    if spec.on_full == "evict":
      # Marks the new row used in this step, so phase 1 never replaces it.
      last_seen = last_seen.at[wrow].set(step_now, mode="drop")
    row = jnp.where(win, target, row)
    won = won | win
    advance = active & ~matched & ~can
    pos = pos + advance.astype(jnp.int32)
    out = advance & (pos >= limit)
    exhausted = exhausted | out
    active = active & ~matched & ~win & ~out
    return (buckets, keys, last_seen), active, pos, row, won, exhausted, vlo, vhi, rounds + 1

  z = jnp.zeros_like(lo, bool)
  zu = jnp.zeros_like(lo)
  pos = jnp.zeros_like(lo, jnp.int32) if pos is None else pos
  c = (tables[:3], active, pos, row, z, z, zu, zu, jnp.zeros((), jnp.int32))
  (buckets, keys, last_seen), active, pos, row, won, exhausted, vlo, vhi, _ = lax.while_loop(
      cond, body, c)
  return (buckets, keys, last_seen, frequency), row, pos, won, exhausted, vlo, vhi, active


def _claim_free_slots(spec, tables, step_now, lo, hi, home, step, rot, tag, active, eidx,
                      row):
  """Phase-0 claim rounds of one chunk, narrowing as keys settle.

  Every round costs the chunk's full width, but after the first only ~15% of the keys are
  still looking at load factor 0.5 (lost a race or met a full bucket) and ~1% after the
  second. So one full-width round, then the rest compacted (in the same order, so the same
  priorities) into sub-chunks of an eighth, each run to completion in turn. Same results as
  one loop over everything would give, except which free slot a key takes when a key of an
  earlier sub-chunk took the one it would have won (both deterministic).
  """
  n = lo.shape[0]
  sub = n // 8
  if sub < 8:
    return _claim_rounds(spec, 0, tables, step_now, lo, hi, home, step, rot, tag, active, eidx,
                         row)[:5]
  tables, row, pos, won, exhausted, _, _, left = _claim_rounds(
      spec, 0, tables, step_now, lo, hi, home, step, rot, tag, active, eidx, row, max_rounds=1)
  order, n_left = _compact(left, sub)

  def sub_body(k, carry):
    tables, row, pos, won, exhausted = carry
    j = lax.dynamic_slice_in_dim(order, k * sub, sub)
    inrange = k * sub + jnp.arange(sub) < n_left
    # Materialised before the loop, as in _lookup.
    slo, shi, shome, sstep, srot, stag, seidx, spos, srow = lax.optimization_barrier(
        (lo[j], hi[j], home[j], step[j], rot[j], tag[j], eidx[j], pos[j], row[j]))
    tables, srow, spos, swon, sexh, _, _, _ = _claim_rounds(
        spec, 0, tables, step_now, slo, shi, shome, sstep, srot, stag, inrange, seidx, srow,
        pos=spos)
    at = jnp.where(inrange, j, n)
    row = row.at[at].set(srow, mode="drop", unique_indices=True)
    pos = pos.at[at].set(spos, mode="drop", unique_indices=True)
    won = won.at[at].set(swon, mode="drop", unique_indices=True)
    exhausted = exhausted.at[at].set(sexh, mode="drop", unique_indices=True)
    return tables, row, pos, won, exhausted

  return lax.fori_loop(0, (n_left + sub - 1) // sub, sub_body,
                       (tables, row, pos, won, exhausted))


def _add_chain(spec, buckets, home, step, npos, delta: int):
  """Adds ``delta`` to the displaced-past count of the first ``npos`` buckets of each chain."""
  nb = spec.num_buckets
  inc = jnp.uint32(delta * _OVERFLOW_ONE % (1 << 32))

  def cond(c):
    return jnp.any(npos > c[0])

  def body(c):
    d, buckets = c
    b = jnp.where(npos > d, _bucket_at(spec, home, step, d), nb)
    return d + 1, buckets.at[b, _META].add(inc, mode="drop")

  return lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), buckets))[1]


def _chain_position(spec, lo, hi, bucket):
  """Where ``bucket`` lies in the probe sequence of key (lo, hi): (home, step, position)."""
  home, step, _, _ = _hashes(spec, lo, hi)
  pos = ((bucket.astype(jnp.uint32) - home) * _inverse_odd(step)) & jnp.uint32(
      spec.num_buckets - 1)
  return home, step, pos.astype(jnp.int32)


def _init_rows(spec, values, slots, rows, lo, hi):
  """Fresh values and slots for newly (re)assigned rows; rows == capacity: skip."""
  if spec.dim:
    values = _scatter_rows(values, rows, _initial_values(spec, lo, hi))
  slots = {s.name: slots[s.name].at[rows].set(s.init, mode="drop") for s in spec.slots}
  return values, slots


def find_or_insert(spec: HashTableSpec, state: HashTableState, keys: jax.Array,
                   step: jax.Array | int = 0, valid: jax.Array | None = None, *,
                   rng: jax.Array | None = None, chunk: int | None = None
                   ) -> tuple[HashTableState, jax.Array, HashTableStats]:
  """Rows of the keys, inserting admitted new keys; the training-time lookup.

  keys:  uint32 [..., 2] (lo, hi) IDs; duplicates allowed (they share one row).
  step:  the current training step (int32): stamped into last_seen of every row looked up.
  valid: optional bool [...]; invalid queries (padding) return -1 and touch nothing.
  rng:   needed only when the admission policy has probability < 1.
  chunk: static size of the compacted second phase (default: a 32nd of the batch).

  Returns (new state, rows int32 [...] with -1 for not admitted / rejected, stats).
  Every looked-up row gets frequency += 1 per query and last_seen = step; new rows get their
  initial values (``spec.initializer``), slot init values and frequency counted from 0.
  """
  lo, hi, v, shape = _flatten_keys(spec, keys, valid)
  n = lo.shape[0]
  chunk = chunk or _default_chunk(n)
  step_now = jnp.asarray(step, jnp.int32)
  adm = spec.admission
  if adm is not None and adm.uses_rng and rng is None:
    raise ValueError(f"hash table {spec.name!r}: its admission policy has probability "
                     f"{adm.probability} < 1, so find_or_insert needs rng=")
  rows, hist, sketch, order, n_absent = _lookup(
      spec, state.buckets, state.keys, lo, hi, v, chunk, state.sketch, collect_misses=True)
  rows, lo, hi = lax.optimization_barrier((rows, lo, hi))
  hits = jnp.sum(rows >= 0, dtype=jnp.int32)
  # Metadata of the rows found. Rows new in this call are disjoint from them and get theirs
  # in the insert loop, which then scatters chunk-wide instead of batch-wide.
  frequency, last_seen = state.frequency, state.last_seen
  hit_rows = jnp.where(rows >= 0, rows, spec.capacity)
  if frequency.shape[0]:
    frequency = frequency.at[hit_rows].add(1, mode="drop")
  if last_seen.shape[0]:
    # In "evict" mode this also keeps the rows this call returns from being replaced by
    # later inserts of the same call.
    last_seen = last_seen.at[hit_rows].set(step_now, mode="drop")
  evicting = spec.on_full == "evict"

  def chunk_body(c, carry):
    tables, values, slots, rows, size, counts = carry
    i = lax.dynamic_slice_in_dim(order, c * chunk, chunk)
    absent = c * chunk + jnp.arange(chunk) < n_absent
    # Materialise the chunk before the loops (see the barrier in _lookup).
    clo, chi = lax.optimization_barrier((lo[i], hi[i]))
    chome, cstep, crot, ctag = _hashes(spec, clo, chi)
    ok = admission_lib.admit(adm, sketch, clo, chi, rng)
    active = absent & ok
    eidx = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    crow = jnp.full_like(clo, -1, jnp.int32)
    tables, crow, pos, won, exhausted = _claim_free_slots(
        spec, tables, step_now, clo, chi, chome, cstep, crot, ctag, active, eidx, crow)
    n_failures = jnp.sum(exhausted, dtype=jnp.int32)
    buckets, ckeys, cseen, cfreq = tables
    buckets = _add_chain(spec, buckets, chome, cstep, jnp.where(won, pos, 0), +1)
    new_rows = jnp.where(won, crow, spec.capacity)
    evicted = jnp.zeros((), jnp.int32)
    if evicting:
      # No lax.cond here: XLA copies every table a conditional carries. With no full probe
      # window, the loops below run zero rounds.
      tables = (buckets, ckeys, cseen, cfreq)
      tables, crow, pos1, won1, _, vlo, vhi, _ = _claim_rounds(
          spec, 1, tables, step_now, clo, chi, chome, cstep, crot, ctag, exhausted, eidx, crow)
      buckets, ckeys, cseen, cfreq = tables
      vb = _bucket_at(spec, chome, cstep, pos1)
      vhome, vstep, vpos = _chain_position(spec, vlo, vhi, vb)
      buckets = _add_chain(spec, buckets, vhome, vstep, jnp.where(won1, vpos, 0), -1)
      buckets = _add_chain(spec, buckets, chome, cstep, jnp.where(won1, pos1, 0), +1)
      new_rows = jnp.where(won1, crow, new_rows)
      evicted = jnp.sum(won1, dtype=jnp.int32)
    values, slots = _init_rows(spec, values, slots, new_rows, clo, chi)
    # Every query of a key new in this call (copies share the winner's row, taken in this
    # or an earlier chunk) counts from 0 and stamps this step.
    got = jnp.where(absent & (crow >= 0), crow, spec.capacity)
    if cfreq.shape[0]:
      cfreq = cfreq.at[new_rows].set(0, mode="drop").at[got].add(1, mode="drop")
    if cseen.shape[0] and not evicting:  # "evict" mode stamped them while claiming
      cseen = cseen.at[got].set(step_now, mode="drop")
    tables = (buckets, ckeys, cseen, cfreq)
    size = size + jnp.sum(won, dtype=jnp.int32)
    inserted = jnp.sum(won, dtype=jnp.int32) + evicted
    rows = rows.at[jnp.where(absent, i, n)].set(crow, mode="drop")
    not_admitted = jnp.sum(absent & ~ok, dtype=jnp.int32)
    rejected = jnp.sum(active & (crow < 0), dtype=jnp.int32)
    counts = counts + jnp.stack([inserted, not_admitted, rejected, n_failures, evicted])
    return tables, values, slots, rows, size, counts

  n_chunks = (n_absent + chunk - 1) // chunk
  tables = (state.buckets, state.keys, last_seen, frequency)
  carry = (tables, state.values, state.slots, rows, state.size,
           jnp.zeros_like(lo, jnp.int32, shape=(5,)))
  tables, values, slots, rows, size, counts = lax.fori_loop(0, n_chunks, chunk_body, carry)
  buckets, keys_arr, last_seen, frequency = tables
  new_state = HashTableState(buckets=buckets, keys=keys_arr, values=values, slots=slots,
                             frequency=frequency, last_seen=last_seen, sketch=sketch, size=size)
  stats = _stats(spec, size, lookups=jnp.sum(v), hits=hits, inserted=counts[0],
                 not_admitted=counts[1], rejected=counts[2], insert_failures=counts[3],
                 evicted=counts[4], probe_histogram=hist)
  return new_state, rows.reshape(shape), stats


# --------------------------------------------------------------------------------------------
# Removal: erase and eviction.


def _remove(spec: HashTableSpec, state: HashTableState, remove: jax.Array,
            chunk: int = 1 << 16) -> tuple[HashTableState, jax.Array]:
  """Frees the rows where ``remove`` [capacity] (dead rows ignored); returns the count."""
  nb = spec.num_buckets
  remove = remove & state.live_mask()
  bits = jnp.sum(jnp.where(remove.reshape(nb, 8), _slot_bits()[None, :], jnp.uint32(0)),
                 axis=1, dtype=jnp.uint32)
  buckets = state.buckets.at[:, _META].add(~bits + jnp.uint32(1))  # meta - bits, bits are set
  keys = state.keys
  slot_bucket = jnp.arange(spec.capacity, dtype=jnp.int32) // 8
  home, step, pos = _chain_position(spec, keys[:, 0], keys[:, 1], slot_bucket)
  displaced = remove & (pos > 0)
  chunk = min(chunk, spec.capacity)
  order, n_disp = _compact(displaced, chunk)

  def chunk_body(c, buckets):
    i = lax.dynamic_slice_in_dim(order, c * chunk, chunk)
    inrange = c * chunk + jnp.arange(chunk) < n_disp
    return _add_chain(spec, buckets, home[i], step[i], jnp.where(inrange, pos[i], 0), -1)

  buckets = lax.fori_loop(0, (n_disp + chunk - 1) // chunk, chunk_body, buckets)
  count = jnp.sum(remove, dtype=jnp.int32)
  return dataclasses.replace(state, buckets=buckets, size=state.size - count), count


def erase(spec: HashTableSpec, state: HashTableState, keys: jax.Array,
          valid: jax.Array | None = None) -> tuple[HashTableState, jax.Array, HashTableStats]:
  """Removes the keys that are present; their rows are free for reuse.

  Returns (new state, the rows the keys had (-1 where absent), stats with ``evicted`` =
  keys removed). Costs O(capacity): meant for occasional use, not every step.
  """
  lo, hi, v, shape = _flatten_keys(spec, keys, valid)
  rows, hist, _, _, _ = _lookup(spec, state.buckets, state.keys, lo, hi, v,
                                _default_chunk(lo.shape[0]))
  remove = jnp.zeros((spec.capacity,), bool).at[jnp.where(rows >= 0, rows, spec.capacity)].set(
      True, mode="drop")
  state, count = _remove(spec, state, remove)
  stats = _stats(spec, state.size, lookups=jnp.sum(v), hits=jnp.sum(rows >= 0), evicted=count,
                 probe_histogram=hist)
  return state, rows.reshape(shape), stats


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
  """Which entries ``evict`` removes (any rule that is set applies; unset rules are off).

  steps_to_live: remove keys not seen for more than this many steps (step - last_seen > it).
  min_frequency: remove keys looked up fewer than this many times since insertion (LFU floor).
  min_l2_norm: remove rows whose value L2 norm is below this (DeepRec's L2WeightEvict).
  max_load_factor: afterwards, remove the lowest-scored keys until size <= this * capacity.
  score: "lru" (oldest last_seen first) or "lfu" (lowest frequency first) for
    max_load_factor; ties go to the lower row.
  """

  steps_to_live: int | None = None
  min_frequency: int | None = None
  min_l2_norm: float | None = None
  max_load_factor: float | None = None
  score: Literal["lru", "lfu"] = "lru"

  def __post_init__(self):
    if self.score not in ("lru", "lfu"):
      raise ValueError(f"EvictionPolicy.score must be 'lru' or 'lfu', got {self.score!r}")
    if self.max_load_factor is not None and not 0.0 <= self.max_load_factor <= 1.0:
      raise ValueError(f"EvictionPolicy.max_load_factor must be in [0, 1], "
                       f"got {self.max_load_factor}")


def _check_policy(spec: HashTableSpec, policy: EvictionPolicy):
  where = f"hash table {spec.name!r}"
  needs_seen = policy.steps_to_live is not None or (
      policy.max_load_factor is not None and policy.score == "lru")
  needs_freq = policy.min_frequency is not None or (
      policy.max_load_factor is not None and policy.score == "lfu")
  if needs_seen and not spec.track_last_seen:
    raise ValueError(f"{where}: this eviction policy needs last_seen; set track_last_seen=True")
  if needs_freq and not spec.track_frequency:
    raise ValueError(f"{where}: this eviction policy needs frequency; set track_frequency=True")


def evict(spec: HashTableSpec, state: HashTableState, step: jax.Array | int,
          policy: EvictionPolicy) -> tuple[HashTableState, HashTableStats]:
  """Removes the entries ``policy`` selects; their rows are reused by later inserts.

  O(capacity) (and a sort over capacity for max_load_factor): call it every K steps or when
  the load factor passes a threshold (see ``maybe_evict``). Stats' ``evicted`` counts them.
  """
  _check_policy(spec, policy)
  step = jnp.asarray(step, jnp.int32)
  live = state.live_mask()
  remove = jnp.zeros_like(live)
  if policy.steps_to_live is not None:
    remove |= step - state.last_seen > policy.steps_to_live
  if policy.min_frequency is not None:
    remove |= state.frequency < policy.min_frequency
  if policy.min_l2_norm is not None:
    sq = jnp.sum(jnp.square(state.values.astype(jnp.float32)), axis=1)
    remove |= sq < np.float32(policy.min_l2_norm) ** 2
  remove &= live
  if policy.max_load_factor is not None:
    keep_at_most = int(np.floor(policy.max_load_factor * spec.capacity))
    excess = state.size - jnp.sum(remove, dtype=jnp.int32) - keep_at_most
    src = state.last_seen if policy.score == "lru" else state.frequency

    def lowest(remove):
      score = jnp.where(live & ~remove, src, _INT_MAX)
      perm = jnp.argsort(score, stable=True)
      rank = jnp.zeros((spec.capacity,), jnp.int32).at[perm].set(
          jnp.arange(spec.capacity, dtype=jnp.int32), unique_indices=True)
      return remove | (rank < excess)

    remove = lax.cond(excess > 0, lowest, lambda r: r, remove)
  state, count = _remove(spec, state, remove)
  return state, _stats(spec, state.size, evicted=count)


def maybe_evict(spec: HashTableSpec, state: HashTableState, step: jax.Array | int,
                policy: EvictionPolicy, *, every_steps: int | None = None,
                above_load_factor: float | None = None
                ) -> tuple[HashTableState, HashTableStats]:
  """``evict`` when step % every_steps == 0 or the load factor exceeds above_load_factor."""
  step = jnp.asarray(step, jnp.int32)
  due = jnp.zeros((), bool)
  if every_steps is not None:
    due |= step % every_steps == 0
  if above_load_factor is not None:
    due |= state.size > int(np.floor(above_load_factor * spec.capacity))
  return lax.cond(due, lambda s: evict(spec, s, step, policy),
                  lambda s: (s, _stats(spec, s.size)), state)


# --------------------------------------------------------------------------------------------
# Values and export.


def gather_values(state: HashTableState, rows: jax.Array, default: float = 0.0) -> jax.Array:
  """[..., dim] values of ``rows``; rows of -1 read ``default``."""
  cap, dim = state.values.shape
  flat = rows.reshape(-1)
  ok = flat >= 0
  idx = jnp.where(ok, flat, cap)
  if isinstance(default, (int, float)):   # a constant default is the gather's own fill
    out = _gather_rows(state.values, idx, default)
  else:                                    # a traced one is selected in afterwards
    out = jnp.where(ok[:, None], _gather_rows(state.values, idx),
                    jnp.asarray(default, state.values.dtype))
  return out.reshape(*rows.shape, dim)


def _gather_rows(table: jax.Array, idx: jax.Array, default: int | float = 0.0) -> jax.Array:
  """table[idx], ``default`` where idx is out of range ([0, rows)). Rows are gathered as
  [dim / 8, 8] blocks when dim allows: XLA:CPU copies such slices ~3x faster than flat rows
  (PERF-NOTES.md); same result."""
  cap, dim = table.shape
  n = idx.shape[0]
  tiled = dim % 8 == 0 and dim > 8
  src = table.reshape(cap, dim // 8, 8) if tiled else table
  # ``default`` must be a Python scalar: the gather needs a concrete fill value.
  take = lambda i: src.at[i].get(mode="fill", fill_value=default)
  return _in_parts(take, idx, parts=2).reshape(n, dim)


def _scatter_rows(table: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
  """table with rows [n, dim] written at idx (out of range: dropped), as [dim / 8, 8] blocks
  when dim allows, which XLA:CPU writes faster than flat rows (as in ``_gather_rows``)."""
  cap, dim = table.shape
  if not (dim % 8 == 0 and dim > 8):
    return table.at[idx].set(rows, mode="drop")
  rows = lax.optimization_barrier(rows).reshape(-1, dim // 8, 8)
  return table.reshape(cap, dim // 8, 8).at[idx].set(rows, mode="drop").reshape(cap, dim)


def scatter_values(state: HashTableState, rows: jax.Array, values: jax.Array) -> HashTableState:
  """Writes ``values`` [..., dim] into ``rows``; rows of -1 are skipped. Duplicate rows: any."""
  cap, dim = state.values.shape
  flat = rows.reshape(-1)
  idx = jnp.where(flat >= 0, flat, cap)
  new = state.values.at[idx].set(values.reshape(-1, dim).astype(state.values.dtype),
                                 mode="drop")
  return dataclasses.replace(state, values=new)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["count", "keys", "rows", "values", "slots", "frequency", "last_seen"],
    meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Export:
  """Live entries first (in row order), padded to capacity; only [:count] is meaningful."""

  count: jax.Array
  keys: jax.Array
  rows: jax.Array
  values: jax.Array
  slots: dict[str, jax.Array]
  frequency: jax.Array
  last_seen: jax.Array


def export(spec: HashTableSpec, state: HashTableState) -> Export:
  """Keys, rows, values, slots and metadata of the live entries (static shapes, jittable)."""
  live = state.live_mask()
  order, count = _compact(live, spec.capacity)
  valid = jnp.arange(spec.capacity) < count

  def take(x):
    if x.shape[0] == 0:
      return x
    y = x[order]
    return jnp.where(valid.reshape(-1, *([1] * (y.ndim - 1))), y, jnp.zeros((), y.dtype))

  return Export(count=count, keys=take(state.keys), rows=jnp.where(valid, order, -1),
                values=take(state.values), slots={k: take(v) for k, v in state.slots.items()},
                frequency=take(state.frequency), last_seen=take(state.last_seen))


def export_numpy(spec: HashTableSpec, state: HashTableState) -> dict[str, Any]:
  """``export`` on the host: uint64 keys and the other fields sliced to the live count."""
  e = jax.device_get(_export_jit(spec, state))
  n = int(e.count)
  return {"keys": pairs_to_keys(e.keys[:n]), "rows": e.rows[:n], "values": e.values[:n],
          "slots": {k: v[:n] for k, v in e.slots.items()},
          "frequency": e.frequency[:n], "last_seen": e.last_seen[:n]}


_export_jit = jax.jit(export, static_argnums=0)
