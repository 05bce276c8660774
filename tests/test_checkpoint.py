"""Snapshots: exact resume, incremental chains, resharding, hash-table re-routing, retention,
corruption fallback, rollback and warm start (the last two end to end through the CLI)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.checkpoint import (AnomalyGuard, Checkpointer, CorruptCheckpointError, GuardOptions,
                               HashShardsLayout, LayoutMismatchError, SnapshotOptions,
                               StackedEmbeddingLayout, checkpoint_dir, incremental,
                               list_versions)
from jaxrec.checkpoint import from_config
from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding import hash_table as ht
from jaxrec.train import builders
from jaxrec.train.step import jit_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "dlrm_synthetic.py")
B = 64
SMALL = dict(min_row_group_bytes=1024)


def tiny_config(cards=(40, 300, 1000, 7), devices: int | None = None, sharded=False,
                dynamic=False):
  """A seconds-sized DLRM run on the synthetic stream (``sharded``: no replicated tables;
  ``dynamic``: every table a hash table)."""
  c = from_config.load_config(CONFIG + ":tiny")
  c.data.preset = "kaggle"  # the preset that takes explicit cardinalities
  c.data.synthetic = ml_collections.ConfigDict({"cardinalities": tuple(cards),
                                                "weighted_features": len(cards), "num_pairs": 2})
  c.data.batch_size = B
  c.data.train_examples = B * 100
  c.model.embedding_dim = 8
  c.model.bottom_mlp = (16, 8)
  c.model.top_mlp = (16, 1)
  c.embedding.max_rows = 512
  c.embedding.min_rows = 16
  c.optimizer.warmup_steps = 5
  if sharded:
    c.embedding.replicate_below_kib = 0
  if dynamic:
    c.embedding.dynamic = True
  if devices is not None:
    c.mesh = ml_collections.ConfigDict({"shape": (devices,)})
  return c


class Trainer:
  """A config's run, stepped by hand: batch i holds examples [i*B, (i+1)*B)."""

  def __init__(self, config):
    self.run = from_config.build(config)
    self.train_step, _ = jit_steps(self.run.graphdef, self.run.emb, self.run.tx, self.run.state)

  def fresh(self):
    """A copy of the initial state (the step donates its input)."""
    copy = lambda x: x.copy() if x.size else jax.device_put(np.zeros(x.shape, x.dtype),
                                                             x.sharding)
    return jax.tree.map(copy, self.run.state)

  def batch(self, i: int, poison: bool = False):
    examples = self.run.stream.examples(i * B, (i + 1) * B)
    b = builders.device_batch(self.run.emb.check_batch(examples))
    if poison:
      b["dense"] = np.full_like(b["dense"], np.nan)
    return jax.device_put(b, self.run.emb.batch_sharding)

  def step(self, state, i: int, poison: bool = False):
    return self.train_step(state, self.batch(i, poison))


_TRAINERS: dict = {}


def trainer(cards=(40, 300, 1000, 7), devices=8, sharded=False, dynamic=False) -> Trainer:
  """One Trainer per configuration for the whole module (building and compiling is slow)."""
  key = (tuple(cards), devices, sharded, dynamic)
  if key not in _TRAINERS:
    _TRAINERS[key] = Trainer(tiny_config(cards, devices, sharded, dynamic))
  return _TRAINERS[key]


