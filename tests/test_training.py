"""End-to-end training: the planted task is learnable, and embeddings are what make it so."""

import json
import os
import subprocess
import sys

import pytest

from experiments.configs import dlrm_synthetic
from jaxrec.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**data):
  c = dlrm_synthetic.get_config("test")
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def test_full_run_nears_bayes_and_needs_its_data_and_large_features():
  # One test, not three sharing a module fixture: under xdist each worker would train the
  # 30-second full run again (pytest 9.2 no longer honours xdist_group's loadgroup).
  full = train_and_evaluate(_config(), None)
  assert full["bayes_auc"] > 0.75
  # The quick start gets within 0.01 of Bayes on 5M examples; this miniature sees 800k.
  assert full["test_auc"] > full["bayes_auc"] - 0.025, full
  assert full["test_logloss"] < full["constant_logloss"] - 0.05

  # Without the eight largest vocabularies of the test stream (2k..20k IDs each).
  c = _config(drop_features=("C3", "C4", "C10", "C12", "C16", "C21", "C24", "C26"))
  s = train_and_evaluate(c, None)
  assert s["test_auc"] < full["test_auc"] - 0.02, ("large features", s["test_auc"],
                                                   full["test_auc"])

  # A tenth of the training data: eval_start is pinned, so the same held-out examples.
  c = _config()
  c.data.train_examples //= 10
  s = train_and_evaluate(c, None)
  assert s["eval_examples"] == full["eval_examples"]
  assert abs(s["bayes_auc"] - full["bayes_auc"]) < 1e-9
  assert s["test_auc"] < full["test_auc"] - 0.02, ("a tenth of the data", s["test_auc"],
                                                   full["test_auc"])


def test_cli_end_to_end(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
       "--config=" + os.path.join(ROOT, "experiments", "configs", "dlrm_synthetic.py") + ":tiny",
       "--config.data.train_examples=20000", "--config.data.eval_examples=10000",
       "--config.log_every_steps=5", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  final = json.loads(lines[-1])
  assert {"test_auc", "bayes_auc", "samples_per_s"} <= set(final)
  assert any(l.startswith("step ") and "samples/s" in l and "ETA" in l for l in lines)
  assert "Bayes-optimal AUC" in lines[-2]
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert records[-1]["final/test_auc"] == pytest.approx(final["test_auc"])
  assert sum("loss" in r for r in records) >= 3


def test_cli_rejects_unknown_override(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
       "--config=" + os.path.join(ROOT, "experiments", "configs", "dlrm_synthetic.py") + ":tiny",
       "--config.data.no_such_field=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode != 0
  assert "no_such_field" in out.stderr


def test_cli_resumes_from_its_snapshot(tmp_path):
  """A second run in the same workdir restores the final snapshot (tables, slots, dense params,
  data position): it trains no step and evaluates the identical model. It also loads the train
  step from the first run's persistent compilation cache instead of compiling it again."""
  cache = tmp_path / "xla_cache"
  args = [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
          "--config=" + os.path.join(ROOT, "experiments", "configs", "dlrm_synthetic.py") + ":tiny",
          "--config.data.train_examples=20480", "--config.data.eval_examples=8192",
          "--config.log_every_steps=5", "--config.checkpoint.every_steps=5",
          f"--workdir={tmp_path}", f"--compile_cache_dir={cache}", "--verbosity=1"]
  # Cache every compile, however short (the default skips those under a second).
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert first.returncode == 0, first.stderr[-2000:]
  versions = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert versions[0] == 0 and versions[-1] == 20, versions   # the run's start and its end
  second = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "checkpoint: resumed from step 20 (example 20,480)" in second.stdout
  assert not any(l.startswith("step ") for l in second.stdout.splitlines())  # none trained again
  a = json.loads(first.stdout.strip().splitlines()[-1])
  b = json.loads(second.stdout.strip().splitlines()[-1])
  assert a["test_auc"] == b["test_auc"] and a["test_logloss"] == b["test_logloss"]
  assert any(p.name.startswith("jit_train_step-") for p in cache.iterdir())
  assert "cache miss for 'jit_train_step'" in first.stderr.lower()
  assert "cache miss for 'jit_train_step'" not in second.stderr.lower()
  assert "cache hit for 'jit_train_step'" in second.stderr.lower()
