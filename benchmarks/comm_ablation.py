"""Communication ablation: fp32 / bf16 / int8 collectives and dedup on/off in the DLRM step.

  JAX_NUM_CPU_DEVICES=8 python benchmarks/comm_ablation.py                 # :test, mesh (2, 4)
  JAX_NUM_CPU_DEVICES=8 python benchmarks/comm_ablation.py --train_examples=800000

Each setting trains experiments/configs/dlrm_synthetic.py:<variant> from the same seeds on the
same examples and reports, per train step:
  - wire bytes per device of every collective in the compiled step's HLO
    (jaxrec.comm.accounting.collective_bytes), split into the dense all-reduce and the embedding
    exchange (all-to-all / all-gather of rows), and by mesh axis;
  - embedding rows sent per step (live requests, summed over devices, mean of a few batches):
    the HLO counts fixed-size buckets, so dedup shows here;
  - step time (training wall time / steps, after compilation);
  - test AUC on the held-out examples.
Settings: fp32 = today's step (XLA's flat psum, fp32 rows); hier = hierarchical fp32;
bf16 / int8 = hierarchical all-reduce at that precision with error feedback, bf16 / int8
rows on both embedding exchanges and uint16 row IDs where they fit (compact_ids);
*_nodedup = the same without dedup.
"""

from __future__ import annotations

import json
import os
import platform
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.configs import dlrm_synthetic  # noqa: E402
from jaxrec.comm.accounting import collective_bytes  # noqa: E402
from jaxrec.comm.spec import CommSpec  # noqa: E402
from jaxrec.distributed.mesh import make_mesh  # noqa: E402
from jaxrec.train import builders, loop, metrics  # noqa: E402
from jaxrec.train.state import place_state  # noqa: E402
from jaxrec.train.step import jit_steps  # noqa: E402

SETTINGS = {
    "fp32": dict(),
    "hier": dict(dense_allreduce="hierarchical"),
    "bf16": dict(dense_allreduce="hierarchical", dense_precision="bf16",
                 embedding_precision="bf16", embedding_forward_precision="bf16",
                 compact_ids=True),
    "int8": dict(dense_allreduce="hierarchical", dense_precision="int8",
                 embedding_precision="int8", embedding_forward_precision="int8",
                 compact_ids=True),
    "fp32_nodedup": dict(dedup=False),
    "int8_nodedup": dict(dense_allreduce="hierarchical", dense_precision="int8",
                         embedding_precision="int8", embedding_forward_precision="int8",
                         compact_ids=True, dedup=False),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "test", "dlrm_synthetic variant")
flags.DEFINE_string("mesh", "2,4", "mesh shape (2-D: host, local)")
flags.DEFINE_integer("train_examples", 400_000, "training examples per setting")
flags.DEFINE_integer("eval_examples", 50_000, "held-out examples for the AUC")
flags.DEFINE_integer("batch_size", 1024, "global batch size")
flags.DEFINE_list("settings", list(SETTINGS), f"which of {list(SETTINGS)}")
flags.DEFINE_integer("block_size", 256, "values per int8 scale in the dense all-reduce")


def _config(name):
  c = dlrm_synthetic.get_config(FLAGS.variant)
  c.mesh.shape = tuple(int(x) for x in FLAGS.mesh.split(","))
  c.data.train_examples = FLAGS.train_examples
  c.data.eval_examples = FLAGS.eval_examples
  c.data.batch_size = FLAGS.batch_size
  c.checkpoint.enabled = False
  opts = dict(SETTINGS[name])
  c.embedding.dedup = opts.pop("dedup", True)
  for k, v in opts.items():
    setattr(c.comm, k, v)
  c.comm.block_size = FLAGS.block_size
  return c


def _rows_sent(emb, state, batches):
  """Live rows each step's embedding exchange carries (summed over devices)."""
  out = []
  forward = jax.jit(emb.forward)
  for b in batches:
    _, res, _ = forward(state.emb, b["ids"], b["mask"])
    n = 0
    for s in emb.stacks:
      r = res[s.name]
      n += int((np.asarray(r["uniq"] if s.replicated else r["recv"]) < s.rows).sum())
    out.append(n)
  return float(np.mean(out))