def host(tree):
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
  ha, hb = host(a), host(b)
  assert len(ha) == len(hb)
  for x, y in zip(ha, hb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


# ---- exact resume --------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [1, 8])
def test_resume_is_identical_to_never_stopping(tmp_path, devices):
  t = trainer(devices=devices)
  ck = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=4, **SMALL),
                    layouts=t.run.layouts)
  state, losses = t.fresh(), {}
  ck.save(0, state, data_position={"example": 0})
  for i in range(12):
    state, m = t.step(state, i)
    losses[i] = float(m["loss"])
    ck.save(int(state.step), state, data_position={"example": (i + 1) * B})
  ck.wait_until_finished()
  assert [(v.step, v.kind) for v in ck.versions()] == [
      (0, "full"), (4, "incremental"), (8, "incremental"), (12, "incremental")]

  # A new process would build the same fresh state, then restore version 8 into it.
  t2 = t
  ck2 = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=4, **SMALL),
                     layouts=t2.run.layouts)
  r = ck2.restore(t2.fresh(), step=8)
  assert r.step == 8 and int(r.state.step) == 8 and r.data_position == {"example": 8 * B}
  s2 = r.state
  for i in range(r.data_position["example"] // B, 12):
    s2, m = t2.step(s2, i)
    assert float(m["loss"]) == losses[i]
  assert_trees_equal(s2, state)
  # The newest version (an increment chain 0 <- 4 <- 8 <- 12) is the same state.
  assert_trees_equal(ck2.restore(t2.fresh()).state, state)


@pytest.mark.slow  # compiling the dynamic train step takes a while on CPU
def test_dynamic_tables_resume_exactly_and_reshard(tmp_path):
  """Hash tables (keys, rows, slots, frequency, last-seen, buckets) in a real run: an
  increment chain resumes bit for bit, and restores onto 4 devices with keys re-routed."""
  t = trainer(cards=(40, 300, 1000, 7), dynamic=True)
  ck = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=3, **SMALL),
                    layouts=t.run.layouts)
  state = t.fresh()
  ck.save(0, state, data_position={"example": 0})
  infos = []
  for i in range(6):
    state, m = t.step(state, i)
    infos.append(ck.save(int(state.step), state, data_position={"example": (i + 1) * B}))
  ck.wait_until_finished()
  assert [x.kind for x in infos if x] == ["incremental", "incremental"]
  assert int(m["dynamic/size"]) > 0
  r = ck.restore(t.fresh(), step=3)
  s2 = r.state
  for i in range(3, 6):
    s2, _ = t.step(s2, i)
  assert_trees_equal(s2, state)

  want = t.run.emb.export(state.emb)
  run4 = from_config.build(tiny_config(devices=4, dynamic=True))
  r4 = Checkpointer(str(tmp_path), layouts=run4.layouts, read_only=True).restore(run4.state)
  assert any("re-routed from 8 to 4 shards" in line for line in r4.report), r4.report
  got = run4.emb.export(r4.state.emb)
  for name in want:
    for k in ("keys", "values", "frequency", "last_seen"):
      np.testing.assert_array_equal(got[name][k], want[name][k], err_msg=f"{name} {k}")
    for k in want[name]["slots"]:
      np.testing.assert_array_equal(got[name]["slots"][k], want[name]["slots"][k])
  assert_trees_equal(r4.state.params, state.params)


# ---- incremental snapshots -------------------------------------------------------------------


def _touch_rows(emb, state, rng, fraction):
  tabs, slots = emb.to_dense(state.emb)
  for name in tabs:
    n = max(1, int(fraction * len(tabs[name])))
    rows = rng.choice(len(tabs[name]), n, replace=False)
    tabs[name][rows] += rng.normal(size=(n, tabs[name].shape[1])).astype(np.float32)
    slots[name]["acc"][rows] += 1.0
  return state.replace(emb=emb.from_dense(tabs, slots))


def test_incremental_chain_is_bit_identical_to_full_saves(tmp_path):
  t = trainer(sharded=True)
  emb = t.run.emb
  assert any(not s.replicated for s in emb.stacks)
  opts = SnapshotOptions(save_every_steps=1, full_every=4, **SMALL)
  inc = Checkpointer(str(tmp_path / "inc"), opts, layouts=t.run.layouts)
  full = Checkpointer(str(tmp_path / "full"), SnapshotOptions(
      save_every_steps=1, incremental=False, keep_latest=10, **SMALL),
                      layouts=t.run.layouts)
  rng = np.random.default_rng(0)
  state, states = t.fresh(), {}
  for step in range(6):
    if step:
      state = _touch_rows(emb, state, rng, 0.02)
      state = state.replace(step=jnp.asarray(step, jnp.int32))
    states[step] = state
    a = inc.save(step, state, data_position={"example": step})
    full.save(step, state, data_position={"example": step})
    if 0 < step < 4:
      assert a.kind == "incremental" and 0 < a.dirty_rows < 0.2 * a.total_rows, a
  inc.wait_until_finished()
  full.wait_until_finished()
  # full_every=4: chains 0 <- 1 <- 2 <- 3 and 4 <- 5. The latest 3 are 3, 4, 5, and 3 needs
  # 0, 1 and 2, so retention keeps them all.
  assert [(v.step, v.kind[0]) for v in inc.versions()] == [
      (0, "f"), (1, "i"), (2, "i"), (3, "i"), (4, "f"), (5, "i")]
  for v in inc.versions():
    a = inc.restore(t.fresh(), step=v.step).state
    b = full.restore(t.fresh(), step=v.step).state
    assert_trees_equal(a, b)
    assert_trees_equal(a, states[v.step])


