"""Tests for jaxrec.data.store and jaxrec.data.ingest: exact round trips (synthetic and
Criteo-format), appends and versions, schema validation with file/line errors, and atomicity:
real ``kill -9`` of an ingest subprocess at random moments, and a reader running concurrently
with an append.

Expected data comes from the sources themselves (SyntheticCriteo.examples, CriteoReader), never
from the store.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jaxrec.data import criteo, synthetic
from jaxrec.data.batch import Batch
from jaxrec.data.ingest import ingest
from jaxrec.data.store import (BadRowError, FeatureSchema, FeatureStore, RowOrigin,
                               SchemaMismatchError, StoreError, clear_stale_lock)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_HOT = synthetic.small_config(scale=0.1, max_ids=(1,) * 20 + (4,) * 6, min_bag=0)


def assert_batches_equal(got: Batch, want: Batch, what: str = ""):
  for f in ("dense", "ids", "mask", "labels"):
    g, w = getattr(got, f), getattr(want, f)
    assert g.dtype == w.dtype and g.shape == w.shape, (what, f, g.dtype, w.dtype, g.shape, w.shape)
    assert np.array_equal(g, w), f"{what}: field {f} differs"


def schema_of(stream) -> FeatureSchema:
  return FeatureSchema.from_layout(stream.layout)


def tree(path: str) -> dict[str, bytes]:
  """Every file under ``path`` with its bytes."""
  out = {}
  for dirpath, _, files in os.walk(path):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = fh.read()
  return out


# ---- round trips -------------------------------------------------------------------------------


def test_synthetic_round_trip_appends_and_versions(tmp_path):
  src = synthetic.SyntheticCriteo(MULTI_HOT)
  store = FeatureStore.create(tmp_path / "s", schema_of(src), chunk_rows=700)
  days = [(0, 2000), (2000, 2100), (2100, 5300)]  # the middle one is smaller than a chunk
  for start, stop in days:
    # Uneven source batches: chunks fill across write calls.
    store.append((src.examples(a, min(a + 333, stop)) for a in range(start, stop, 333)),
                 source=f"day[{start}:{stop}]")
  head = store.head()
  assert head.version == 3 and head.num_rows == 5300
  assert [s.version for s in head.segments] == [1, 2, 3]
  want = src.examples(0, 5300)
  snap = store.open()
  assert_batches_equal(snap.read(), want, "whole store")
  assert not want.mask.all()  # empty and short bags are in there
  assert_batches_equal(snap.read(1990, 2150), want.slice(1990, 2150), "across segments")
  rows = np.random.default_rng(0).integers(0, 5300, 500)
  assert_batches_equal(snap.read_rows(rows), Batch(want.dense[rows], want.ids[rows],
                                                   want.mask[rows], want.labels[rows]), "rows")
  assert_batches_equal(Batch.concat(list(snap.iter_batches(512))), want, "iter_batches")
  # Old versions stay readable as they were.
  v1 = store.open(version=1)
  assert v1.num_rows == 2000
  assert_batches_equal(v1.read(), want.slice(0, 2000), "version 1")
  assert store.open(version=0).num_rows == 0
  with pytest.raises(StoreError, match="version 9 does not exist"):
    store.open(version=9)


def test_extra_columns_round_trip_skip_with_their_rows_and_are_checked(tmp_path):
  src = synthetic.SyntheticCriteo(MULTI_HOT)
  schema = FeatureSchema.from_layout(src.layout, extra_names=("teacher_prob", "weight"))
  store = FeatureStore.create(tmp_path / "s", schema, chunk_rows=300)
  b, prob = src.examples(0, 1000, with_prob=True)
  weight = np.arange(1000, dtype=np.float32)
  b.labels[[5, 700]] = np.nan   # skipped rows drop their extras too
  with store.appender(bad_rows="skip") as app:
    for lo, hi in ((0, 450), (450, 1000)):
      app.write(b.slice(lo, hi), extras={"teacher_prob": prob[lo:hi], "weight": weight[lo:hi]})
  keep = np.setdiff1d(np.arange(1000), [5, 700])
  snap = store.open()
  assert np.array_equal(snap.read_extra("teacher_prob"), prob[keep])
  assert np.array_equal(snap.read_extra("weight", 290, 610), weight[keep][290:610])
  assert_batches_equal(snap.read(), Batch(b.dense[keep], b.ids[keep], b.mask[keep],
                                          b.labels[keep]))
  assert FeatureStore(tmp_path / "s").head().schema.extra_names == ("teacher_prob", "weight")
  with pytest.raises(SchemaMismatchError, match=r"extra columns \['weight'\] given"):
    with store.appender() as app:
      app.write(b.slice(0, 10), extras={"weight": weight[:10]})
  with pytest.raises(SchemaMismatchError, match=r"extra column 'weight' has shape \(9,\)"):
    with store.appender() as app:
      app.write(b.slice(0, 10), extras={"teacher_prob": prob[:10], "weight": weight[:9]})
  with pytest.raises(KeyError, match="no extra column 'x'"):
    snap.read_extra("x")
  with pytest.raises(SchemaMismatchError, match="extra feature #2"):
    FeatureStore.create(tmp_path / "s", FeatureSchema.from_layout(
        src.layout, extra_names=("teacher_prob",)), exist_ok=True)
  # Ingest keeps the generator's probabilities; Criteo data cannot go into such a store.
  path = str(tmp_path / "ingested")
  ingest("synthetic", path, num_examples=900, preset="test", chunk_rows=256, log=lambda *_: None)
  ingest("synthetic", path, start=900, num_examples=300, preset="test", log=lambda *_: None)
  want = synthetic.SyntheticCriteo(synthetic.small_config(scale=0.1)).teacher_probability(0, 1200)
  assert np.array_equal(FeatureStore(path).open().read_extra("teacher_prob"), want)
  tsv = tmp_path / "c.tsv"
  tsv.write_text("1" + "\t" * 39 + "\n")
  with pytest.raises(SchemaMismatchError, match="teacher column"):
    ingest(str(tsv), path, log=lambda *_: None)


def test_ingest_cli_synthetic_append_round_trip(tmp_path):
  path = str(tmp_path / "s")
  cmd = [sys.executable, "-m", "jaxrec.data.ingest", "--input=synthetic", "--preset=test",
         f"--store={path}", "--chunk_rows=1000", "--read_rows=700"]
  for start, n in ((0, 2500), (2500, 1200)):
    out = subprocess.run(cmd + [f"--start={start}", f"--num_examples={n}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["rows_appended"] == n
  assert summary["version"] == 2 and summary["rows_total"] == 3700
  src = synthetic.SyntheticCriteo(synthetic.small_config(scale=0.1))
  assert_batches_equal(FeatureStore(path).open().read(), src.examples(0, 3700), "cli store")


_RSS_CHILD = """
import resource, sys
from jaxrec.data.ingest import ingest
ingest("synthetic", sys.argv[1], num_examples=int(sys.argv[2]), preset="test", chunk_rows=4096,
       read_rows=5000, log=lambda *_: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_ingest_memory_does_not_grow_with_input(tmp_path):
  def peak_kib(n):
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / f"s{n}"), str(n)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])
  small, large = peak_kib(40_000), peak_kib(200_000)
  # 160,000 more rows are 46 MiB more data (unpadded); buffering it would show. What
  # does grow a little is the allocator's arenas warming up (about 10 MiB, then flat).
  assert large - small < 25 * 1024, (small, large)


