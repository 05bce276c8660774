"""End-to-end training: the planted task is learnable, and embeddings are what make it so."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import dlrm_synthetic
from jaxrec.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**data):
  c = dlrm_synthetic.get_config("test")
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


@pytest.fixture(scope="module")
def full_run():
  return train_and_evaluate(_config(), None)


def test_reaches_near_bayes_auc(full_run):
  s = full_run
  assert s["bayes_auc"] > 0.75
  # The quick start gets within 0.01 of Bayes on 5M examples; this miniature sees 800k.
  assert s["test_auc"] > s["bayes_auc"] - 0.025, s
  assert s["test_logloss"] < s["constant_logloss"] - 0.05


def test_large_features_matter(full_run):
  # The eight largest vocabularies of the test stream (2k..20k IDs each).
  c = _config(drop_features=("C3", "C4", "C10", "C12", "C16", "C21", "C24", "C26"))
  s = train_and_evaluate(c, None)
  assert s["test_auc"] < full_run["test_auc"] - 0.02, (s["test_auc"], full_run["test_auc"])


def test_a_tenth_of_the_data_is_not_enough(full_run):
  c = _config()
  c.data.train_examples //= 10                # eval_start is pinned: same held-out examples
  s = train_and_evaluate(c, None)
  assert s["eval_examples"] == full_run["eval_examples"]
  assert abs(s["bayes_auc"] - full_run["bayes_auc"]) < 1e-9
  assert s["test_auc"] < full_run["test_auc"] - 0.02, (s["test_auc"], full_run["test_auc"])


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
