"""The device hash table against a plain Python dict model of the same policies.

Runs with jax_enable_x64 off (the framework's setting): keys travel as uint32 (lo, hi) pairs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.embedding import hash_table as ht
from jaxrec.embedding.admission import AdmissionPolicy

M64 = (1 << 64) - 1
# Keys chosen to collide: equal low or high halves, the extremes, and a few ordinary IDs.
UNIVERSE = [0, 1, 2, M64, M64 - 1, 1 << 32, (1 << 32) + 1, 5, 5 + (1 << 32), 5 + (7 << 40),
            1 << 63, (1 << 63) + 5, 0xFFFFFFFF, 0xFFFFFFFF00000000, 0x123456789ABCDEF0,
            0x0FEDCBA987654321, 42, 42 << 32, 99, 99 + (3 << 33), 0xDEADBEEF, 0xCAFEBABE << 32,
            7, 8]
BATCH = 8


def pairs(ids) -> jnp.ndarray:
  return jnp.asarray(ht.keys_to_pairs(np.asarray(ids, dtype=np.uint64)))


# ------------------------------------------------------------------------------------------
# An independent numpy re-statement of the admission hashes (the model's count-min sketch).


def _fmix32(h):
  h = np.asarray(h, np.uint64) & 0xFFFFFFFF
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & 0xFFFFFFFF
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & 0xFFFFFFFF
  return h ^ (h >> 16)


def _hash_pair(key: int, seed: int) -> int:
  lo, hi = key & 0xFFFFFFFF, key >> 32
  return int(_fmix32(lo ^ int(_fmix32(hi ^ seed))))


def _sketch_cols(key: int, depth: int, width: int) -> list[int]:
  return [_hash_pair(key, (d * 0x9E3779B9 + 0x5BD1E995) % (1 << 32)) & (width - 1)
          for d in range(depth)]


# ------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass
class Entry:
  row: int
  freq: int
  last_seen: int
  value: np.ndarray


class DictModel:
  """key -> Entry, with the table's admission, capacity and eviction rules."""

  def __init__(self, spec: ht.HashTableSpec):
    self.spec = spec
    self.d: dict[int, Entry] = {}
    adm = spec.admission
    self.sketch = (np.zeros((adm.sketch_depth, adm.sketch_width), np.int64)
                   if adm is not None and adm.uses_sketch else None)
    self.first_values: dict[int, np.ndarray] = {}

  def admitted(self, key: int, coin_seed: int | None) -> bool:
    adm = self.spec.admission
    if adm is None:
      return True
    ok = True
    if self.sketch is not None:
      cols = _sketch_cols(key, *self.sketch.shape)
      ok &= min(self.sketch[d, c] for d, c in enumerate(cols)) >= adm.min_count
    if adm.uses_rng:
      coin = _hash_pair((key & 0xFFFFFFFF ^ 0xA5A5A5A5) | (key >> 32 << 32), coin_seed)
      ok &= coin < adm.probability_threshold
    return ok


