"""Resharding across real processes: a snapshot written on 8 devices restores on 4, then 1,
then 8 again (each hop a new process with its own JAX_NUM_CPU_DEVICES, each restoring the
previous hop's version, checking it, changing some rows and saving a new one).

  python tests/test_checkpoint_reshard.py hop WORKDIR   # one hop (used by the test)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def hop(workdir: str):
  sys.path.insert(0, HERE)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from test_checkpoint import _touch_rows, tiny_config

  from jaxrec.checkpoint import Checkpointer, SnapshotOptions, from_config

  n = jax.device_count()
  run = from_config.build(tiny_config(sharded=True, devices=n))
  ck = Checkpointer(os.path.join(workdir, "checkpoints"),
                    SnapshotOptions(save_every_steps=1, min_row_group_bytes=1024),
                    layouts=run.layouts)
  ref = os.path.join(workdir, "reference.npz")
  r = ck.restore_or_init(run.state)
  tabs, slots = run.emb.to_dense(r.state.emb)
  if r.step is not None:
    want = np.load(ref)
    for name in tabs:
      np.testing.assert_array_equal(tabs[name], want[f"t/{name}"])
      np.testing.assert_array_equal(slots[name]["acc"], want[f"s/{name}"])
    np.testing.assert_array_equal(
        np.asarray(r.state.params["top"]["layers"][0]["kernel"][...]), want["kernel"])
  step = 0 if r.step is None else r.step + 1
  state = r.state
  for k in range(2):  # a full version (the layout changed) and an increment on top
    state = _touch_rows(run.emb, state, np.random.default_rng(step), 0.05)
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    ck.save(step, state, data_position={"example": step}, force=True)
    step += 1
  ck.wait_until_finished()
  tabs, slots = run.emb.to_dense(state.emb)
  np.savez(ref, kernel=np.asarray(state.params["top"]["layers"][0]["kernel"][...]),
           **{f"t/{k}": v for k, v in tabs.items()},
           **{f"s/{k}": v["acc"] for k, v in slots.items()})
  kinds = [v.kind for v in ck.versions()][-2:]
  print(f"HOP devices={n} restored={r.step} saved={kinds}", flush=True)


@pytest.mark.slow
def test_reshard_8_4_1_8_across_processes(tmp_path):
  for n in (8, 4, 1, 8):
    out = subprocess.run([sys.executable, __file__, "hop", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, JAX_NUM_CPU_DEVICES=str(n), PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"HOP devices={n}" in out.stdout
    assert "saved=['full', 'incremental']" in out.stdout, out.stdout


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "hop":
    hop(sys.argv[2])
  else:
    raise SystemExit(__doc__)