def test_fingerprints_catch_any_single_bit(tmp_path):
  mesh = make_mesh((8,))
  x = jax.device_put(jnp.arange(8 * 64 * 4, dtype=jnp.float32).reshape(8, 64, 4),
                     NamedSharding(mesh, P("data")))
  acc = jax.device_put(jnp.ones((8, 64)), NamedSharding(mesh, P("data")))
  g = incremental.RowGroup("g", ("x", "acc"), 2, (8, 64))
  fp = incremental.fingerprint_group(g, [x, acc])
  assert fp.split is not None  # one shard_map over the mesh
  rng = np.random.default_rng(1)
  for _ in range(20):
    d, r, c, bit = (int(rng.integers(8)), int(rng.integers(64)), int(rng.integers(4)),
                    int(rng.integers(32)))
    bits = np.asarray(x).view(np.uint32).copy()
    bits[d, r, c] ^= np.uint32(1 << bit)
    y = jax.device_put(bits.view(np.float32), x.sharding)
    delta, _ = incremental.diff_group(g, [y, acc], fp)
    assert delta.rows.tolist() == [d * 64 + r]
    np.testing.assert_array_equal(delta.values["x"][0], bits.view(np.float32)[d, r])
  acc2 = acc.at[3, 5].set(2.0)
  delta, _ = incremental.diff_group(g, [x, acc2], fp)
  assert delta.rows.tolist() == [3 * 64 + 5]
  same, _ = incremental.diff_group(g, [x + 0.0, acc], fp)  # same bits, new buffers
  assert len(same.rows) == 0


# ---- resharding -------------------------------------------------------------------------------


def test_reshard_8_4_1_8_in_process(tmp_path):
  """Tables saved on 8 devices (after increments) restore onto 4, then 1, then 8 devices,
  each hop saved and restored again; logical tables, slots and dense state never change."""
  src = trainer(sharded=True)
  rng = np.random.default_rng(2)
  state = src.fresh()
  d = str(tmp_path)
  ck = Checkpointer(d, SnapshotOptions(save_every_steps=1, **SMALL), layouts=src.run.layouts)
  for step in range(3):
    state = _touch_rows(src.run.emb, state, rng, 0.05).replace(step=jnp.asarray(step))
    ck.save(step, state, data_position={"example": step})
  ck.wait_until_finished()
  want_t, want_s = src.run.emb.to_dense(state.emb)
  step = 2
  for n in (4, 1, 8):
    run = from_config.build(tiny_config(sharded=True, devices=n))
    ck = Checkpointer(d, SnapshotOptions(save_every_steps=1, **SMALL), layouts=run.layouts)
    r = ck.restore(run.state)
    assert r.step == step
    got_t, got_s = run.emb.to_dense(r.state.emb)
    for name in want_t:
      np.testing.assert_array_equal(got_t[name], want_t[name])
      np.testing.assert_array_equal(got_s[name]["acc"], want_s[name]["acc"])
    assert_trees_equal(r.state.params, state.params)
    assert r.state.emb.tables[run.emb.stacks[0].name].sharding.mesh.size == n
    step += 1
    ck.save(step, r.state.replace(step=jnp.asarray(step)), data_position={"example": step},
            force=True)
    ck.wait_until_finished()