class Harness:
  """Runs the same operations on the table (jitted) and the model and compares them."""

  def __init__(self, spec: ht.HashTableSpec):
    self.spec = spec
    self.state = ht.init(spec)
    self.model = DictModel(spec)
    self.step = 1
    self.rng = jax.random.key(0)
    self.totals = dict(inserted=0, rejected=0, evicted=0, not_admitted=0)
    self.fns = _jitted(spec)

  # -- operations --------------------------------------------------------------------------

  def find_or_insert(self, ids: list[int], valid: list[bool]):
    spec, m = self.spec, self.model
    self.rng, sub = jax.random.split(self.rng)
    coin_seed = int(jax.random.bits(sub, (), jnp.uint32)) if (
        spec.admission is not None and spec.admission.uses_rng) else None
    before = dict(m.d)
    live_before_seen = {k: e.last_seen for k, e in m.d.items()}
    self.state, rows, stats = self.fns["foi"](self.state, pairs(ids), self.step, jnp.asarray(valid),
                                              sub)
    rows = np.asarray(rows)
    q = [(k, r) for k, r, v in zip(ids, rows, valid) if v]
    hits = [k for k, _ in q if k in before]
    misses = [k for k, _ in q if k not in before]
    if m.sketch is not None:
      for k in misses:
        for dd, c in enumerate(_sketch_cols(k, *m.sketch.shape)):
          m.sketch[dd, c] += 1
    adm = {k: m.admitted(k, coin_seed) for k in set(misses)}
    new_keys = sorted({k for k in misses if adm[k]})
    # Hits keep their rows.
    for k, r in q:
      if k in before:
        assert r == before[k].row, f"key {k:#x} moved from row {before[k].row} to {r}"
      elif not adm[k]:
        assert r == -1, f"not-admitted key {k:#x} got row {r}"
    # Which new keys got rows is the table's choice only when there is not room for all.
    got = {}
    for k, r in q:
      if k in adm and adm[k] and r >= 0:
        assert got.setdefault(k, r) == r, f"copies of key {k:#x} got rows {got[k]} and {r}"
    failed = [k for k in new_keys if k not in got]
    for k, r in q:
      if k in failed:
        assert r == -1
    free = spec.capacity - len(before)
    victims: set[int] = set()
    if spec.on_full == "reject" or not failed:
      if spec.on_full == "reject":
        # Below capacity no key is ever lost; at capacity exactly the overflow is rejected.
        assert len(got) == min(len(new_keys), free), (len(got), len(new_keys), free)
    if spec.on_full == "evict":
      # Evicted keys are the live keys that vanished; none of them was used in this step.
      e = ht.export_numpy(spec, self.state)
      now = set(int(k) for k in e["keys"])
      victims = set(before) - now
      hit_set = set(hits)
      for k in victims:
        assert k not in hit_set, f"key {k:#x} was looked up in this step but evicted"
        assert live_before_seen[k] < self.step
      assert len(got) == min(len(new_keys), free) + len(victims)
      if failed:  # a rejection only when every entry was used in this step
        n_unused = sum(1 for k in before if k not in hit_set and before[k].last_seen < self.step)
        assert n_unused == len(victims), (n_unused, len(victims))
    for k in victims:
      del m.d[k]
    rows_used = {e.row for e in m.d.values()}
    for k, r in got.items():
      assert r not in rows_used, f"new key {k:#x} got row {r} of a live key"
      rows_used.add(r)
      m.d[k] = Entry(row=r, freq=0, last_seen=self.step, value=None)
    for k, _ in q:
      if k in m.d:
        m.d[k].freq += 1
        m.d[k].last_seen = self.step
    # Initial values: deterministic per key, within the init range.
    e = ht.export_numpy(spec, self.state)
    vals = dict(zip((int(k) for k in e["keys"]), e["values"]))
    for k in got:
      v0 = vals[k]
      assert np.all(np.abs(v0) <= spec.init_scale)
      if k in m.first_values:
        np.testing.assert_array_equal(v0, m.first_values[k])
      m.first_values[k] = v0
      m.d[k].value = v0
    n_not_adm = sum(1 for k in misses if not adm[k])
    n_rej = sum(1 for k in misses if k in failed)
    self._check_stats(stats, lookups=len(q), hits=len(hits), inserted=len(got),
                      not_admitted=n_not_adm, rejected=n_rej, evicted=len(victims))
    assert int(stats.insert_failures) >= n_rej
    self.totals["inserted"] += len(got)
    self.totals["rejected"] += n_rej
    self.totals["evicted"] += len(victims)
    self.totals["not_admitted"] += n_not_adm

  def find(self, ids: list[int], valid: list[bool]):
    rows, stats = self.fns["find"](self.state, pairs(ids), jnp.asarray(valid))
    rows = np.asarray(rows)
    for k, r, v in zip(ids, rows, valid):
      want = self.model.d[k].row if (v and k in self.model.d) else -1
      assert r == want, f"find({k:#x}) = {r}, model says {want}"
    n = sum(valid)
    self._check_stats(stats, lookups=n, hits=sum(1 for k, v in zip(ids, valid)
                                                 if v and k in self.model.d))

  def erase(self, ids: list[int], valid: list[bool]):
    self.state, rows, stats = self.fns["erase"](self.state, pairs(ids), jnp.asarray(valid))
    gone = {k for k, v in zip(ids, valid) if v and k in self.model.d}
    for k in gone:
      del self.model.d[k]
    self._check_stats(stats, evicted=len(gone), lookups=sum(valid))
    self.totals["evicted"] += len(gone)

  def write(self, ids: list[int], seed: int):
    ids = sorted(set(ids))
    rows, _ = self.fns["find"](self.state, pairs(ids), jnp.ones((len(ids),), bool))
    vals = np.random.default_rng(seed).normal(size=(len(ids), self.spec.dim)).astype(np.float32)
    self.state = self.fns["scatter"](self.state, rows, jnp.asarray(vals))
    for k, v in zip(ids, vals):
      if k in self.model.d:
        self.model.d[k].value = v

  def evict(self, policy: ht.EvictionPolicy):
    m, spec = self.model, self.spec
    self.state, stats = self.fns["evict", policy](self.state, self.step)
    remove = set()
    for k, e in m.d.items():
      if policy.steps_to_live is not None and self.step - e.last_seen > policy.steps_to_live:
        remove.add(k)
      if policy.min_frequency is not None and e.freq < policy.min_frequency:
        remove.add(k)
      if policy.min_l2_norm is not None and np.sum(np.square(e.value)) < policy.min_l2_norm**2:
        remove.add(k)
    if policy.max_load_factor is not None:
      excess = len(m.d) - len(remove) - int(np.floor(policy.max_load_factor * spec.capacity))
      if excess > 0:
        score = (lambda e: e.last_seen) if policy.score == "lru" else (lambda e: e.freq)
        rest = sorted((k for k in m.d if k not in remove),
                      key=lambda k: (score(m.d[k]), m.d[k].row))
        remove |= set(rest[:excess])
    for k in remove:
      del m.d[k]
    self._check_stats(stats, evicted=len(remove))
    self.totals["evicted"] += len(remove)

  # -- checks --------------------------------------------------------------------------------

  def _check_stats(self, stats, **want):
    stats = jax.device_get(stats)
    for f, v in want.items():
      assert int(getattr(stats, f)) == v, f"stats.{f} = {int(getattr(stats, f))}, model {v}"
    assert int(stats.size) == len(self.model.d)
    np.testing.assert_allclose(float(stats.load_factor), len(self.model.d) / self.spec.capacity)

  def check_state(self):
    spec, m = self.spec, self.model
    e = ht.export_numpy(spec, self.state)
    keys = [int(k) for k in e["keys"]]
    assert sorted(keys) == sorted(m.d), "present keys differ from the model"
    assert len(set(e["rows"].tolist())) == len(keys), "two keys share a row"
    for k, r, f, s, v in zip(keys, e["rows"], e["frequency"], e["last_seen"], e["values"]):
      want = m.d[k]
      assert r == want.row, f"key {k:#x} at row {r}, model row {want.row}"
      if spec.track_frequency:
        assert f == want.freq, f"key {k:#x}: frequency {f}, model {want.freq}"
      if spec.track_last_seen:
        assert s == want.last_seen, f"key {k:#x}: last_seen {s}, model {want.last_seen}"
      np.testing.assert_array_equal(v, want.value)
    assert int(self.state.size) == len(m.d)
    check_structure(spec, self.state)


