"""Crash safety with real processes: kill -9 a training run at random moments while it saves.

Every trial restarts the run from its newest version (as a rescheduled job would); after every
kill the listing holds only complete versions and the next run resumes from the newest one.
The default suite runs a few trials, ``-m slow`` runs 25.

  python tests/test_checkpoint_crash.py child WORKDIR   # the training process (used by the test)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
B = 64
CARDS = (4000, 9000, 20000, 30000)
OPTIONS = dict(save_every_steps=2, keep_latest=3, full_every=3, min_row_group_bytes=1024)


def child(workdir: str):
  """Trains forever, saving every 2 steps; prints what it does (the parent kills it)."""
  sys.path.insert(0, HERE)
  import numpy as np
  from test_checkpoint import Trainer, tiny_config

  from jaxrec.checkpoint import Checkpointer, SnapshotOptions

  config = tiny_config(CARDS, devices=1, sharded=True)
  config.embedding.max_rows = 1 << 15
  t = Trainer(config)
  ck = Checkpointer(workdir, SnapshotOptions(**OPTIONS), layouts=t.run.layouts)
  r = ck.restore_or_init(t.run.state)
  state = r.state
  pos = (r.data_position or {"example": 0})["example"]
  assert r.step is None or pos == r.step * B, (r.step, pos)
  print(f"RESUMED {r.step}", flush=True)
  if r.step is None:
    ck.save(0, state, data_position={"example": 0})
  while True:
    state, m = t.step(state, pos // B)
    pos += B
    step = int(state.step)
    if not np.isfinite(float(m["loss"])):
      raise FloatingPointError(step)
    if ck.should_save(step):
      print(f"SAVING {step}", flush=True)
      info = ck.save(step, state, data_position={"example": pos})
      print(f"SAVE_STARTED {step} {info.kind}", flush=True)


def _newest_ok(d):
  from jaxrec.checkpoint.versions import list_versions
  ok = [v.step for v in list_versions(d) if v.ok]
  return ok[-1] if ok else None


def _cli_list(d):
  out = subprocess.run([sys.executable, "-m", "jaxrec.checkpoint", "list", f"--dir={d}",
                        "--json", "--verify=checksum"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
  return [json.loads(line) for line in out.stdout.splitlines()]


def run_trials(tmp_path, trials: int, seed: int):
  d = str(tmp_path / "checkpoints")
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  rng = random.Random(seed)
  kinds_killed, mid_save = [], []
  for trial in range(trials):
    expect = _newest_ok(d)
    p = subprocess.Popen([sys.executable, __file__, "child", d], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
      first = p.stdout.readline()
      assert first.startswith("RESUMED"), first + p.stderr.read()
      got = first.split()[1]
      assert got == str(expect), f"trial {trial}: resumed from {got}, newest complete {expect}"
      target = rng.randint(1, 3)
      seen = 0
      while seen < target:
        line = p.stdout.readline()
        assert line, f"trial {trial}: the run died:\n{p.stderr.read()}"
        if line.startswith("SAVING"):
          seen += 1
          kinds_killed.append(line.split()[1])
      time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside or just after the save
    finally:
      p.send_signal(signal.SIGKILL)
      p.wait()
    mid_save.append(any(".orbax-checkpoint-tmp" in n for n in os.listdir(d)))
    listing = _cli_list(d)
    current = [v for v in listing if not v["rolled_back"]]
    assert current, f"trial {trial}: no version survived"
    assert all(v["status"] == "ok" for v in current), (trial, current)
  print(f"{sum(mid_save)} of {trials} kills left a save half-written")
  return d, mid_save


def _final_restore(d):
  from test_checkpoint import tiny_config
  from jaxrec.checkpoint import Checkpointer, SnapshotOptions, from_config

  config = tiny_config(CARDS, devices=1, sharded=True)
  config.embedding.max_rows = 1 << 15
  run = from_config.build(config)
  r = Checkpointer(d, SnapshotOptions(**OPTIONS), layouts=run.layouts).restore(run.state)
  assert r.step == _newest_ok(d) and int(r.state.step) == r.step
  assert r.data_position == {"example": r.step * B}


def test_kill_during_saves_a_few_times(tmp_path):
  d, _ = run_trials(tmp_path, trials=3, seed=0)
  _final_restore(d)


@pytest.mark.slow
def test_kill_during_saves_25_times(tmp_path):
  d, mid_save = run_trials(tmp_path, trials=25, seed=1)
  _final_restore(d)
  assert sum(mid_save) >= 5, "too few kills landed inside a save to test anything"


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "child":
    child(sys.argv[2])
  else:
    raise SystemExit(__doc__)