def _mixed_engine(mesh_shape):
  """Every sharding type, two optimizers (row-wise and per-column slots), bf16 rows."""
  from jaxrec.embedding.sharded import ShardedEmbedding
  from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec
  ada = SparseOptimizer(name="rowwise_adagrad", initial_accumulator=0.1)
  adam = SparseOptimizer(name="adam")
  mesh = make_mesh(mesh_shape)
  two_axes = len(mesh_shape) == 2
  tables = [
      TableSpec("cw", 200, 16, ada, sharding="column_wise" if mesh.size > 1 else None),
      TableSpec("rw", 333, 8, adam, sharding="row_wise" if mesh.size > 1 else None),
      TableSpec("trw", 120, 8, ada, sharding="table_row_wise" if two_axes else None),
      TableSpec("tw", 50, 8, ada, sharding="table_wise" if mesh.size > 1 else None),
      TableSpec("dp", 30, 8, ada, sharding="data_parallel"),
      TableSpec("bf", 64, 8, ada, dtype="bfloat16")]
  feats = [FeatureSpec(t.name, t.name, max_ids=1) for t in tables]
  return ShardedEmbedding(tables, feats, mesh, batch_size=8 * mesh.size)


@pytest.mark.parametrize("shapes", [
    ((4,), (1,)), pytest.param(((8,), (2, 4)), marks=pytest.mark.slow)])
def test_every_sharding_type_survives_any_mesh_change(tmp_path, shapes):
  rng = np.random.default_rng(5)
  src = _mixed_engine((2, 4))
  tabs, slots = src.to_dense(src.init(0))
  for name in tabs:
    tabs[name] = rng.normal(size=tabs[name].shape).astype(np.float32)
    for k in slots[name]:
      slots[name][k] = rng.random(size=slots[name][k].shape).astype(np.float32)
  state = src.from_dense(tabs, slots)
  want = src.to_dense(state)  # bf16 rounding included
  ck = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=1),
                    layouts={"": StackedEmbeddingLayout(src)})
  ck.save(0, state)
  ck.wait_until_finished()
  for shape in shapes:
    dst = _mixed_engine(shape)
    r = Checkpointer(str(tmp_path), layouts={"": StackedEmbeddingLayout(dst)},
                     read_only=True).restore(dst.init(1))
    got = dst.to_dense(r.state)
    for name in want[0]:
      np.testing.assert_array_equal(got[0][name], want[0][name], err_msg=f"{shape} {name}")
      for k in want[1][name]:
        np.testing.assert_array_equal(got[1][name][k], want[1][name][k],
                                      err_msg=f"{shape} {name} {k}")


@functools.lru_cache(maxsize=None)
def _hash_insert(spec):
  return jax.jit(lambda st, k, v, step: ht.find_or_insert(spec, st, k, step, v)[:2])


def _insert(spec, st, keys, step, width=128):
  """find_or_insert of up to ``width`` keys at one static shape (one compile per spec)."""
  assert len(keys) <= width
  padded = np.zeros(width, np.uint64)
  padded[:len(keys)] = keys
  st, rows = _hash_insert(spec)(st, jnp.asarray(ht.keys_to_pairs(padded)),
                                jnp.arange(width) < len(keys), step)
  return st, rows[:len(keys)]


def _hash_shards(spec, keys_per_shard, mesh):
  """Stacked shards (leading axis) holding the given keys, values = f(key)."""
  shards = []
  for keys in keys_per_shard:
    st, rows = _insert(spec, ht.init(spec), keys, 3)
    vals = (keys % 1000).astype(np.float32)[:, None] * np.arange(1, spec.dim + 1,
                                                                 dtype=np.float32)
    st = ht.scatter_values(st, rows, jnp.asarray(vals))
    st = dataclasses.replace(st, slots={"acc": st.slots["acc"].at[rows].set(
        jnp.asarray((keys % 7).astype(np.float32)))})
    shards.append(st)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *shards)
  return jax.device_put(stacked, NamedSharding(mesh, P(mesh.axis_names)))


@functools.lru_cache(maxsize=None)
def _hash_find(spec):
  return jax.jit(lambda st, k, v: ht.find(spec, st, k, v)[0])


