"""Training from a feature store (config.data.source="store") and from Criteo files
("criteo"): the same examples in the same order train the same model as the synthetic source,
the teacher column keeps the Bayes AUC, and a run stopped and resumed reads exactly the batches
of an uninterrupted one (the pipeline position lives in the checkpoint).

References are independent of the store: the synthetic source reads the generator directly,
the Criteo source parses the TSV files directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import dlrm_store, dlrm_synthetic
from jaxrec.data import criteo
from jaxrec.data.ingest import ingest
from jaxrec.data.store import FeatureStore
from jaxrec.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = 16 * 1024
N_EVAL = 8192
_quiet = lambda *_: None


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("stores")
  train, ev = str(root / "train"), str(root / "eval")
  ingest("synthetic", train, num_examples=N_TRAIN, preset="test", chunk_rows=2048,
         read_rows=5000, log=_quiet)
  ingest("synthetic", ev, start=N_TRAIN, num_examples=N_EVAL, preset="test", chunk_rows=2048,
         log=_quiet)
  return train, ev


def _shrink(c):
  c.data.batch_size = 1024
  c.data.eval_batch_size = 4096
  c.log_every_steps = 1000
  c.optimizer.warmup_steps = 4
  c.optimizer.decay = "constant"   # the schedule does not depend on the run's length
  c.checkpoint.every_steps = 1000
  return c


def store_config(stores, **data):
  c = _shrink(dlrm_store.get_config("test"))
  c.data.store_path, c.data.eval_store_path = stores
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


@pytest.fixture(scope="module")
def synthetic_run():
  c = _shrink(dlrm_synthetic.get_config("test"))
  c.data.train_examples = N_TRAIN
  c.data.eval_start = N_TRAIN
  c.data.eval_examples = N_EVAL
  return train_and_evaluate(c, None)


def test_store_in_order_trains_like_the_synthetic_source(stores, synthetic_run):
  s = train_and_evaluate(store_config(stores, shuffle=False), None)
  want = synthetic_run
  assert s["steps"] == want["steps"] == N_TRAIN // 1024
  assert s["eval_examples"] == want["eval_examples"] == N_EVAL
  # Same examples, same order, same program: the same model.
  assert s["test_auc"] == pytest.approx(want["test_auc"], abs=1e-6)
  assert s["test_logloss"] == pytest.approx(want["test_logloss"], abs=1e-6)
  # The teacher column holds the generator's probabilities exactly.
  assert s["bayes_auc"] == want["bayes_auc"] and s["bayes_logloss"] == want["bayes_logloss"]
  # Sane: learned something, and not better than the Bayes-optimal predictor.
  assert 0.6 < s["test_auc"] < s["bayes_auc"] + 0.005, s


@pytest.mark.slow   # three trainings; test_resumed_pipeline_reads_the_uninterrupted_batches
def test_shuffled_store_run_resumes_exactly(stores, tmp_path):   # is the fast version
  full = train_and_evaluate(store_config(stores), str(tmp_path / "full"))
  k = 6
  part = train_and_evaluate(store_config(stores, train_examples=k * 1024),
                            str(tmp_path / "resumed"))
  assert part["steps"] == k
  resumed = train_and_evaluate(store_config(stores), str(tmp_path / "resumed"))
  assert resumed["steps"] == full["steps"] == N_TRAIN // 1024
  assert resumed["test_auc"] == pytest.approx(full["test_auc"], abs=1e-6)
  assert resumed["test_logloss"] == pytest.approx(full["test_logloss"], abs=1e-6)
  assert 0.6 < full["test_auc"] < full["bayes_auc"] + 0.005, full
  # The position is the pipeline's state, and a resume with another order is refused.
  from jaxrec import checkpoint as ckpt_lib
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(tmp_path / "resumed")))
  pos = ck.versions()[-1].data_position
  ck.close()
  assert pos["example"] == N_TRAIN and pos["store"]["next_index"] == N_TRAIN // 1024
  assert pos["store"]["store_version"] == FeatureStore(stores[0]).head().version


def test_resumed_pipeline_reads_the_uninterrupted_batches(stores):
  """What the training loop does on resume, without training: the source reopened from the
  checkpointed position (through JSON, as the checkpoint stores it) yields exactly the rest of
  the uninterrupted shuffled sequence; a position saved under another order is refused."""
  from jaxrec.train import sources
  steps, k = N_TRAIN // 1024, 5
  whole = list(sources.open_data(store_config(stores)).train_batches(0, steps * 1024))
  assert len(whole) == steps
  first = sources.open_data(store_config(stores))
  saved = json.loads(json.dumps(first.position(k * 1024)))
  assert saved["store"]["next_index"] == k and saved["store"]["seed"] == 0
  again = sources.open_data(store_config(stores))
  again.resume_from(saved)
  rest = list(again.train_batches(k * 1024, steps * 1024))
  assert len(rest) == steps - k
  for got, want in zip(rest, whole[k:]):
    for f in ("dense", "ids", "mask", "labels"):
      assert np.array_equal(getattr(got, f), getattr(want, f)), f
  # Shuffled: not the store order.
  assert not np.array_equal(whole[0].labels, FeatureStore(stores[0]).open().read(0, 1024).labels)
  other = sources.open_data(store_config(stores, shuffle_seed=1))
  other.resume_from(saved)
  with pytest.raises(ValueError, match="seed"):
    other.train_batches(k * 1024, steps * 1024)


def _criteo_lines(rng, n: int) -> list[str]:
  """Criteo TSV rows whose label depends on C1 and I1 (so there is something to learn)."""
  lines = []
  for _ in range(n):
    c1 = int(rng.integers(0, 40))
    i1 = int(rng.integers(0, 20))
    p = 1 / (1 + np.exp(-(((c1 % 7) - 3) * 0.8 + (i1 - 10) * 0.1)))
    dense = [str(i1)] + [str(int(rng.integers(0, 100))) if rng.random() > 0.2 else ""
                         for _ in range(criteo.NUM_DENSE - 1)]
    sparse = [f"{c1:08x}"] + [f"{int(rng.integers(0, 500)):08x}" if rng.random() > 0.1 else ""
                              for _ in range(criteo.NUM_SPARSE - 1)]
    lines.append("\t".join([str(int(rng.random() < p))] + dense + sparse))
  return lines


def test_criteo_files_and_their_store_train_alike(tmp_path):
  rng = np.random.default_rng(0)
  train_tsv, eval_tsv = tmp_path / "day_0.tsv", tmp_path / "day_1.tsv"
  train_tsv.write_text("\n".join(_criteo_lines(rng, 8192)) + "\n")
  eval_tsv.write_text("\n".join(_criteo_lines(rng, 4096)) + "\n")
  store, eval_store = str(tmp_path / "train"), str(tmp_path / "eval")
  ingest(str(train_tsv), store, chunk_rows=1024, log=_quiet)
  ingest(str(eval_tsv), eval_store, chunk_rows=1024, log=_quiet)

  def config(**data):
    c = _shrink(dlrm_store.get_config("test"))
    c.data.preset = ""               # Criteo: every table embedding.max_rows rows
    c.embedding.max_rows = 4096
    for k, v in data.items():
      setattr(c.data, k, v)
    return c

  a = train_and_evaluate(config(source="criteo", train_files=str(train_tsv),
                                eval_files=str(eval_tsv), train_examples=8192), None)
  b = train_and_evaluate(config(store_path=store, eval_store_path=eval_store, shuffle=False),
                         None)
  assert a["bayes_auc"] is None and b["bayes_auc"] is None   # no teacher for real data
  assert a["steps"] == b["steps"] == 8 and a["eval_examples"] == b["eval_examples"] == 4096
  assert b["test_auc"] == pytest.approx(a["test_auc"], abs=1e-6)
  assert b["test_logloss"] == pytest.approx(a["test_logloss"], abs=1e-6)
  assert a["test_auc"] > 0.6, a   # the planted C1 effect is learned


def test_store_source_errors_name_the_setting(stores, tmp_path):
  with pytest.raises(ValueError, match="eval_store_path"):
    train_and_evaluate(store_config(stores, eval_store_path=""), None)
  with pytest.raises(FileNotFoundError, match="no feature store"):
    train_and_evaluate(store_config(stores, store_path=str(tmp_path / "none")), None)
  with pytest.raises(ValueError, match="less than one eval batch"):
    train_and_evaluate(store_config(stores, eval_batch_size=2 * N_EVAL), None)
  with pytest.raises(ValueError, match="train_files"):
    train_and_evaluate(store_config(stores, source="criteo"), None)


@pytest.mark.slow
def test_docstring_commands_ingest_then_train(tmp_path):
  """The two commands of dlrm_store.py's docstring, as subprocesses, on a small slice."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONPATH=ROOT)
  for extra in (["--num_examples=20480"], ["--start=20480", "--num_examples=8192"]):
    dest = tmp_path / ("eval" if extra[0].startswith("--start") else "train")
    out = subprocess.run([sys.executable, "-m", "jaxrec.data.ingest", "--input=synthetic",
                          "--preset=small", f"--store={dest}"] + extra,
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
       "--config=" + os.path.join(ROOT, "experiments", "configs", "dlrm_store.py") + ":tiny",
       f"--config.data.store_path={tmp_path / 'train'}",
       f"--config.data.eval_store_path={tmp_path / 'eval'}", "--config.log_every_steps=5",
       f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  final = json.loads(out.stdout.strip().splitlines()[-1])
  assert final["steps"] == 20 and final["eval_examples"] == 8192
  assert final["bayes_auc"] is not None and 0.55 < final["test_auc"] < final["bayes_auc"] + 0.01
  assert "Bayes-optimal AUC" in out.stdout
