"""How long does the dynamic-table DLRM train step take to compile, and to run?

Builds the train step of ``experiments/configs/dlrm_dynamic.py`` (26 dynamic tables, or the
mixed static/dynamic model with --dynamic_min_vocab) exactly as the training loop does, and
times ``train_step.lower(...).compile()`` (the loop's "compiled train step in ..." figure)
and then the median of --steps timed steps on synthetic batches (after one warm-up step).
Compile CPU time (all threads) is printed beside the wall time: on a shared machine it is
the steadier figure.

  PYTHONPATH=. python benchmarks/dynamic_compile.py [--variant=test] [--devices=1]
      [--dynamic_min_vocab=0] [--steps=10] [--group_tables=1,0]

--devices sets JAX_NUM_CPU_DEVICES (fake CPU devices) and the mesh size. The table lists the
dynamic table groups the engine batches into one program (same capacity, dim, optimizer and
policies). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="test", help="dlrm_dynamic variant (test, tiny, '')")
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--dynamic_min_vocab", type=int, default=0,
                 help="tables with a smaller vocabulary stay static (0: all dynamic)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--group_tables", default="1",
                 help="comma-separated 1 (same-shaped tables as one vmapped program) and/or 0 "
                      "(one program per table, the layout before grouping); each is built, "
                      "compiled and timed in turn")
  return p.parse_args()


def main():
  a = _parse()
  os.environ["JAX_NUM_CPU_DEVICES"] = str(a.devices)
  import jax
  import numpy as np

  from experiments.configs import dlrm_dynamic
  from jaxrec.train import builders, loop
  from jaxrec.distributed.mesh import make_mesh
  from jaxrec.train.state import place_state
  from jaxrec.train.step import jit_steps

  c = dlrm_dynamic.get_config(a.variant)
  if "dynamic_min_vocab" in c.embedding:
    c.embedding.dynamic_min_vocab = a.dynamic_min_vocab
  elif a.dynamic_min_vocab:
    sys.exit("this checkout's dlrm_dynamic has no embedding.dynamic_min_vocab")
  stream, cards = loop._data_sources(c)
  mesh = make_mesh((a.devices,))

  def measure(group: bool) -> dict:
    c.embedding.dynamic_group_tables = group
    emb = builders.embedding_plan(stream.layout, cards, c.embedding, c.model.embedding_dim,
                                  mesh=mesh, batch_size=c.data.batch_size)
    model = builders.build_model(c.model, c.data.num_dense, stream.layout.num_features, c.seed)
    tx = builders.dense_optimizer(c.optimizer, 1000)
    graphdef, state = loop.init_state(c, emb, model, tx)
    state = place_state(state, emb)
    train_step, _ = jit_steps(graphdef, emb, tx, state)
    put = lambda b: jax.device_put(builders.device_batch(emb.check_batch(b)),
                                   emb.batch_sharding)
    bs = c.data.batch_size
    example = put(stream.examples(0, bs))
    groups = getattr(emb, "groups", {})
    print(f"{len(emb.table_specs)} tables, {sum(map(len, groups.values()))} dynamic in "
          f"{len(groups)} programs, {a.devices} device(s), batch {bs}")
    for g, names in groups.items():
      print(f"  {g}: {', '.join(names)}")
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = train_step.lower(state, example).compile()
    compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
    times = []
    for i in range(a.steps + 1):
      batch = put(stream.examples((i + 1) * bs, (i + 2) * bs))
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t)
    load = os.getloadavg()
    return {"group_tables": group, "programs": len(groups), "compile_s": round(compile_s, 2),
            "compile_cpu_s": round(compile_cpu, 2),
            "step_ms": round(float(np.median(times[1:])) * 1e3, 2), "loss": float(m["loss"]),
            "loadavg": [round(x, 2) for x in load]}

  rows = [measure(bool(int(g))) for g in a.group_tables.split(",")]
  print("| group_tables | dynamic programs | compile wall (s) | compile CPU (s) | "
        "step median (ms) | load avg 1/5/15 |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {int(r['group_tables'])} | {r['programs']} | {r['compile_s']:.1f} | "
          f"{r['compile_cpu_s']:.1f} | "
          f"{r['step_ms']:.1f} | {' / '.join(f'{x:.2f}' for x in r['loadavg'])} |")
  print(json.dumps({"variant": a.variant, "devices": a.devices,
                    "dynamic_min_vocab": a.dynamic_min_vocab, "results": rows,
                    "machine": platform.machine(), "jax": jax.__version__}))


if __name__ == "__main__":
  main()