def _lookup_all(spec, state, keys, n, gone=()):
  """(values, acc, frequency) of each key, found on its owner shard; ``gone`` keys must be
  found nowhere."""
  owner = HashShardsLayout(spec, n).shard_of(ht.keys_to_pairs(keys), n)
  host_state = jax.device_get(state)
  find = _hash_find(spec)
  pairs = jnp.asarray(ht.keys_to_pairs(keys))
  vals = np.zeros((len(keys), spec.dim), np.float32)
  acc, freq = np.zeros(len(keys), np.float32), np.zeros(len(keys), np.int32)
  for o in range(n):
    shard = jax.tree.map(lambda a: jnp.asarray(a[o]), host_state)
    rows = np.asarray(find(shard, pairs, jnp.asarray(owner == o)))
    mine = owner == o
    assert (rows[mine] >= 0).all(), f"keys lost on shard {o}: {keys[mine & (rows < 0)]}"
    vals[mine] = np.asarray(shard.values)[rows[mine]]
    acc[mine] = np.asarray(shard.slots["acc"])[rows[mine]]
    freq[mine] = np.asarray(shard.frequency)[rows[mine]]
    if len(gone):
      g = jnp.asarray(ht.keys_to_pairs(np.asarray(gone)))
      assert (np.asarray(find(shard, g, jnp.ones(len(gone), bool))) == -1).all()
  return vals, acc, freq


HSPEC = ht.HashTableSpec("dyn", capacity=256, dim=4, slots=(ht.SlotSpec("acc"),))


@pytest.fixture(scope="module")
def hash_snapshot(tmp_path_factory):
  """4 hash shards saved full, then changed by inserts and erasures and saved again (an
  increment): (directory, the final tree, live keys, erased keys)."""
  d = str(tmp_path_factory.mktemp("hash"))
  spec = HSPEC
  keys = np.random.default_rng(3).choice(2**40, 300, replace=False).astype(np.uint64)
  keys[:3] = [0, 2**64 - 1, 2**63]
  route = HashShardsLayout(spec, 4).shard_of(ht.keys_to_pairs(keys), 4)
  mesh4 = make_mesh((4,))
  state = _hash_shards(spec, [keys[route == i] for i in range(4)], mesh4)
  ck = Checkpointer(d, SnapshotOptions(save_every_steps=1, **SMALL),
                    layouts={"dyn": HashShardsLayout(spec, 4)})
  ck.save(0, {"dyn": state, "w": jnp.ones(3)})
  more = np.arange(10**12, 10**12 + 20, dtype=np.uint64)
  gone = keys[10:15]
  r_more = HashShardsLayout(spec, 4).shard_of(ht.keys_to_pairs(more), 4)
  r_gone = HashShardsLayout(spec, 4).shard_of(ht.keys_to_pairs(gone), 4)
  host_state = jax.device_get(state)
  erase = jax.jit(lambda st, k, v: ht.erase(spec, st, k, v)[0])
  new_shards = []
  for i in range(4):
    st = jax.tree.map(lambda a: jnp.asarray(a[i]), host_state)
    st = _insert(spec, st, more[r_more == i], 5)[0]
    st = erase(st, jnp.asarray(ht.keys_to_pairs(gone)), jnp.asarray(r_gone == i))
    new_shards.append(st)
  state = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *new_shards),
                         NamedSharding(mesh4, P(mesh4.axis_names)))
  tree = {"dyn": state, "w": jnp.ones(3)}
  info = ck.save(1, tree)
  ck.wait_until_finished()
  # Inserts and erasures both reach the increment, which holds only the rows they changed.
  assert info.kind == "incremental" and 0 < info.dirty_rows < 0.2 * info.total_rows
  assert_trees_equal(ck.restore(tree).state, tree)
  return d, tree, np.setdiff1d(np.concatenate([keys, more]), gone), gone


@pytest.mark.parametrize("n, capacity", [
    (2, 256), pytest.param(8, 256, marks=pytest.mark.slow),
    pytest.param(1, 512, marks=pytest.mark.slow)])
def test_hash_tables_reroute_to_another_shard_count(hash_snapshot, n, capacity):
  d, tree, live, gone = hash_snapshot
  want = _lookup_all(HSPEC, tree["dyn"], live, 4)
  spec = dataclasses.replace(HSPEC, capacity=capacity)
  mesh = make_mesh((n,))
  tmpl = {"dyn": jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *[ht.init(spec)] * n),
                                NamedSharding(mesh, P(mesh.axis_names))),
          "w": jnp.zeros(3)}
  ck = Checkpointer(d, layouts={"dyn": HashShardsLayout(spec, n)}, read_only=True)
  r = ck.restore(tmpl)
  assert any(f"{len(live)} keys re-routed from 4 to {n} shards" in line
             for line in r.report), r.report
  got = _lookup_all(spec, r.state["dyn"], live, n, gone=gone)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  assert int(np.asarray(r.state["dyn"].size).sum()) == len(live)
  np.testing.assert_array_equal(np.asarray(r.state["w"]), np.ones(3))