def _criteo_row(rng: random.Random, label="1") -> str:
  ints = ["" if rng.random() < 0.2 else str(rng.randint(-3, 10**rng.randint(0, 9)))
          for _ in range(13)]
  cats = ["" if rng.random() < 0.1 else f"{rng.getrandbits(32):08x}" for _ in range(26)]
  return "\t".join([label] + ints + cats)


def _write_criteo(path, rows, gz=False):
  opener = gzip.open if gz else open
  with opener(path, "wt") as f:
    f.write("\n".join(rows) + "\n")
  return str(path)


def test_criteo_round_trip_two_files(tmp_path):
  rng = random.Random(0)
  a = _write_criteo(tmp_path / "day_0.gz", [_criteo_row(rng, str(i % 2)) for i in range(1500)],
                    gz=True)
  b = _write_criteo(tmp_path / "day_1", [_criteo_row(rng) for _ in range(700)])
  path = str(tmp_path / "s")
  s1 = ingest(a, path, chunk_rows=512, read_rows=400, log=lambda *_: None)
  s2 = ingest(str(tmp_path / "day_1*"), path, read_rows=400, log=lambda *_: None)  # a glob
  assert (s1["version"], s2["version"], s2["rows_total"]) == (1, 2, 2200)
  want = Batch.concat(list(criteo.CriteoReader([a, b], batch_size=1000)))
  snap = FeatureStore(path).open()
  assert snap.layout == criteo.CRITEO_LAYOUT
  assert snap.schema.dense_names == criteo.CRITEO_DENSE_NAMES
  assert_batches_equal(snap.read(), want, "criteo")


# ---- validation --------------------------------------------------------------------------------