def run(name) -> dict:
  config = _config(name)
  d = config.data
  stream, cards = loop._data_sources(config)  # pylint: disable=protected-access
  steps = int(d.train_examples // d.batch_size)
  mesh = make_mesh(config.mesh.shape, None)
  comm = CommSpec.from_config(config.comm)
  emb = builders.embedding_plan(stream.layout, cards, config.embedding,
                                config.model.embedding_dim, mesh=mesh,
                                batch_size=d.batch_size, comm=comm)
  model = builders.build_model(config.model, d.num_dense, stream.layout.num_features,
                               config.seed)
  tx = builders.dense_optimizer(config.optimizer, steps)
  graphdef, state = loop.init_state(config, emb, model, tx)
  state = place_state(state, emb)
  train_step, eval_step = jit_steps(graphdef, emb, tx, state, comm=comm)
  to_device = builders.device_batch
  put = lambda b: jax.device_put(to_device(b), emb.batch_sharding)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, put(stream.examples(0, d.batch_size))).compile()
  compile_s = time.perf_counter() - t0
  acct = collective_bytes(compiled, mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  rows = _rows_sent(emb, state, [put(stream.examples(i * d.batch_size, (i + 1) * d.batch_size))
                                 for i in range(3)])
  t0 = time.perf_counter()
  n = 0
  for b in stream.batches(d.batch_size, 0, steps * d.batch_size):
    state, m = compiled(state, put(b))
    n += 1
  jax.block_until_ready(state)
  train_s = time.perf_counter() - t0
  eval_start = int(d.get("eval_start") or d.train_examples)
  eb = int(d.eval_batch_size)
  labels, preds = loop.evaluate(eval_step, state, stream.batches(
      eb, eval_start, eval_start + (int(d.eval_examples) // eb) * eb), to_device)
  by_kind = acct["by_kind"]
  return {
      "setting": name, "bytes": acct["total"], "by_kind": by_kind, "by_axis": acct["by_axis"],
      "dense_params": n_params, "emb_rows_sent": rows, "step_ms": 1e3 * train_s / max(n, 1),
      "compile_s": compile_s, "auc": metrics.auc(labels, preds), "loss": float(m["loss"]),
      "steps": n, "collectives": len(acct["ops"]),
  }


def main(argv):
  del argv
  mesh = tuple(int(x) for x in FLAGS.mesh.split(","))
  results = []
  for name in FLAGS.settings:
    if name not in SETTINGS:
      raise app.UsageError(f"--settings: {name!r} is not one of {list(SETTINGS)}")
    r = run(name)
    results.append(r)
    print(f"{name}: {r['bytes']:,.0f} B/step, {r['step_ms']:.1f} ms/step, AUC {r['auc']:.5f} "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
  base = results[0]
  print(f"\nComm ablation — dlrm_synthetic:{FLAGS.variant}, mesh {mesh}, batch "
        f"{FLAGS.batch_size}, {results[0]['steps']} steps, {jax.device_count()} "
        f"{jax.devices()[0].platform} devices, {platform.processor() or platform.machine()}, "
        f"load {os.getloadavg()}")
  print(f"{'setting':<14}{'wire B/step':>13}{'vs ' + base['setting']:>9}{'all-reduce':>12}"
        f"{'red-scat':>10}{'all-to-all':>12}{'all-gather':>12}{'rows sent':>11}{'ms/step':>9}"
        f"{'AUC':>9}")
  for r in results:
    k = r["by_kind"]
    print(f"{r['setting']:<14}{r['bytes']:>13,.0f}{r['bytes'] / base['bytes']:>9.3f}"
          f"{k.get('all-reduce', 0):>12,.0f}{k.get('reduce-scatter', 0):>10,.0f}"
          f"{k.get('all-to-all', 0):>12,.0f}{k.get('all-gather', 0):>12,.0f}"
          f"{r['emb_rows_sent']:>11,.0f}{r['step_ms']:>9.1f}{r['auc']:>9.5f}")
  by = {r["setting"]: r for r in results}
  summary = {"variant": FLAGS.variant, "mesh": list(mesh), "batch_size": FLAGS.batch_size,
             "train_examples": FLAGS.train_examples, "load": list(os.getloadavg()),
             "results": results}
  for name, r in by.items():
    summary[f"bytes_{name}"] = r["bytes"]
    summary[f"auc_{name}"] = r["auc"]
    summary[f"step_ms_{name}"] = r["step_ms"]
  if "fp32" in by and "int8" in by:
    summary["int8_bytes_cut"] = 1 - by["int8"]["bytes"] / by["fp32"]["bytes"]
    summary["int8_auc_delta"] = by["int8"]["auc"] - by["fp32"]["auc"]
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