@pytest.mark.slow  # one more find_or_insert compile
def test_hash_table_too_small_target_is_a_clear_error(hash_snapshot):
  d = hash_snapshot[0]
  ck = Checkpointer(d, layouts={"dyn": HashShardsLayout(HSPEC, 1)}, read_only=True)
  with pytest.raises(LayoutMismatchError, match="hash table 'dyn': shard 0 of 1 cannot hold"):
    ck.restore({"dyn": jax.tree.map(lambda x: x[None], ht.init(HSPEC)), "w": jnp.zeros(3)})


# ---- retention, corruption ----------------------------------------------------------------


def _toy(step):
  """A state whose step ``s`` changes one row of ``big`` (and everything small)."""
  mesh = make_mesh((8,))
  big = np.arange(8 * 512 * 4, dtype=np.float32).reshape(8 * 512, 4)
  for k in range(1, step + 1):
    big[(k * 37) % len(big)] += k
  return {"big": jax.device_put(big, NamedSharding(mesh, P("data"))),
          "rng": jax.random.fold_in(jax.random.key(0), step), "step": jnp.int32(step)}


def test_retention_keeps_latest_three_plus_their_chains_and_best(tmp_path):
  ck = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=10, full_every=3,
                                                   keep_best=1, track_other_arrays=True,
                                                   **SMALL))
  aucs = {10: 0.70, 20: 0.90, 30: 0.71, 40: 0.72, 50: 0.73, 60: 0.74, 70: 0.75, 80: 0.76}
  for s in range(0, 81, 5):
    ck.save(s, _toy(s), data_position={"example": s}, metrics={"auc": aucs.get(s, 0.5)})
  ck.wait_until_finished()
  # Chains: 0 10 20 | 30 40 50 | 60 70 80. Latest 3 = 60 70 80; best = 20 (needs 0 10).
  assert [v.step for v in ck.versions()] == [0, 10, 20, 60, 70, 80]
  r = ck.restore(_toy(0))
  assert r.step == 80 and int(r.state["step"]) == 80
  assert_trees_equal(r.state, _toy(80))
  assert_trees_equal(ck.restore(_toy(0), step=20).state, _toy(20))


def _data_files(vdir):
  """The array data files of a version (tensorstore chunks), smallest first."""
  out = []
  for item in ("dense", "tables"):
    for d, _, files in os.walk(os.path.join(vdir, item)):
      out += [os.path.join(d, f) for f in files if os.sep + "d" + os.sep in os.path.join(d, f)]
  return sorted(out, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_newest_version_is_named_and_skipped(tmp_path, damage, capsys):
  ck = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=1, incremental=False))
  for s in (1, 2):
    ck.save(s, _toy(s), data_position={"example": s})
  ck.wait_until_finished()
  victim = _data_files(os.path.join(str(tmp_path), "2"))[-1]
  if damage == "flip":
    with open(victim, "r+b") as f:
      f.seek(os.path.getsize(victim) // 2)
      b = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([b[0] ^ 0x40]))
  elif damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  else:
    os.remove(victim)
  r = ck.restore(_toy(0))
  assert r.step == 1
  assert_trees_equal(r.state, _toy(1))
  out = capsys.readouterr().out
  assert "checkpoint version" in out and os.path.join(str(tmp_path), "2") in out
  assert "falling back to the previous version" in out
  with pytest.raises(CorruptCheckpointError, match=r"/2: file .* (CRC32|bytes|missing)"):
    ck.restore(_toy(0), step=2)
  bad = [v for v in list_versions(str(tmp_path), verify="checksum") if not v.ok]
  assert [v.step for v in bad] == [2]
  cli = subprocess.run([sys.executable, "-m", "jaxrec.checkpoint", "verify",
                        f"--dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
  assert cli.returncode == 1 and "version 2: corrupt" in cli.stdout, cli.stdout + cli.stderr


def test_version_without_manifest_is_not_listed_or_restored(tmp_path):
  ck = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=1))
  for s in (1, 2):
    ck.save(s, _toy(s))
  ck.wait_until_finished()
  os.remove(os.path.join(str(tmp_path), "2", "MANIFEST.json"))  # as if killed before it
  assert [(v.step, v.status) for v in list_versions(str(tmp_path))] == [
      (1, "ok"), (2, "incomplete")]
  ck2 = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=1))
  assert [v.step for v in list_versions(str(tmp_path))] == [1]  # set aside into trash/
  assert ck2.restore(_toy(0)).step == 1
  assert ck2.save(2, _toy(2)) is not None  # the step can be written again
  ck2.wait_until_finished()
  assert ck2.restore(_toy(0)).step == 2