def check_structure(spec: ht.HashTableSpec, state: ht.HashTableState):
  """The bucket invariants: tags match keys, displaced-past counts match the keys' chains."""
  meta = np.asarray(state.buckets[:, 2])
  live = np.asarray(state.live_mask())
  keys = np.asarray(state.keys)
  lo, hi = jnp.asarray(keys[:, 0]), jnp.asarray(keys[:, 1])
  home, step, _, tag = (np.asarray(x) for x in ht._hashes(spec, lo, hi))
  words = np.asarray(state.buckets[:, :2])
  tags = np.stack([(words[:, s // 4] >> (8 * (s % 4))) & 0xFF for s in range(8)], 1).reshape(-1)
  assert np.all(tags[live] == tag[live]), "a live slot's tag does not match its key"
  nb = spec.num_buckets
  overflow = np.zeros(nb, np.int64)
  for r in np.nonzero(live)[0]:
    b = r // 8
    pos = 0
    while (int(home[r]) + pos * int(step[r])) % nb != b:
      pos += 1
      assert pos < spec.probe_limit, f"row {r} lies outside its key's probe window"
    for d in range(pos):
      overflow[(int(home[r]) + d * int(step[r])) % nb] += 1
  np.testing.assert_array_equal(meta >> 8, overflow)
  assert int(state.size) == int(live.sum())


@functools.lru_cache(maxsize=None)
def _jitted_base(spec: ht.HashTableSpec):
  return {
      "foi": jax.jit(lambda s, k, step, v, rng: ht.find_or_insert(spec, s, k, step, v, rng=rng)),
      "find": jax.jit(lambda s, k, v: ht.find(spec, s, k, v)),
      "erase": jax.jit(lambda s, k, v: ht.erase(spec, s, k, v)),
      "scatter": jax.jit(ht.scatter_values),
  }


class _Fns(dict):

  def __init__(self, spec):
    super().__init__(_jitted_base(spec))
    self.spec = spec

  def __missing__(self, key):
    _, policy = key
    f = _evict_fn(self.spec, policy)
    self[key] = f
    return f


@functools.lru_cache(maxsize=None)
def _evict_fn(spec, policy):
  return jax.jit(lambda s, step: ht.evict(spec, s, step, policy))


def _jitted(spec):
  return _Fns(spec)


# ------------------------------------------------------------------------------------------
# Property-based tests.

# Few policies (each is a compile), combining rules to cover their union too.
POLICIES = [
    ht.EvictionPolicy(steps_to_live=2, min_l2_norm=0.06),
    ht.EvictionPolicy(min_frequency=2, max_load_factor=0.5, score="lru"),
    ht.EvictionPolicy(max_load_factor=0.25, score="lfu"),
]

key_st = st.sampled_from(UNIVERSE)
batch_st = st.tuples(st.lists(key_st, min_size=BATCH, max_size=BATCH),
                     st.lists(st.booleans(), min_size=BATCH, max_size=BATCH).map(
                         lambda v: [x or i % 3 == 0 for i, x in enumerate(v)]))
op_st = st.one_of(
    st.tuples(st.just("foi"), batch_st),
    st.tuples(st.just("foi"), batch_st),
    st.tuples(st.just("foi"), batch_st),
    st.tuples(st.just("find"), batch_st),
    st.tuples(st.just("erase"), batch_st.map(lambda b: (b[0][:], [v and i < 3 for i, v in
                                                               enumerate(b[1])]))),
    st.tuples(st.just("write"), st.tuples(st.lists(key_st, min_size=BATCH, max_size=BATCH),
                                          st.integers(0, 1000))),
    st.tuples(st.just("evict"), st.sampled_from(POLICIES)),
    st.tuples(st.just("step"), st.integers(1, 3)),
)


def run_ops(spec, ops):
  h = Harness(spec)
  for op, arg in ops:
    if op == "foi":
      h.find_or_insert(*arg)
    elif op == "find":
      h.find(*arg)
    elif op == "erase":
      h.erase(*arg)
    elif op == "write":
      h.write(*arg)
    elif op == "evict":
      h.evict(arg)
    elif op == "step":
      h.step += arg
    h.check_state()
  return h


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=_HEALTH)
SLOW_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=_HEALTH)

# max_probes >= num_buckets: a probe window covers the table, so "window full" means "full".
SPEC_REJECT = ht.HashTableSpec(name="model_reject", capacity=16, dim=4, max_probes=64)
SPEC_EVICT = ht.HashTableSpec(name="model_evict", capacity=16, dim=4, max_probes=64,
                              on_full="evict", eviction_score="lru")
SPEC_EVICT_LFU = ht.HashTableSpec(name="model_evict_lfu", capacity=8, dim=4, on_full="evict",
                                  eviction_score="lfu")
SPEC_ADMIT = ht.HashTableSpec(
    name="model_admit", capacity=16, dim=4, max_probes=64,
    admission=AdmissionPolicy(min_count=2, sketch_depth=2, sketch_width=16))
SPEC_ADMIT_COIN = ht.HashTableSpec(
    name="model_admit_coin", capacity=16, dim=4, max_probes=64,
    admission=AdmissionPolicy(min_count=2, probability=0.7, sketch_depth=2, sketch_width=16))
SPEC_COIN = ht.HashTableSpec(name="model_coin", capacity=32, dim=4,
                             admission=AdmissionPolicy(probability=0.5))


# Each spec costs ~10 s of compiles, so the default run takes three that cover every rule.
MODEL_SPECS = [SPEC_REJECT, SPEC_EVICT, SPEC_ADMIT_COIN]
ALL_MODEL_SPECS = [SPEC_REJECT, SPEC_EVICT, SPEC_EVICT_LFU, SPEC_ADMIT, SPEC_COIN, SPEC_ADMIT_COIN]


def _run_and_account(spec, ops):
  h = run_ops(spec, ops)
  # Accounting: every key that ever got a row is present, or was counted as evicted.
  assert len(h.model.d) == h.totals["inserted"] - h.totals["evicted"]


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: s.name)
@SETTINGS
@given(ops=st.lists(op_st, min_size=1, max_size=14))
def test_matches_dict_model(spec, ops):
  _run_and_account(spec, ops)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ALL_MODEL_SPECS, ids=lambda s: s.name)
