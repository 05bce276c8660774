"""What the training monitors cost per step: the same DLRM step and data with monitors off,
with only the step's monitor values (step_only), fully on (the default: scalars fetched every
10 steps, a record every 50), and on with a fetch after every step (the per-step sync the
anomaly guard used to make).

  python benchmarks/monitor_overhead.py
  python benchmarks/monitor_overhead.py --steps=400 --batch_size=2048 --rounds=3

Batches are made and placed on the devices before timing and cycled, so input is not measured.
Each mode runs ``--steps`` steps per round, modes interleaved, ``--rounds`` rounds; the median
round is reported, as wall time and as this process's CPU time (steadier on a shared
machine). Ends with one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 200, "steps per timed round and mode")
flags.DEFINE_integer("rounds", 3, "timed rounds (modes interleaved); the median is reported")
flags.DEFINE_integer("batch_size", 1024, "global batch size")
flags.DEFINE_string("preset", "test", "synthetic data preset (test, small, kaggle)")
flags.DEFINE_integer("log_every", 50, "monitor record every N steps")


def main(argv):
  del argv
  import jax
  import numpy as np
  from experiments.configs import dlrm_synthetic
  from jaxrec.monitoring import Monitor, MonitorOptions
  from jaxrec.train import builders, loop
  from jaxrec.distributed.mesh import make_mesh
  from jaxrec.train.state import place_state
  from jaxrec.train.step import jit_steps

  c = dlrm_synthetic.get_config("test")
  c.data.preset = FLAGS.preset
  c.data.batch_size = FLAGS.batch_size
  stream, cards = loop._data_sources(c)  # pylint: disable=protected-access
  mesh = make_mesh(c.mesh.get("shape"), None)
  emb = builders.embedding_plan(stream.layout, cards, c.embedding, c.model.embedding_dim,
                                mesh=mesh, batch_size=FLAGS.batch_size)
  model = builders.build_model(c.model, c.data.num_dense, stream.layout.num_features, c.seed)
  tx = builders.dense_optimizer(c.optimizer, 10_000)
  graphdef, state0 = loop.init_state(c, emb, model, tx)
  batches = [jax.device_put(builders.device_batch(emb.check_batch(
      stream.examples(i * FLAGS.batch_size, (i + 1) * FLAGS.batch_size))), emb.batch_sharding)
      for i in range(16)]

  modes = {}
  for name, monitors in (("off", None), ("step_only", True), ("on", True),
                         ("on_sync_every_step", True)):
    opts = MonitorOptions(log_every_steps=FLAGS.log_every, tensorboard=False,
                          anomaly_action="log",
                          check_every_steps=1 if name == "on_sync_every_step" else 10)
    state = place_state(jax.tree.map(np.asarray, state0), emb)
    train, _ = jit_steps(graphdef, emb, tx, state,
                         monitors=opts.step_monitors() if monitors else None)
    compiled = train.lower(state, batches[0]).compile()
    mon = Monitor(opts, workdir=None, total_steps=10**9, batch_size=FLAGS.batch_size,
                  compiled=compiled, column_tables=np.arange(stream.layout.num_columns),
                  say=lambda s: None) if monitors and name != "step_only" else None
    modes[name] = {"compiled": compiled, "state": state, "monitor": mon, "step": 0, "times": [], "cpu": []}

  def run(mode, n):
    m = modes[mode]
    state, mon = m["state"], m["monitor"]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
      state, metrics = m["compiled"](state, batches[i % len(batches)])
      m["step"] += 1
      if mon is not None:
        mon.after_step(m["step"], metrics, batches[i % len(batches)], {"example": 0})
    jax.block_until_ready(state)
    m["state"] = state
    m["cpu"].append(time.process_time() - c0)
    return time.perf_counter() - t0

  for mode in modes:
    run(mode, 20)                                       # warm up
    modes[mode]["cpu"].clear()
  for _ in range(FLAGS.rounds):
    for mode in modes:
      modes[mode]["times"].append(run(mode, FLAGS.steps))

  load = os.getloadavg()
  print(f"DLRM train step, preset {FLAGS.preset}, batch {FLAGS.batch_size}, {FLAGS.steps} steps "
        f"x {FLAGS.rounds} rounds on {jax.devices()[0].platform} x{len(jax.devices())} "
        f"({platform.processor() or platform.machine()}), load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
  print(f"{'monitors':<22}{'ms/step':>10}{'samples/s':>12}{'vs off':>9}{'CPU ms/step':>13}"
        f"{'vs off':>9}")
  base = float(np.median(modes["off"]["times"]))
  cbase = float(np.median(modes["off"]["cpu"]))
  out = {}
  for mode, m in modes.items():
    t = float(np.median(m["times"]))
    ms = 1e3 * t / FLAGS.steps
    cpu = float(np.median(m["cpu"]))
    out[mode] = {"ms_per_step": ms, "samples_per_s": FLAGS.batch_size * FLAGS.steps / t,
                 "ratio_vs_off": t / base, "cpu_ms_per_step": 1e3 * cpu / FLAGS.steps,
                 "cpu_ratio_vs_off": cpu / cbase}
    print(f"{mode:<22}{ms:>10.2f}{out[mode]['samples_per_s']:>12,.0f}{t / base:>9.3f}"
          f"{out[mode]['cpu_ms_per_step']:>13.2f}{cpu / cbase:>9.3f}")
  print(json.dumps({"batch_size": FLAGS.batch_size, "steps": FLAGS.steps, "rounds": FLAGS.rounds,
                    "load_average_1m": load[0], **{f"{k}_{f}": v[f] for k, v in out.items()
                                                   for f in ("ms_per_step", "ratio_vs_off", "cpu_ratio_vs_off")}}))


if __name__ == "__main__":
  app.run(main)