# ---- rollback, NaN guard, warm start -------------------------------------------------------------


def _cli(*args):
  out = subprocess.run([sys.executable, "-m", "jaxrec.checkpoint", *args], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


def test_rollback_end_to_end_through_the_cli(tmp_path):
  workdir = str(tmp_path)
  d = checkpoint_dir(workdir)
  ck = Checkpointer(d, SnapshotOptions(save_every_steps=10, keep_latest=5))
  for s in range(0, 41, 10):
    ck.save(s, _toy(s), data_position={"example": s * 100})
  ck.wait_until_finished()
  listing = _cli("list", f"--workdir={workdir}")
  assert "->        40" in listing
  out = _cli("rollback", f"--workdir={workdir}", "--back=2")
  assert "resumes from version 20" in out and "[30, 40]" in out
  listing = _cli("list", f"--workdir={workdir}")
  assert "->        20" in listing and "rolled back" in listing and "30, 40" in listing
  # Training resumes from 20 and goes on; the set-aside versions are still there.
  ck = Checkpointer(d, SnapshotOptions(save_every_steps=10, keep_latest=5))
  r = ck.restore(_toy(0))
  assert r.step == 20 and r.data_position == {"example": 2000}
  assert_trees_equal(r.state, _toy(20))
  ck.save(30, _toy(31), data_position={"example": 3100})
  ck.wait_until_finished()
  assert [v.step for v in ck.versions()] == [0, 10, 20, 30]
  assert_trees_equal(ck.restore(_toy(0)).state, _toy(31))
  # Roll forward to the old 40: the new 30 is set aside in turn, the old 30 and 40 return.
  _cli("rollback", f"--workdir={workdir}", "--to=40")
  ck = Checkpointer(d, SnapshotOptions(save_every_steps=10, keep_latest=5))
  assert_trees_equal(ck.restore(_toy(0)).state, _toy(40))
  out = _cli("prune", f"--workdir={workdir}")
  assert "deleted 1 set-aside version" in out
  assert "rolled back" not in _cli("list", f"--workdir={workdir}")


def test_nan_triggers_rollback_and_skips_the_bad_window(tmp_path):
  t = trainer()
  ck = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=4, **SMALL),
                    layouts=t.run.layouts)
  guard = AnomalyGuard(ck, GuardOptions(spike_factor=None))
  state = t.fresh()
  ck.save(0, state, data_position={"example": 0})
  pos, bad_batch, log = 0, 6, []
  while pos < 12 * B:
    i = pos // B
    state, m = t.step(state, i, poison=(i == bad_batch))
    pos += B
    act = guard.observe(int(state.step), m, {"example": pos})
    if act.kind == "rollback":
      r = guard.recover(act, t.fresh())
      state, pos = r.state, r.data_position["example"]
      log.append((act.step, act.skipped_from, act.data_position, r.report[-1]))
      continue
    assert act.ok, act.reason
    ck.save(int(state.step), state, data_position={"example": pos})
  ck.wait_until_finished()
  assert len(log) == 1
  step, skipped_from, skipped_to, msg = log[0]
  assert (step, skipped_from, skipped_to) == (4, {"example": 4 * B}, {"example": 7 * B})
  assert "loss became nan" in msg and "rolled back to version 4" in msg
  assert all(np.isfinite(x).all() for x in host(state))
  # Batches 4, 5, 6 were skipped: 12 batches of data made 9 steps.
  assert int(state.step) == 9
  newest = ck.versions()[-1]
  assert newest.step == 8 and newest.metadata["rollbacks"][0]["restored_step"] == 4