@SLOW_SETTINGS
@given(ops=st.lists(op_st, min_size=1, max_size=30))
def test_matches_dict_model_long(spec, ops):
  _run_and_account(spec, ops)


def test_fill_to_capacity_accounts_for_every_key():
  h = Harness(SPEC_REJECT)
  ids = [k for k in UNIVERSE]
  for i in range(0, len(ids), BATCH):
    h.find_or_insert(ids[i:i + BATCH], [True] * BATCH)
    h.check_state()
  assert len(h.model.d) == SPEC_REJECT.capacity
  assert h.totals["rejected"] == len(UNIVERSE) - SPEC_REJECT.capacity
  # A full table in evict mode replaces the least recently used entries instead.
  h = Harness(SPEC_EVICT)
  for i in range(0, len(ids), BATCH):
    h.find_or_insert(ids[i:i + BATCH], [True] * BATCH)
    h.step += 1
    h.check_state()
  assert h.totals["rejected"] == 0
  assert h.totals["evicted"] == len(UNIVERSE) - SPEC_EVICT.capacity
  assert set(h.model.d) == set(UNIVERSE[-SPEC_EVICT.capacity:])


def test_admission_needs_min_count_sightings():
  spec = ht.HashTableSpec(name="adm3", capacity=64, dim=2,
                          admission=AdmissionPolicy(min_count=3, sketch_width=1 << 12))
  f = jax.jit(lambda s, k: ht.find_or_insert(spec, s, k, 1))
  s = ht.init(spec)
  k = pairs([11, 12, 12, 13, 13, 13])
  s, rows, stats = f(s, k)
  # 13 was seen three times in this batch: admitted now; 11 and 12 not yet.
  assert list(np.asarray(rows) >= 0) == [False, False, False, True, True, True]
  assert int(stats.not_admitted) == 3 and int(stats.inserted) == 1
  s, rows, _ = f(s, pairs([11, 12, 0, 0, 0, 0]))
  assert list(np.asarray(rows)[:2] >= 0) == [False, True]  # 2 and 3 sightings


