"""Tests for jaxrec.data.pipeline: coverage per epoch (one process and two real processes),
content against the source, seeded shuffling, exact resume (also through device prefetching),
equal step counts across processes, and device placement."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrec.data import synthetic
from jaxrec.data.batch import Batch
from jaxrec.data.pipeline import StoreBatches, StorePipeline
from jaxrec.data.store import FeatureSchema, FeatureStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = synthetic.small_config(scale=0.1, max_ids=(1,) * 22 + (3,) * 4, min_bag=0)
N = 9_100  # three segments, blocks of 600 rows: partial blocks at segment ends


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  src = synthetic.SyntheticCriteo(CONFIG)
  path = tmp_path_factory.mktemp("pipe") / "s"
  fs = FeatureStore.create(path, FeatureSchema.from_layout(src.layout), chunk_rows=600)
  for a, b in ((0, 4000), (4000, 4100), (4100, N)):
    fs.append([src.examples(a, b)])
  return {"path": str(path), "snap": fs.open(), "want": src.examples(0, N)}


def rows_of(want: Batch, rows: np.ndarray) -> Batch:
  return Batch(want.dense[rows], want.ids[rows], want.mask[rows], want.labels[rows])


def check_batch(got: Batch, want: Batch):
  for f in ("dense", "ids", "mask", "labels"):
    assert np.array_equal(getattr(got, f), getattr(want, f)), f


def test_one_process_epochs_cover_every_example_once(store):
  pipe = StorePipeline(store["snap"], 500, seed=5, window_blocks=3, process_index=0,
                       process_count=1, num_epochs=2, drop_remainder=False)
  per_epoch = pipe.batches_per_epoch
  assert per_epoch == -(-N // 500)
  epochs = [[], []]
  for j, b in enumerate(pipe):
    rows = pipe.dataset.row_ids(j)
    check_batch(b, rows_of(store["want"], rows))
    epochs[j // per_epoch].append(rows)
  a, b = (np.concatenate(e) for e in epochs)
  assert np.array_equal(np.sort(a), np.arange(N)) and np.array_equal(np.sort(b), np.arange(N))
  assert not np.array_equal(a, b)  # each epoch has its own order
  # Shuffled, but block-local: a batch mixes rows from up to window_blocks blocks.
  first = pipe.dataset.row_ids(0)
  assert len(np.unique(first // 600)) > 1 and not np.array_equal(first, np.sort(first))


def test_sequential_order_is_store_order(store):
  pipe = StorePipeline(store["snap"], 1000, shuffle=False, process_index=0, process_count=1,
                       num_epochs=1, drop_remainder=False)
  got = Batch.concat(list(pipe))
  check_batch(got, store["want"])


def test_seed_determines_order(store):
  def order(seed):
    ds = StoreBatches(store["snap"], 700, seed=seed, process_count=1)
    return np.concatenate([ds.row_ids(j) for j in range(3)])
  assert np.array_equal(order(1), order(1))
  assert not np.array_equal(order(1), order(2))


_WORKER = """
import json, sys, numpy as np
from jaxrec.data.store import FeatureStore
from jaxrec.data.pipeline import StorePipeline
path, index, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
snap = FeatureStore(path).open()
pipe = StorePipeline(snap, 400, seed=11, window_blocks=2, process_index=index, process_count=2,
                     num_epochs=2, drop_remainder=False)
windows = set()
read_window = pipe.dataset._window
def logged(epoch, w):
  windows.add((epoch, w))
  return read_window(epoch, w)
pipe.dataset._window = logged
rows = []
for j, b in enumerate(pipe):
  r = pipe.dataset.row_ids(j)
  ref = snap.read_rows(r)
  for f in ("dense", "ids", "mask", "labels"):
    assert np.array_equal(getattr(b, f), getattr(ref, f)), f
  rows.append(r.tolist())
json.dump({"rows": rows, "per_epoch": pipe.batches_per_epoch, "windows": sorted(windows),
           "num_windows": len(pipe.dataset._plan(0).windows)}, open(out, "w"))
"""


def test_two_processes_cover_every_example_once_per_epoch(store, tmp_path):
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, store["path"], str(i),
                             str(tmp_path / f"p{i}.json")], cwd=ROOT, stderr=subprocess.PIPE)
           for i in range(2)]
  for p in procs:
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
  results = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
  for epoch in range(2):
    got = []
    for r in results:
      k = r["per_epoch"]
      got += [x for batch in r["rows"][epoch * k:(epoch + 1) * k] for x in batch]
    assert sorted(got) == list(range(N)), f"epoch {epoch}"
  assert abs(sum(map(len, results[0]["rows"])) - sum(map(len, results[1]["rows"]))) <= 2
  # Each process decoded only the windows of its own slice: they share at most the one
  # window that straddles the middle of each epoch.
  for epoch in range(2):
    w0, w1 = ({w for e, w in r["windows"] if e == epoch} for r in results)
    assert len(w0 & w1) <= 1 and len(w0 | w1) == results[0]["num_windows"]
    assert max(len(w0), len(w1)) <= results[0]["num_windows"] // 2 + 1


def test_drop_remainder_gives_equal_full_batches_per_process(store):
  counts = []
  for p in range(3):
    ds = StoreBatches(store["snap"], 512, seed=0, process_index=p, process_count=3)
    counts.append(ds.batches_per_epoch)
    assert all(len(ds.row_ids(j)) == 512 for j in range(ds.batches_per_epoch))
  assert counts == [(N // 3) // 512] * 3


def test_resume_is_exact_including_device_prefetch(store):
  kw = dict(seed=3, window_blocks=4, process_index=0, process_count=1)
  ref = StorePipeline(store["snap"], 256, **kw)
  want = [next(ref) for _ in range(60)]

  pipe = StorePipeline(store["snap"], 256, **kw)
  dev = pipe.device_batches(lambda b: b, depth=4)
  for i in range(37):
    check_batch(next(dev), want[i])
  state = json.loads(json.dumps(dev.get_state()))  # it must survive a checkpoint
  assert state["next_index"] == 37  # consumed, not prefetched
  dev.close()

  resumed = StorePipeline(FeatureStore(store["path"]).open(), 256, **kw)
  resumed.set_state(state)
  for i in range(37, 60):
    check_batch(next(resumed), want[i])
  assert resumed.get_state()["next_index"] == 60

  with pytest.raises(ValueError, match="seed=3 but this pipeline has seed=4"):
    StorePipeline(store["snap"], 256, **dict(kw, seed=4)).set_state(state)


def test_transform_runs_in_pipeline(store):
  pipe = StorePipeline(store["snap"], 128, shuffle=False, process_index=0, process_count=1,
                       transform=lambda b: Batch(b.dense * 0, b.ids, b.mask, b.labels))
  b = next(pipe)
  assert not b.dense.any() and np.array_equal(b.ids, store["want"].ids[:128])


def test_device_batches_on_a_mesh(store):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxrec.train import builders

  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  sharding = NamedSharding(mesh, P("batch"))
  pipe = StorePipeline(store["snap"], 256, shuffle=False)  # process index/count from JAX
  dev = pipe.device_batches(lambda b: jax.device_put(builders.device_batch(b), sharding))
  x = next(dev)
  dev.close()
  assert x["ids"].sharding == sharding and x["ids"].shape == (256, CONFIG.layout.num_columns, 2)
  assert np.array_equal(np.asarray(x["labels"]), store["want"].labels[:256])


def test_too_small_store_is_a_clear_error(store):
  with pytest.raises(ValueError, match="less than one batch of 100000"):
    StoreBatches(store["snap"], 100_000)