def test_criteo_bad_row_names_file_and_line_and_leaves_store_unchanged(tmp_path):
  rng = random.Random(1)
  good = _write_criteo(tmp_path / "good", [_criteo_row(rng) for _ in range(300)])
  rows = [_criteo_row(rng) for _ in range(900)]
  fields = rows[613].split("\t")
  fields[20] = "zz-not-hex"  # C7 on line 614
  rows[613] = "\t".join(fields)
  bad = _write_criteo(tmp_path / "bad", rows)
  path = str(tmp_path / "s")
  ingest(good, path, chunk_rows=256, log=lambda *_: None)
  before = tree(path)
  with pytest.raises(criteo.CriteoFormatError, match=r"bad:614: field C7") as e:
    ingest(bad, path, read_rows=100, log=lambda *_: None)
  assert e.value.path == bad and e.value.line == 614
  assert tree(path) == before  # the aborted append removed its partial segment

  out = subprocess.run([sys.executable, "-m", "jaxrec.data.ingest", f"--input={bad}",
                        f"--store={path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "bad:614: field C7" in out.stderr and "unchanged" in out.stderr
  assert tree(path) == before

  summary = ingest(bad, path, bad_rows="skip", log=lambda *_: None)
  assert summary["rows_appended"] == 899 and summary["rows_skipped_parse"] == 1
  assert summary["skipped_by_reason"] == {"categorical": 1}
  assert "bad:614" in summary["skipped_examples"][0]


def test_schema_violations_error_or_skip_with_counts(tmp_path):
  src = synthetic.SyntheticCriteo(MULTI_HOT)
  store = FeatureStore.create(tmp_path / "s", schema_of(src), chunk_rows=256)
  b = src.examples(0, 600)
  b.labels[17] = np.nan
  b.dense[40, 3] = np.inf
  b.labels[41] = 2.0
  with store.appender(source="feed") as app:
    with pytest.raises(BadRowError, match=r"day3.tsv:118: field label: nan .*unlabeled"):
      app.write(b, RowOrigin("day3.tsv", 101, "line"))
    app.abort()
  with pytest.raises(BadRowError, match=r"stream: example 540: field I4: inf"):
    with store.appender() as app:
      app.write(b.slice(30, 41), RowOrigin("stream", 530, "example"))
  assert store.head().version == 0 and not os.listdir(tmp_path / "s" / "segments")
  with store.appender(source="feed", bad_rows="skip") as app:
    app.write(b.slice(0, 300))
    app.write(b.slice(300, 600))
  assert app.stats.rows_skipped == 3 and app.stats.rows_written == 597
  assert app.stats.skipped_by_reason == {"label": 2, "dense": 1}
  keep = np.setdiff1d(np.arange(600), [17, 40, 41])
  got = store.open().read()
  assert_batches_equal(got, Batch(b.dense[keep], b.ids[keep], b.mask[keep], b.labels[keep]))

  # Whole-batch mismatches name the feature.
  other = synthetic.SyntheticCriteo(synthetic.small_config(scale=0.1))  # one-hot
  with pytest.raises(SchemaMismatchError, match=r"sparse feature 'C21': store allows max_ids=4, "
                                                r"data has max_ids=1"):
    FeatureStore.create(tmp_path / "s", schema_of(other), exist_ok=True)
  with pytest.raises(SchemaMismatchError, match=r"x: batch does not fit .* ids/mask have shapes"):
    with store.appender(source="x") as app:
      app.write(other.examples(0, 10))
  with pytest.raises(ValueError, match=r"feature name 'a/b'"):
    FeatureSchema(("a/b",), ("C1",), (1,))


def test_concurrent_appenders_both_commit(tmp_path):
  src = synthetic.SyntheticCriteo(MULTI_HOT)
  store = FeatureStore.create(tmp_path / "s", schema_of(src), chunk_rows=300)
  apps = [store.appender(source=f"w{i}") for i in range(2)]
  for i, a in enumerate(apps):
    a.write(src.examples(1000 * i, 1000 * i + 1000))
  done = []
  threads = [threading.Thread(target=lambda a=a: done.append(a.commit())) for a in apps]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  head = store.head()
  assert head.version == 2 and sorted(s.source for s in head.segments) == ["w0", "w1"]
  got = store.open().read()
  order = [int(s.source[1]) for s in head.segments]
  want = Batch.concat([src.examples(1000 * i, 1000 * i + 1000) for i in order])
  assert_batches_equal(got, want, "two appenders")


def test_stale_tensorstore_lock_file_does_not_corrupt_head(tmp_path):
  # TensorStore reuses a dead writer's `<key>.__lock` without truncating it.
  src = synthetic.SyntheticCriteo(MULTI_HOT)
  path = tmp_path / "s"
  store = FeatureStore.create(path, schema_of(src), chunk_rows=300)
  with open(path / "HEAD.__lock", "wb") as f:
    f.write(b"x" * 100_000)
  store.append([src.examples(0, 100)])
  assert json.loads((path / "HEAD").read_bytes())["version"] == 1
  assert not (path / "HEAD.__lock").exists()  # emptied, then renamed onto HEAD
  # A lock held by a live writer is left alone.
  (path / "HEAD.__lock").write_bytes(b"partial")
  fd = os.open(path / "HEAD.__lock", os.O_WRONLY)
  try:
    import fcntl, struct
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqixxxx", fcntl.F_WRLCK, 0, 0, 0, 0))
    assert not clear_stale_lock(str(path / "HEAD.__lock"))
  finally:
    os.close(fd)
  assert clear_stale_lock(str(path / "HEAD.__lock"), delete=True)
  assert not (path / "HEAD.__lock").exists()


def test_memory_kvstore_url(tmp_path):
  # Non-local stores go through the kvstore API only (listing, deletes): same code as buckets.
  src = synthetic.SyntheticCriteo(MULTI_HOT)
  store = FeatureStore.create("memory://jaxrec_test_store/", schema_of(src), chunk_rows=128)
  store.append([src.examples(0, 300)])
  app = store.appender()
  app.write(src.examples(300, 400))
  app._close_segment()  # written but never committed: an orphan, as after a kill
  assert len(store._segment_ids()) == 2
  assert store.collect_garbage(grace_s=0)["segments"] == [app.segment_id]
  assert store._segment_ids() == [store.head().segments[0].id]
  assert_batches_equal(store.open().read(), src.examples(0, 300), "memory store")


# ---- kill -9 and concurrent readers ------------------------------------------------------------

_BASE_ROWS = 3000
_APPEND_ROWS = 40_000


def _ingest_cmd(path: str, start: int, n: int) -> list[str]:
  return [sys.executable, "-m", "jaxrec.data.ingest", "--input=synthetic", "--preset=test",
          f"--store={path}", f"--start={start}", f"--num_examples={n}", "--read_rows=2000",
          "--gc_grace_s=-1"]


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
  """A committed store (version 1), the data it should hold before and after the append, and
  the time a complete append takes once its segment appears."""
  d = tmp_path_factory.mktemp("kill")
  base = str(d / "base")
  ingest("synthetic", base, num_examples=_BASE_ROWS, preset="test", chunk_rows=1000,
         log=lambda *_: None)
  src = synthetic.SyntheticCriteo(synthetic.small_config(scale=0.1))
  ref = str(d / "ref")
  shutil.copytree(base, ref)
  proc = subprocess.Popen(_ingest_cmd(ref, _BASE_ROWS, _APPEND_ROWS), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  t_seg = _wait_for_new_segment(ref, set(os.listdir(os.path.join(ref, "segments"))), proc)
  proc.wait(timeout=300)
  write_s = time.perf_counter() - t_seg
  assert proc.returncode == 0, proc.stderr.read().decode()
  return {"dir": d, "base": base, "before": tree(base), "write_s": write_s,
          "want_before": src.examples(0, _BASE_ROWS),
          "want_after": src.examples(0, _BASE_ROWS + _APPEND_ROWS)}


def _wait_for_new_segment(path, old, proc) -> float:
  while True:
    segs = set(os.listdir(os.path.join(path, "segments"))) - old
    if segs and glob.glob(os.path.join(path, "segments", *segs, "_STARTED")):
      return time.perf_counter()
    if proc.poll() is not None:
      raise AssertionError(f"ingest exited ({proc.returncode}) before writing: "
                           f"{proc.stderr.read().decode()}")
    time.sleep(0.005)


def _segment_chunks(path, old) -> int:
  """How many label chunks the new segment holds so far (the writer's progress)."""
  segs = set(os.listdir(os.path.join(path, "segments"))) - old
  return sum(len(glob.glob(os.path.join(path, "segments", s, "labels", "c", "*"))) for s in segs)


def _kill_trials(base_store, kill_points) -> dict:
  """Runs one ingest per kill point and kills it there with SIGKILL.

  A kill point is ("chunks", k): as soon as k label chunks of the new segment are on disk, which
  is inside the write phase whatever the machine's speed; or ("time", f): f times the reference
  append's write phase after the segment appears (anywhere, including around the commit). The
  writer is first frozen (SIGSTOP) and HEAD read, so each trial knows whether the commit had
  happened when it died and checks the store against exactly that."""
  outcome = {"before": 0, "after": 0}
  for t, (kind, arg) in enumerate(kill_points):
    path = str(base_store["dir"] / f"trial_{kind}_{arg}_{t}")
    shutil.copytree(base_store["base"], path)
    old = set(os.listdir(os.path.join(path, "segments")))
    proc = subprocess.Popen(_ingest_cmd(path, _BASE_ROWS, _APPEND_ROWS), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_new_segment(path, old, proc)
    if kind == "chunks":
      while _segment_chunks(path, old) < arg and proc.poll() is None:
        time.sleep(0.002)
    else:
      time.sleep(arg * base_store["write_s"])
    os.kill(proc.pid, signal.SIGSTOP)
    committed = (open(os.path.join(path, "HEAD"), "rb").read() != base_store["before"]["HEAD"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if kind == "chunks":
      assert not committed, f"trial {t}: the append committed before {arg} chunks were seen"
    store = FeatureStore(path)
    head = store.head()
    if not committed:
      outcome["before"] += 1
      assert (open(os.path.join(path, "HEAD"), "rb").read()
              == base_store["before"]["HEAD"]), f"trial {t}: HEAD moved after the writer froze"
      assert_batches_equal(store.open().read(), base_store["want_before"], f"trial {t}")
      store.collect_garbage(grace_s=0)
      assert tree(path) == base_store["before"], f"trial {t}: files differ after cleanup"
    else:
      outcome["after"] += 1  # killed after the commit point: the whole append is there
      assert head.version == 2 and head.num_rows == _BASE_ROWS + _APPEND_ROWS
      assert_batches_equal(store.open().read(), base_store["want_after"], f"trial {t}")
    shutil.rmtree(path)
  return outcome


def test_kill9_during_ingest_leaves_store_as_before(base_store):
  # Mid-write by progress (always before the commit), then a random time, then around the commit.
  rng = random.Random(0)
  points = [("chunks", 2), ("time", rng.uniform(0.0, 0.9)), ("time", rng.uniform(0.85, 1.1))]
  outcome = _kill_trials(base_store, points)
  print(f"kill -9 trials: {outcome}, write phase {base_store['write_s']:.2f}s")
  assert outcome["before"] >= 1, outcome


@pytest.mark.slow
def test_kill9_during_ingest_many_trials(base_store):
  rng = random.Random(1)
  points = ([("chunks", rng.randint(1, _APPEND_ROWS // 1000 - 1)) for _ in range(10)]
            + [("time", rng.uniform(0.0, 1.1)) for _ in range(10)])
  outcome = _kill_trials(base_store, points)
  print(f"kill -9 trials: {outcome}, write phase {base_store['write_s']:.2f}s")
  assert outcome["before"] >= 10, outcome


def test_concurrent_reader_never_sees_partial_append(base_store):
  path = str(base_store["dir"] / "concurrent")
  shutil.copytree(base_store["base"], path)
  want = {_BASE_ROWS: base_store["want_before"],
          _BASE_ROWS + _APPEND_ROWS: base_store["want_after"]}
  seen = {n: 0 for n in want}
  stop = threading.Event()
  errors = []

  def reader():
    try:
      while not stop.is_set():
        snap = FeatureStore(path).open()
        assert snap.num_rows in want, f"reader saw {snap.num_rows} rows"
        assert_batches_equal(snap.read(), want[snap.num_rows], f"{snap.num_rows} rows")
        seen[snap.num_rows] += 1
    except BaseException as e:  # noqa: BLE001
      errors.append(e)

  th = threading.Thread(target=reader)
  th.start()
  # One append killed half way, then one that completes, while the reader keeps reading.
  for kill in (True, False):
    old = set(os.listdir(os.path.join(path, "segments")))
    proc = subprocess.Popen(_ingest_cmd(path, _BASE_ROWS, _APPEND_ROWS), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill:  # half way by progress (20 of 40 label chunks), so never after its commit
      _wait_for_new_segment(path, old, proc)
      while _segment_chunks(path, old) < _APPEND_ROWS // 2000 and proc.poll() is None:
        time.sleep(0.002)
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=300)
  deadline = time.time() + 60
  while not seen[_BASE_ROWS + _APPEND_ROWS] and time.time() < deadline and not errors:
    time.sleep(0.05)
  stop.set()
  th.join()
  assert not errors, errors[0]
  assert seen[_BASE_ROWS] >= 1 and seen[_BASE_ROWS + _APPEND_ROWS] >= 1, seen