def test_probability_admission_is_deterministic_per_rng():
  spec = ht.HashTableSpec(name="coin", capacity=1 << 12, dim=2,
                          admission=AdmissionPolicy(probability=0.25))
  f = jax.jit(lambda s, k, rng: ht.find_or_insert(spec, s, k, 0, rng=rng))
  ids = np.random.default_rng(3).integers(0, 2**63, 1000, dtype=np.uint64)
  k = jnp.asarray(ht.keys_to_pairs(np.concatenate([ids, ids])))
  _, r1, s1 = f(ht.init(spec), k, jax.random.key(1))
  _, r2, _ = f(ht.init(spec), k, jax.random.key(1))
  _, r3, _ = f(ht.init(spec), k, jax.random.key(2))
  r1, r2, r3 = (np.asarray(r) for r in (r1, r2, r3))
  np.testing.assert_array_equal(r1, r2)
  assert np.any((r1 >= 0) != (r3 >= 0))
  np.testing.assert_array_equal(r1[:1000] >= 0, r1[1000:] >= 0)  # copies agree
  assert 150 < int(s1.inserted) < 350
  with pytest.raises(ValueError, match="coin"):
    ht.find_or_insert(spec, ht.init(spec), k)


@pytest.mark.parametrize("on_full", ["reject", "evict"])
def test_narrowing_claim_rounds_match_dict_model(on_full):
  # chunk=64 runs the claim rounds' first round at width 64, then the keys still looking in
  # sub-chunks of 8: many sub-chunks and rounds as the table fills past capacity.
  spec = ht.HashTableSpec(name=f"narrow_{on_full}", capacity=256, dim=4, max_probes=32,
                          on_full=on_full)
  h = Harness(spec)
  h.fns["foi"] = jax.jit(lambda s, k, step, v, rng: ht.find_or_insert(spec, s, k, step, v,
                                                                      rng=rng, chunk=64))
  rng = np.random.default_rng(5)
  universe = np.concatenate([np.asarray(UNIVERSE, np.uint64),
                             rng.integers(0, 2**64 - 1, 400, dtype=np.uint64, endpoint=True)])
  for _ in range(4):
    ids = universe[rng.integers(0, len(universe), 200)].tolist()  # with repeats
    h.find_or_insert(ids, (rng.random(200) < 0.95).tolist())
    h.check_state()
    h.step += 1
  assert h.totals["inserted"] > spec.capacity // 2
  if on_full == "reject":
    assert h.totals["rejected"] > 0  # the table filled up
  else:
    assert h.totals["evicted"] > 0


# ------------------------------------------------------------------------------------------
# Scale, jit and shard_map.


