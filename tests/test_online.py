"""Tests for jaxrec.data.online: batch get/put round trips, pinned versions while another
process commits, atomic puts under kill -9, the stale-lock guard, and the training join."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxrec.data import synthetic
from jaxrec.data.batch import SparseLayout
from jaxrec.data.online import EntitySchema, OnlineFeatureStore, ServingReplica, join_entities
from jaxrec.data.store import StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = EntitySchema(dim=6, fields=(("gen", "int64"), ("ctr", "float32"), ("age", "uint8")))


def rand_keys(n, seed=0):
  keys = np.unique(np.random.default_rng(seed).integers(0, 2**64, n + 100, dtype=np.uint64))
  return np.random.default_rng(seed + 1).permutation(keys)[:n]


def test_put_get_round_trip_and_versions(tmp_path):
  store = OnlineFeatureStore.create(tmp_path / "o", SCHEMA)
  keys = rand_keys(3000)
  rng = np.random.default_rng(0)
  vec = rng.standard_normal((3000, 6)).astype(np.float32)
  ctr = rng.random(3000).astype(np.float32)
  v1 = store.put(keys, vec, gen=np.full(3000, 1), ctr=ctr, age=np.arange(3000) % 200)
  snap1 = store.snapshot()
  assert snap1.version == v1
  # Repeats, any order, and a key that was never written.
  q = np.concatenate([keys[[5, 0, 5, 2999]], np.array([12345], np.uint64)])
  r = store.get(q)
  assert r.found.tolist() == [True, True, True, True, False]
  assert np.array_equal(r.vector[:4], vec[[5, 0, 5, 2999]]) and not r.vector[4].any()
  assert np.array_equal(r["ctr"][:4], ctr[[5, 0, 5, 2999]])
  assert r["age"].dtype == np.uint8 and r["age"][3] == 2999 % 200 and r.version == v1
  # A later put is a new version; the pinned snapshot still sees the old one.
  v2 = store.put(keys[:10], np.zeros((10, 6), np.float32), gen=np.full(10, 2),
                 ctr=np.zeros(10), age=np.zeros(10))
  assert v2 > v1
  assert (snap1.get(keys[:10])["gen"] == 1).all()
  assert (store.get(keys[:10])["gen"] == 2).all() and store.get(keys[:10]).version == v2
  assert (store.get(keys[:10], version=v1)["gen"] == 1).all()
  v3 = store.delete(keys[:3])
  assert store.get(keys[:4]).found.tolist() == [False, False, False, True]
  assert snap1.get(keys[:3]).found.all() and v3 > v2
  # Reopening sees the same data and schema.
  again = OnlineFeatureStore(tmp_path / "o")
  assert again.schema == SCHEMA and np.array_equal(again.get(keys[100:200]).vector, vec[100:200])


def test_serving_replica_equals_its_version(tmp_path):
  store = OnlineFeatureStore.create(tmp_path / "o", SCHEMA)
  keys = rand_keys(5000, seed=3)
  rng = np.random.default_rng(2)
  store.put(keys, rng.standard_normal((5000, 6)), gen=np.full(5000, 1), ctr=rng.random(5000),
            age=np.arange(5000) % 100)
  snap = store.snapshot()
  store.put(keys[:50], np.zeros((50, 6)), gen=np.full(50, 2), ctr=np.zeros(50), age=np.zeros(50))
  replica = snap.export(tmp_path / "replica")
  assert replica.version == snap.version and len(replica.keys) == 5000
  q = np.concatenate([keys[rng.integers(0, 5000, 700)], rand_keys(50, seed=99), keys[:3]])
  a, b = snap.get(q), replica.get(q)
  assert np.array_equal(a.found, b.found) and np.array_equal(a.vector, b.vector)
  assert all(np.array_equal(a[n], b[n]) for n in SCHEMA.field_names)
  assert (b["gen"][b.found] == 1).all()  # the exported version, not the later put
  assert np.array_equal(ServingReplica(tmp_path / "replica").get(q).vector, b.vector)
  # Lookups are vectorised over a bucket index: check it against a binary search over keys
  # that are crowded (sequential IDs next to spread ones) and outside the stored range.
  crowd = np.concatenate([np.arange(10, 3010, dtype=np.uint64), keys[:200]])
  store.put(crowd, np.ones((3200, 6)), gen=np.full(3200, 3), ctr=np.zeros(3200),
            age=np.zeros(3200))
  crowded = store.snapshot().export(tmp_path / "crowded")
  allk = np.unique(np.concatenate([keys, crowd]))
  q = np.concatenate([allk[rng.integers(0, len(allk), 2000)], np.arange(0, 3100, 7, np.uint64),
                      np.array([2**64 - 1, allk[-1] + 1], np.uint64), rand_keys(300, seed=7)])
  rows, found = crowded.lookup(q)
  pos = np.minimum(np.searchsorted(allk, q), len(allk) - 1)
  assert np.array_equal(found, allk[pos] == q) and np.array_equal(rows[found], pos[found])
  # No published version (CURRENT) means no replica.
  os.remove(tmp_path / "replica" / "CURRENT")
  with pytest.raises(StoreError, match="no complete serving replica"):
    ServingReplica(tmp_path / "replica")
  empty = OnlineFeatureStore.create(tmp_path / "e", SCHEMA).snapshot().export(tmp_path / "er")
  assert not empty.get(keys[:4]).found.any()


def test_serving_replica_readers_keep_their_version_across_exports(tmp_path, monkeypatch):
  """Exports never rewrite a published version: a replica opened earlier keeps serving its
  version while newer ones are published (and even after its files are deleted); a failed
  export publishes nothing."""
  store = OnlineFeatureStore.create(tmp_path / "o", SCHEMA)
  keys = rand_keys(4000, seed=5)
  n = len(keys)

  def put(gen, k=keys):
    return store.put(k, np.full((len(k), 6), float(gen)), gen=np.full(len(k), gen),
                     ctr=np.zeros(len(k)), age=np.zeros(len(k)))

  put(1)
  path = tmp_path / "serve"
  first = store.snapshot().export(path)
  assert first.refresh() is first
  put(2, keys[:2000])
  store.delete(keys[-100:])
  second = store.snapshot().export(path)
  assert ServingReplica(path).version == second.version > first.version
  assert first.refresh().version == second.version
  put(3, keys[:10])
  third = store.snapshot().export(path, keep=2)   # deletes the first version's files
  assert not os.path.exists(first.dir)
  a, b, c = first.get(keys), second.get(keys), third.get(keys)
  assert a.found.all() and (a["gen"] == 1).all() and (a.vector == 1).all()
  assert (b["gen"][:2000] == 2).all() and (b["gen"][2000:n - 100] == 1).all()
  assert not b.found[-100:].any() and (c["gen"][:10] == 3).all()
  # An export that fails half-way publishes nothing; the next one cleans up after it.
  from jaxrec.data import online

  def broken_read(self, uniq):
    raise OSError("disk full")
  put(4, keys[:5])
  with monkeypatch.context() as m:
    m.setattr(online.OnlineSnapshot, "_read", broken_read)
    with pytest.raises(OSError):
      store.snapshot().export(path)
  assert ServingReplica(path).version == third.version
  assert len(os.listdir(path)) == 4   # CURRENT, second, third and the broken one
  fourth = store.snapshot().export(path, keep=1)
  assert sorted(os.listdir(path)) == sorted(["CURRENT", os.path.basename(fourth.dir)])
  assert (ServingReplica(path).get(keys[:5])["gen"] == 4).all()


def test_user_errors(tmp_path):
  store = OnlineFeatureStore.create(tmp_path / "o", SCHEMA)
  k = np.arange(4, dtype=np.uint64)
  ok = dict(gen=np.zeros(4), ctr=np.zeros(4), age=np.zeros(4))
  with pytest.raises(ValueError, match=r"vector must have shape \(4, 6\)"):
    store.put(k, np.zeros((4, 5)), **ok)
  with pytest.raises(ValueError, match=r"fields \['age'\] are missing and \['colour'\]"):
    store.put(k, np.zeros((4, 6)), gen=np.zeros(4), ctr=np.zeros(4), colour=np.zeros(4))
  with pytest.raises(ValueError, match="key 1 appears more than once"):
    store.put(np.array([1, 1, 2, 3], np.uint64), np.zeros((4, 6)), **ok)
  with pytest.raises(ValueError, match="negative key -5"):
    store.get(np.array([-5]))
  with pytest.raises(StoreError, match="already exists"):
    OnlineFeatureStore.create(tmp_path / "o", SCHEMA)
  with pytest.raises(StoreError, match="no online feature store"):
    OnlineFeatureStore(tmp_path / "nothing")


_WRITER = """
import sys, time, numpy as np
from jaxrec.data.online import OnlineFeatureStore
store = OnlineFeatureStore(sys.argv[1])
keys = np.arange(int(sys.argv[2]), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
for gen in range(2, 2 + int(sys.argv[3])):
  n = len(keys)
  store.put(keys, np.full((n, 6), gen, np.float32), gen=np.full(n, gen), ctr=np.zeros(n),
            age=np.zeros(n))
  time.sleep(0.2)  # paced commits: a reader slowed by a busy machine still overlaps several
"""


def _start_writer(path, num_keys, commits):
  return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(num_keys),
                           str(commits)], cwd=ROOT, stderr=subprocess.PIPE)


def _fill(store, num_keys):
  keys = np.arange(num_keys, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
  store.put(keys, np.ones((num_keys, 6), np.float32), gen=np.ones(num_keys),
            ctr=np.zeros(num_keys), age=np.zeros(num_keys))
  return keys


def test_readers_see_one_version_while_another_process_commits(tmp_path):
  store = OnlineFeatureStore.create(tmp_path / "o", SCHEMA)
  keys = _fill(store, 2000)
  pinned = store.snapshot()
  proc = _start_writer(tmp_path / "o", 2000, 15)
  gens_seen = []
  while proc.poll() is None:
    assert (pinned.get(keys)["gen"] == 1).all()  # pinned: never moves
    r = store.get(keys)  # latest at call time: one version for the whole batch
    gens = np.unique(r["gen"])
    assert len(gens) == 1 and (r.vector == gens[0]).all(), gens
    gens_seen.append(int(gens[0]))
  assert proc.returncode == 0, proc.stderr.read().decode()
  assert gens_seen == sorted(gens_seen)
  final = store.get(keys)
  assert (final["gen"] == 16).all() and store.latest_version() == final.version
  assert len(set(gens_seen)) >= 2, gens_seen  # the reader really overlapped the commits


def _kill_writer_trials(tmp_path, trials: int, seed: int):
  rng = random.Random(seed)
  for t in range(trials):
    path = tmp_path / f"o{t}"
    store = OnlineFeatureStore.create(path, SCHEMA)
    keys = _fill(store, 20000)
    proc = _start_writer(path, 20000, 50)
    time.sleep(rng.uniform(1.0, 3.0))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Reopen from scratch: the newest version is some whole put, never part of one.
    fresh = OnlineFeatureStore(path)
    r = fresh.get(keys)
    gens = np.unique(r["gen"])
    assert r.found.all() and len(gens) == 1 and (r.vector == gens[0]).all(), gens
    print(f"killed writer: newest whole version has gen {gens[0]}")
    # And the store still takes writes (a dead writer's manifest lock is handled).
    v = fresh.put(keys[:5], np.zeros((5, 6), np.float32), gen=np.full(5, 99), ctr=np.zeros(5),
                  age=np.zeros(5))
    assert (OnlineFeatureStore(path).get(keys[:5], version=v)["gen"] == 99).all()


def test_kill9_writer_leaves_a_whole_version(tmp_path):
  _kill_writer_trials(tmp_path, trials=2, seed=0)


@pytest.mark.slow
def test_kill9_writer_many_trials(tmp_path):
  _kill_writer_trials(tmp_path, trials=10, seed=1)


def test_stale_manifest_lock_does_not_brick_the_store(tmp_path):
  # A writer killed while writing manifest.ocdbt leaves its lock file behind; TensorStore would
  # write the next manifest into it without truncating, and the database would not open again.
  store = OnlineFeatureStore.create(tmp_path / "o", SCHEMA)
  keys = _fill(store, 100)
  (tmp_path / "o" / "manifest.ocdbt.__lock").write_bytes(os.urandom(50_000))
  store.put(keys[:1], np.zeros((1, 6), np.float32), gen=[7], ctr=[0], age=[0])
  assert OnlineFeatureStore(tmp_path / "o").get(keys[:1])["gen"][0] == 7


def test_join_entities_appends_entity_features_to_dense(tmp_path):
  src = synthetic.SyntheticCriteo(synthetic.small_config(scale=0.1))
  batch = src.examples(0, 300)
  layout: SparseLayout = src.layout
  users = np.unique(batch.ids[:, layout.columns(0)][:, 0])
  known = users[::2]
  store = OnlineFeatureStore.create(tmp_path / "o", SCHEMA)
  vec = np.arange(len(known) * 6, dtype=np.float32).reshape(-1, 6)
  store.put(known, vec, gen=np.arange(len(known)), ctr=np.full(len(known), 0.5),
            age=np.full(len(known), 30))
  out = join_entities(batch, layout, store.snapshot(), "C1")
  assert out.dense.shape == (300, 13 + 6 + 3 + 1)
  assert np.array_equal(out.dense[:, :13], batch.dense) and out.ids is batch.ids
  key = batch.ids[:, 0]
  hit = np.isin(key, known)
  assert np.array_equal(out.dense[:, -1], hit.astype(np.float32))
  idx = np.searchsorted(known, key[hit])
  assert np.array_equal(out.dense[hit, 13:19], vec[idx])
  assert (out.dense[hit, 21] == 30).all() and not out.dense[~hit, 13:].any()
  with pytest.raises(ValueError, match="key_feature 'user'"):
    join_entities(batch, layout, store.snapshot(), "user")