def test_guard_spike_and_abort():
  class FakeCkpt:
    def wait_until_finished(self):
      pass

    def latest(self, before):
      return None
  g = AnomalyGuard(FakeCkpt(), GuardOptions(spike_factor=5.0, warmup_steps=3))
  for s in range(5):
    assert g.observe(s, {"loss": 0.5, "dense_grad_norm": 1.0}, None).ok
  assert g.observe(5, {"loss": 0.6, "dense_grad_norm": 4.0}, None).ok
  act = g.observe(6, {"loss": 0.5, "dense_grad_norm": 80.0}, None)
  assert act.kind == "abort" and "dense_grad_norm spiked" in act.reason
  assert "no checkpoint version before step 6" in act.reason


def test_warm_start_with_changed_features_through_the_cli(tmp_path):
  old = str(tmp_path / "old")
  new = str(tmp_path / "new")
  t = trainer(cards=(40, 300, 1000, 7))
  ck = Checkpointer(checkpoint_dir(old), SnapshotOptions(save_every_steps=5, **SMALL),
                    layouts=t.run.layouts)
  state = t.fresh()
  for i in range(5):
    state, _ = t.step(state, i)
  ck.save(5, state, data_position={"example": 5 * B})
  ck.wait_until_finished()
  old_tabs, old_slots = t.run.emb.to_dense(state.emb)

  # The new config drops C4, keeps C1..C3 and adds C5, C6 (and so reshapes the top MLP).
  args = ["warm_start", f"--workdir={new}", f"--from={old}", f"--config={CONFIG}:tiny",
          "--config.data.preset=kaggle",
          "--config.data.synthetic.cardinalities=(40,300,1000,50,9)",
          "--config.data.synthetic.weighted_features=5", "--config.data.synthetic.num_pairs=2",
          f"--config.data.batch_size={B}", "--config.model.embedding_dim=8",
          "--config.model.bottom_mlp=(16,8)", "--config.model.top_mlp=(16,1)",
          "--config.embedding.max_rows=512", "--config.embedding.min_rows=16",
          "--config.optimizer.warmup_steps=5"]
  out = _cli(*args)
  lines = [ln for ln in out.splitlines() if ln.startswith("warm start:")]
  text = "\n".join(lines)
  assert "table t_C1: restored" in text and "table t_C3: restored" in text
  assert "table t_C5: new in this config; initialised fresh" in text
  assert "t_C4: shape" in text  # 7 -> 50 IDs: the table grew, so it starts fresh
  assert "params/top/layers/0/kernel/value: shape" in text
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["step"] == 5 and summary["data_position"] == {"example": 5 * B}

  t2 = trainer(cards=(40, 300, 1000, 50, 9))
  run2 = t2.run
  r = Checkpointer(checkpoint_dir(new), layouts=run2.layouts).restore(t2.fresh())
  assert r.step == 5 and r.metadata["warm_start"]["step"] == 5
  new_tabs, new_slots = run2.emb.to_dense(r.state.emb)
  fresh_tabs, _ = run2.emb.to_dense(run2.state.emb)
  for name in ("t_C1", "t_C2", "t_C3"):
    np.testing.assert_array_equal(new_tabs[name], old_tabs[name])
    np.testing.assert_array_equal(new_slots[name]["acc"], old_slots[name]["acc"])
  for name in ("t_C4", "t_C5"):
    np.testing.assert_array_equal(new_tabs[name], fresh_tabs[name])
  np.testing.assert_array_equal(np.asarray(r.state.params["bottom"]["layers"][0]["kernel"][...]),
                                np.asarray(state.params["bottom"]["layers"][0]["kernel"][...]))
  # The warm-started state trains.
  s, m = t2.step(r.state, 5)
  assert np.isfinite(float(m["loss"]))
  # A strict restore into the changed config refuses, naming what differs.
  ck_old = Checkpointer(checkpoint_dir(old), layouts=run2.layouts, read_only=True)
  with pytest.raises(LayoutMismatchError, match="warm_start=True"):
    ck_old.restore(t2.fresh())