def test_distinct_keys_never_share_a_row():
  spec = ht.HashTableSpec(name="big", capacity=1 << 17, dim=0, max_probes=32)
  rng = np.random.default_rng(0)
  base = rng.integers(0, 2**64 - 1, 60_000, dtype=np.uint64, endpoint=True)
  # Add keys equal in one half: the same lo with other hi, and the same hi with other lo.
  lo_twins = (base[:20_000] & np.uint64(0xFFFFFFFF)) | (
      rng.integers(0, 2**32, 20_000, dtype=np.uint64) << np.uint64(32))
  hi_twins = (base[20_000:40_000] & np.uint64(0xFFFFFFFF00000000)) | rng.integers(
      0, 2**32, 20_000, dtype=np.uint64)
  ids = np.concatenate([base, lo_twins, hi_twins, np.array([0, M64], np.uint64)])
  ids = np.concatenate([ids, ids[rng.integers(0, len(ids), 8_000)]])  # repeats
  rng.shuffle(ids)
  ids = ids[:100_000]
  foi = jax.jit(lambda s, k: ht.find_or_insert(spec, s, k, 1))
  s, rows, stats = foi(ht.init(spec), jnp.asarray(ht.keys_to_pairs(ids)))
  rows = np.asarray(rows)
  uniq, inv = np.unique(ids, return_inverse=True)
  assert int(stats.rejected) == 0 and np.all(rows >= 0)
  assert int(stats.inserted) == len(uniq) == int(stats.size)
  first = np.full(len(uniq), -1)
  first[inv[::-1]] = rows[::-1]
  np.testing.assert_array_equal(rows, first[inv])  # copies share a row
  assert len(np.unique(first)) == len(uniq)  # distinct keys, distinct rows
  found, fstats = jax.jit(lambda s, k: ht.find(spec, s, k))(s, jnp.asarray(
      ht.keys_to_pairs(ids)))
  np.testing.assert_array_equal(np.asarray(found), rows)
  assert int(fstats.hits) == len(ids)
  e = ht.export_numpy(spec, s)
  np.testing.assert_array_equal(np.sort(e["keys"]), uniq)
  check_structure_fast(spec, s)
  # Churn: erase half, insert as many new keys; survivors keep their rows, counts stay exact.
  gone = uniq[rng.permutation(len(uniq))[:len(uniq) // 2]]
  s, _, est = jax.jit(lambda s, k: ht.erase(spec, s, k))(s, jnp.asarray(ht.keys_to_pairs(gone)))
  assert int(est.evicted) == len(gone) == len(uniq) - int(s.size)
  check_structure_fast(spec, s)
  fresh = rng.integers(0, 2**64 - 1, 100_000, dtype=np.uint64, endpoint=True)
  fresh = np.setdiff1d(fresh, uniq)[:len(gone)]
  s, new_rows, stats = foi(s, jnp.asarray(ht.keys_to_pairs(np.resize(fresh, 100_000))))
  assert int(stats.inserted) == len(fresh) and int(stats.rejected) == 0
  keep = np.setdiff1d(uniq, gone)
  rows_keep, _ = jax.jit(lambda s, k: ht.find(spec, s, k))(
      s, jnp.asarray(ht.keys_to_pairs(np.resize(keep, 100_000))))
  np.testing.assert_array_equal(np.asarray(rows_keep)[:len(keep)],
                                first[np.searchsorted(uniq, keep)])
  assert len(np.unique(np.concatenate([np.asarray(rows_keep)[:len(keep)],
                                       np.unique(np.asarray(new_rows))]))) == len(uniq)
  check_structure_fast(spec, s)


def check_structure_fast(spec, state):
  """Vectorised overflow-count check for big tables (see check_structure)."""
  live = np.asarray(state.live_mask())
  keys = state.keys
  r = np.nonzero(live)[0]
  home, step, pos = ht._chain_position(spec, keys[r, 0], keys[r, 1], jnp.asarray(r // 8))
  home, step, pos = np.asarray(home, np.int64), np.asarray(step, np.int64), np.asarray(pos)
  assert pos.max() < spec.probe_limit
  overflow = np.zeros(spec.num_buckets, np.int64)
  for d in range(int(pos.max())):
    sel = pos > d
    np.add.at(overflow, (home[sel] + d * step[sel]) % spec.num_buckets, 1)
  np.testing.assert_array_equal(np.asarray(state.buckets[:, 2]) >> 8, overflow)


@pytest.mark.slow
def test_churn_erase_and_reinsert_keeps_structure():
  spec = ht.HashTableSpec(name="churn", capacity=1 << 10, dim=2, max_probes=16)
  foi = jax.jit(lambda s, k, step: ht.find_or_insert(spec, s, k, step))
  ers = jax.jit(lambda s, k: ht.erase(spec, s, k))
  rng = np.random.default_rng(1)
  s = ht.init(spec)
  live: dict[int, int] = {}
  for it in range(6):
    ids = rng.integers(0, 2**64 - 1, 256, dtype=np.uint64, endpoint=True)
    s, rows, stats = foi(s, jnp.asarray(ht.keys_to_pairs(ids)), it)
    rows = np.asarray(rows)
    for k, r in zip(ids.tolist(), rows.tolist()):
      if r >= 0:
        assert live.setdefault(k, r) == r
    # Rejections only when a probe window is full, and always counted.
    assert int(stats.rejected) == int(np.sum(rows < 0))
    keys_live = np.asarray(list(live), np.uint64)
    out = keys_live[rng.choice(len(keys_live), size=min(len(live), 200), replace=False)]
    s, _, est = ers(s, jnp.asarray(ht.keys_to_pairs(out)))
    assert int(est.evicted) == len(out)
    for k in out.tolist():
      del live[k]
    assert int(s.size) == len(live)
    check_structure_fast(spec, s)
  found, _ = jax.jit(lambda s, k: ht.find(spec, s, k))(
      s, jnp.asarray(ht.keys_to_pairs(np.asarray(list(live), np.uint64))))
  np.testing.assert_array_equal(np.asarray(found), np.asarray(list(live.values())))


def test_rejects_bad_keys_with_the_table_name():
  spec = ht.HashTableSpec(name="user_id", capacity=64, dim=2)
  with pytest.raises(ValueError, match="user_id"):
    ht.find(spec, ht.init(spec), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="user_id"):
    ht.HashTableSpec(name="user_id", capacity=100, dim=2)


def test_slots_are_initialised_for_new_rows():
  spec = ht.HashTableSpec(name="adagrad", capacity=64, dim=2,
                          slots=(ht.SlotSpec("accumulator", (), jnp.float32, 0.1),))
  s = ht.init(spec)
  s = dataclasses.replace(s, slots={"accumulator": s.slots["accumulator"] + 5.0})
  s, rows, _ = jax.jit(lambda s, k: ht.find_or_insert(spec, s, k, 0))(s, pairs([3, 4]))
  acc = np.asarray(s.slots["accumulator"])
  np.testing.assert_allclose(acc[np.asarray(rows)], 0.1)
  assert np.sum(acc == np.float32(5.1)) == 62


@pytest.mark.parametrize("dim", [4, 64, 20])
def test_gather_values_matches_numpy_take(dim):
  # dim 64 takes the [dim / 8, 8] block gather, 4 and 20 the flat one.
  spec = ht.HashTableSpec(name="gather", capacity=64, dim=dim)
  s, rows, _ = jax.jit(ht.find_or_insert, static_argnums=0)(spec, ht.init(spec),
                                                             pairs(range(100, 140)), 0)
  rng = np.random.default_rng(dim)
  values = rng.standard_normal((64, dim)).astype(np.float32)
  s = dataclasses.replace(s, values=jnp.asarray(values))
  query = np.concatenate([np.asarray(rows), [-1, -1]])[rng.permutation(42)].reshape(6, 7)
  got = jax.jit(lambda s, r: ht.gather_values(s, r, default=-2.5))(s, jnp.asarray(query))
  want = np.where((query >= 0)[..., None], values[np.maximum(query, 0)], np.float32(-2.5))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_shard_map_one_table_per_shard():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (JAX_NUM_CPU_DEVICES=8)")
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = ht.HashTableSpec(name="sharded", capacity=256, dim=4)
  n = 64
  rng = np.random.default_rng(2)
  ids = rng.integers(0, 500, (8, n)).astype(np.uint64) * np.uint64(0x100000001)
  keys = jnp.asarray(ht.keys_to_pairs(ids))
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (8, *x.shape)), ht.init(spec))
  sh = NamedSharding(mesh, P("x"))
  stacked, keys = jax.device_put((stacked, keys), sh)

  def per_shard(state, k):
    state = jax.tree.map(lambda x: x[0], state)
    state, rows, stats = ht.find_or_insert(spec, state, k[0], 1)
    values = ht.gather_values(state, rows)
    return (jax.tree.map(lambda x: x[None], state), rows[None], values[None],
            jax.tree.map(lambda x: x[None], stats))

  f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("x"), P("x")),
                            out_specs=(P("x"), P("x"), P("x"), P("x"))))
  state, rows, values, stats = jax.device_get(f(stacked, keys))
  @jax.jit
  def reference(k):  # the same shard's work on one device, outside shard_map
    s, r, st = ht.find_or_insert(spec, ht.init(spec), k, 1)
    return r, ht.gather_values(s, r), st

  for i in range(8):
    ref_rows, ref_values, ref_stats = reference(jnp.asarray(ht.keys_to_pairs(ids[i])))
    np.testing.assert_array_equal(rows[i], np.asarray(ref_rows))
    np.testing.assert_array_equal(values[i], np.asarray(ref_values))
    assert int(stats.inserted[i]) == int(ref_stats.inserted) == len(np.unique(ids[i]))


def test_maybe_evict_every_k_steps_or_above_load_factor():
  spec = ht.HashTableSpec(name="periodic", capacity=64, dim=2)
  policy = ht.EvictionPolicy(steps_to_live=3)
  foi = jax.jit(lambda s, k, step: ht.find_or_insert(spec, s, k, step))
  ev = jax.jit(lambda s, step: ht.maybe_evict(spec, s, step, policy, every_steps=10,
                                              above_load_factor=0.5))
  s, _, _ = foi(ht.init(spec), pairs(range(8)), 1)
  s, st0 = ev(s, 7)  # not a multiple of 10, load 1/8: nothing happens
  assert int(st0.evicted) == 0 and int(s.size) == 8
  s, st1 = ev(s, 10)  # due: the 8 keys were last seen 9 steps ago
  assert int(st1.evicted) == 8 and int(s.size) == 0
  s, _, _ = foi(s, pairs(range(100, 140)), 11)  # load 40/64 > 0.5
  s, _, _ = foi(s, pairs(range(100, 110)), 14)
  s, st2 = ev(s, 15)  # due by load: the 30 keys not seen since step 11 go
  assert int(st2.evicted) == 30 and int(s.size) == 10
  assert sorted(ht.export_numpy(spec, s)["keys"].tolist()) == list(range(100, 110))


def test_large_batches_split_in_pieces_match_small_batches_and_a_dict():
  # Batches of >= 2^15 keys run the home probe as eight pieces and the value gather as two
  # halves (both cores on a CPU); the rows and values must be those of small, unsplit
  # batches and a dict.
  n = (1 << 15) + 1000
  assert n >= ht._SPLIT_ROWS
  spec = ht.HashTableSpec(name="halves", capacity=1 << 17, dim=16)
  rng = np.random.default_rng(7)
  both = np.unique(rng.integers(1, 2**63, size=2 * n + 100, dtype=np.uint64))
  both = rng.permutation(both)[:n + n // 2]
  ids, absent = both[:n], both[n:]
  foi = jax.jit(ht.find_or_insert, static_argnums=0)
  state, rows, stats = foi(spec, ht.init(spec), pairs(ids), 0)
  rows = np.asarray(rows)
  assert int(stats.inserted) == n and (rows >= 0).all() and len(set(rows.tolist())) == n
  table = dict(zip(ids.tolist(), rows.tolist()))
  # Half present (shuffled, some twice), half absent.
  query = np.concatenate([rng.choice(ids, size=n - n // 2), absent])[rng.permutation(n)]
  want = np.asarray([table.get(k, -1) for k in query.tolist()])
  got, _ = jax.jit(ht.find, static_argnums=0)(spec, state, pairs(query))
  np.testing.assert_array_equal(np.asarray(got), want)
  small = jax.jit(ht.find, static_argnums=0)
  pieces = [np.asarray(small(spec, state, pairs(query[i:i + 4096]))[0])
            for i in range(0, n, 4096)]
  np.testing.assert_array_equal(np.concatenate(pieces), want)
  values = np.asarray(state.values)
  vals = np.asarray(jax.jit(lambda s, r: ht.gather_values(s, r, default=7.0))(state, got))
  ref = np.where((want >= 0)[:, None], values[np.maximum(want, 0)], np.float32(7.0))
  np.testing.assert_array_equal(vals, ref)


def test_large_batch_with_count_admission_counts_settled_misses():
  # With a count sketch, misses settled at home still walk the probe chunks (to be counted);
  # without one they skip them. A batch of >= 2^15 queries: present keys, new keys seen
  # once, twice or three times, against a numpy count-min sketch of the same hashes.
  adm = AdmissionPolicy(min_count=2, sketch_depth=2, sketch_width=1 << 16)  # some collisions
  spec = ht.HashTableSpec(name="admit_large", capacity=1 << 17, dim=8, admission=adm)
  rng = np.random.default_rng(11)
  ids = rng.permutation(np.unique(rng.integers(1, 2**64 - 1, size=40_000, dtype=np.uint64)))
  old, new = ids[:20_000], ids[20_000:32_000]
  foi = jax.jit(ht.find_or_insert, static_argnums=0)
  # Fill with admission off (same hashes and layout), then count the new keys from zero.
  fill_spec = dataclasses.replace(spec, admission=None)
  state, old_rows, _ = foi(fill_spec, ht.init(fill_spec), pairs(old), 0)
  state = dataclasses.replace(state, sketch=ht.init(spec).sketch)
  copies = rng.integers(1, 4, size=len(new))
  query = np.concatenate([old[:(1 << 15) - int(copies.sum()) + 2000], np.repeat(new, copies)])
  query = query[rng.permutation(len(query))]
  assert len(query) >= ht._SPLIT_ROWS
  sketch = np.zeros((adm.sketch_depth, adm.sketch_width), np.int64)
  present = dict(zip(old.tolist(), np.asarray(old_rows).tolist()))
  for k in query.tolist():
    if k not in present:
      for d, c in enumerate(_sketch_cols(k, adm.sketch_depth, adm.sketch_width)):
        sketch[d, c] += 1
  admitted = {k for k in new.tolist()
              if min(sketch[d, c] for d, c in enumerate(
                  _sketch_cols(k, adm.sketch_depth, adm.sketch_width))) >= adm.min_count}
  state, rows, stats = foi(spec, state, pairs(query), 1)
  rows = np.asarray(rows)
  np.testing.assert_array_equal(np.asarray(state.sketch), sketch)
  got: dict[int, int] = {}
  for k, r in zip(query.tolist(), rows.tolist()):
    if k in present:
      assert r == present[k]
    elif k in admitted:
      assert r >= 0 and got.setdefault(k, r) == r  # every copy of a key gets its one row
    else:
      assert r == -1
  assert len(got) == len(admitted) and len(set(got.values())) == len(admitted)
  assert not set(got.values()) & set(present.values())
  assert int(stats.inserted) == len(admitted)
  assert int(stats.not_admitted) == int(np.isin(query, list(set(new.tolist()) - admitted)).sum())
  # The sketch over-counts, never under-counts: every key seen twice is in; of the keys seen
  # once, most are out and a few in (collisions), so both answers were exercised.
  once = {k for k, c in zip(new.tolist(), copies) if c == 1}
  assert set(new.tolist()) - once <= admitted
  assert 0 < len(once & admitted) < len(once) // 2
