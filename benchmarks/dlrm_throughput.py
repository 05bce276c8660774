"""DLRM training throughput (samples/s) of jaxrec's train step, optionally beside TorchRec.

  python benchmarks/dlrm_throughput.py                              # CPU acceptance config
  python benchmarks/dlrm_throughput.py --optimizer=adagrad
  python benchmarks/dlrm_throughput.py --torchrec_python=/work/torchrec-venv/bin/python
  python benchmarks/dlrm_throughput.py --torchrec_python=... --torchrec_both  # stock + tuned
  python benchmarks/dlrm_throughput.py --preset=kaggle_gpu          # on a GPU
  python benchmarks/dlrm_throughput.py --nohuge_pages               # 4 KiB pages for both

Data is generated (uniform or Zipf IDs, log-normal dense features) before timing and cycled;
each of --windows timed windows runs --steps_per_window full train steps (forward, backward,
dense optax update, sparse row-wise update) after --warmup steps; the median window is
reported. With --torchrec_python, benchmarks/torchrec_dlrm.py runs in that interpreter on the
same configuration right after, and the ratio is reported (TorchRec is never a dependency).

Like experiments/train.py, the benchmark first restarts itself with glibc's transparent-huge-page
tunable where the kernel gives huge pages only on request (jaxrec/hugepages.py); TorchRec's
process inherits the same environment, so both frameworks run with the same pages. The JSON's
``huge_pages`` says which it was.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

_PRESETS = {
    # Criteo-Kaggle-sized tables (capped at 4M rows), MLPerf-like DLRM on one GPU.
    "kaggle_gpu": dict(batch_size=16384, embedding_dim=128, bottom_mlp="512,256,128",
                       top_mlp="1024,1024,512,256,1", optimizer="adagrad", rows_per_table=0,
                       max_rows=4_000_000),
}

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 2048, "global batch size")
flags.DEFINE_integer("embedding_dim", 64, "embedding dim")
flags.DEFINE_integer("num_tables", 26, "number of one-hot sparse features/tables")
flags.DEFINE_integer("rows_per_table", 100_000, "rows per table; 0 = Criteo-Kaggle sizes")
flags.DEFINE_integer("max_rows", 4_000_000, "cap on rows per table when rows_per_table=0")
flags.DEFINE_string("bottom_mlp", "512,256,64", "bottom MLP sizes")
flags.DEFINE_string("top_mlp", "512,256,1", "top MLP sizes")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adagrad"],
                  "sgd: SGD everywhere; adagrad: row-wise Adagrad tables + Adagrad dense")
flags.DEFINE_float("learning_rate", 0.01, "learning rate (both parts)")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "MLP/interaction dtype")
flags.DEFINE_enum("ids", "uniform", ["uniform", "zipf"], "ID distribution")
flags.DEFINE_integer("warmup", 5, "untimed steps after compilation")
flags.DEFINE_integer("steps_per_window", 10, "steps per timed window")
flags.DEFINE_integer("windows", 5, "timed windows (the median is reported)")
flags.DEFINE_string("preset", None, f"named configuration: {sorted(_PRESETS)}")
flags.DEFINE_string("torchrec_python", None,
                    "python of a venv with TorchRec: also run benchmarks/torchrec_dlrm.py")
flags.DEFINE_integer("torch_threads", 0, "threads for TorchRec (0: all cores)")
flags.DEFINE_bool("torchrec_malloc_tuning", False,
                  "pass --malloc_tuning to TorchRec (glibc thresholds: its strongest CPU setting)")
flags.DEFINE_bool("huge_pages", True,
                  "restart with glibc's THP tunable (both frameworks) where THP is madvise-only")
flags.DEFINE_bool("torchrec_both", False,
                  "run TorchRec twice, stock and with --malloc_tuning, and compare with both")


def _ints(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


def run_jaxrec(cfg: dict) -> dict:
  import jax
  import numpy as np
  import ml_collections

  from jaxrec.data import synthetic
  from jaxrec.data.batch import Batch
  from jaxrec.train import builders, loop
  from jaxrec.train.step import make_train_step

  n_tab, b, dim = cfg["num_tables"], cfg["batch_size"], cfg["embedding_dim"]
  if cfg["rows_per_table"]:
    rows = [cfg["rows_per_table"]] * n_tab
  else:
    rows = [min(c, cfg["max_rows"]) for c in synthetic.CRITEO_KAGGLE_CARDINALITIES[:n_tab]]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(name="dlrm", embedding_dim=dim, bottom_mlp=_ints(cfg["bottom_mlp"]),
                 top_mlp=_ints(cfg["top_mlp"]), compute_dtype=cfg["compute_dtype"])
  sparse_opt = "sgd" if cfg["optimizer"] == "sgd" else "rowwise_adagrad"
  c.embedding = dict(optimizer=sparse_opt, learning_rate=cfg["learning_rate"], max_rows=max(rows),
                     rows_factor=1.0, min_rows=1, pooling="sum")
  c.optimizer = dict(name=cfg["optimizer"], learning_rate=cfg["learning_rate"], warmup_steps=0,
                     decay="constant")
  c = ml_collections.ConfigDict(c)
  layout = synthetic.SyntheticConfig(cardinalities=tuple(rows)).layout
  emb = builders.embedding_plan(layout, rows, c.embedding, dim)
  model = builders.build_model(c.model, 13, n_tab, 0)
  tx = builders.dense_optimizer(c.optimizer, 1000)
  graphdef, state = loop.init_state(c, emb, model, tx)
  step = jax.jit(make_train_step(graphdef, emb, tx), donate_argnums=0)

  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):
    if cfg["ids"] == "zipf":
      ids = np.stack([rng.zipf(1.1, b) % r for r in rows], 1).astype(np.uint64)
    else:
      ids = np.stack([rng.integers(0, r, b) for r in rows], 1).astype(np.uint64)
    hb = Batch(np.log1p(rng.lognormal(1.0, 1.0, (b, 13))).astype(np.float32), ids,
               np.ones((b, n_tab), bool), (rng.random(b) < 0.25).astype(np.float32))
    batches.append(jax.device_put(builders.device_batch(hb)))

  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  for i in range(cfg["warmup"]):
    state, m = compiled(state, batches[i % 4])
  jax.block_until_ready(state)
  windows = []
  for w in range(cfg["windows"]):
    t = time.perf_counter()
    for i in range(cfg["steps_per_window"]):
      state, m = compiled(state, batches[i % 4])
    jax.block_until_ready(state)
    windows.append(b * cfg["steps_per_window"] / (time.perf_counter() - t))
  loss = float(m["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"benchmark loss is {loss}")
  return {"framework": "jaxrec", "samples_per_s": float(np.median(windows)),
          "window_samples_per_s": windows, "compile_s": compile_s,
          "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
          "jax": jax.__version__, "table_rows": rows, "last_loss": loss}


def run_torchrec(cfg: dict, malloc_tuning: bool) -> dict:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrec_dlrm.py")
  args = [FLAGS.torchrec_python, script, f"--batch_size={cfg['batch_size']}",
          f"--embedding_dim={cfg['embedding_dim']}", f"--num_tables={cfg['num_tables']}",
          f"--rows_per_table={cfg['rows_per_table']}", f"--bottom_mlp={cfg['bottom_mlp']}",
          f"--top_mlp={cfg['top_mlp']}", f"--optimizer={cfg['optimizer']}",
          f"--lr={cfg['learning_rate']}", f"--warmup_steps={cfg['warmup']}",
          f"--steps_per_window={cfg['steps_per_window']}", f"--windows={cfg['windows']}"]
  if FLAGS.torch_threads:
    args.append(f"--threads={FLAGS.torch_threads}")
  if malloc_tuning:
    args.append("--malloc_tuning")
  out = subprocess.run(args, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"torchrec_dlrm.py failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  from jaxrec import hugepages
  hugepages.reexec_with_huge_pages(FLAGS.huge_pages)
  cfg = {k: getattr(FLAGS, k) for k in (
      "batch_size", "embedding_dim", "num_tables", "rows_per_table", "max_rows", "bottom_mlp",
      "top_mlp", "optimizer", "learning_rate", "compute_dtype", "ids", "warmup",
      "steps_per_window", "windows")}
  if FLAGS.preset:
    if FLAGS.preset not in _PRESETS:
      raise app.UsageError(f"--preset={FLAGS.preset}: known presets are {sorted(_PRESETS)}")
    for k, v in _PRESETS[FLAGS.preset].items():
      if not FLAGS[k].present:
        cfg[k] = v
  huge = hugepages.active()
  results = [run_jaxrec(cfg)]
  if FLAGS.torchrec_python:
    if cfg["compute_dtype"] != "float32" or not cfg["rows_per_table"]:
      print("note: TorchRec runs fp32 with rows_per_table tables", file=sys.stderr)
    tunings = [False, True] if FLAGS.torchrec_both else [FLAGS.torchrec_malloc_tuning]
    for tuned in tunings:
      r = run_torchrec(cfg, tuned)
      r["framework"] = "torchrec+malloc" if tuned else "torchrec"
      results.append(r)
  print(f"\nDLRM training throughput — batch {cfg['batch_size']}, dim {cfg['embedding_dim']}, "
        f"{cfg['num_tables']} tables, MLPs {cfg['bottom_mlp']} / {cfg['top_mlp']}, "
        f"optimizer {cfg['optimizer']}, {cfg['compute_dtype']}, "
        f"{platform.processor() or platform.machine()}, huge pages {'on' if huge else 'off'}")
  print(f"{'framework':<16} {'samples/s (median)':>20} {'windows':>40}")
  for r in results:
    ws = ", ".join(f"{w:,.0f}" for w in r["window_samples_per_s"])
    print(f"{r['framework']:<16} {r['samples_per_s']:>20,.0f}   [{ws}]")
  summary = dict(cfg, samples_per_s=results[0]["samples_per_s"],
                 window_samples_per_s=results[0]["window_samples_per_s"],
                 device=results[0]["device"], num_devices=results[0]["num_devices"],
                 compile_s=results[0]["compile_s"], huge_pages=huge)
  for r in results[1:]:
    key = r["framework"].replace("+", "_")
    summary[f"{key}_samples_per_s"] = r["samples_per_s"]
    summary[f"speedup_vs_{key}"] = results[0]["samples_per_s"] / r["samples_per_s"]
    print(f"jaxrec / {r['framework']} = {summary[f'speedup_vs_{key}']:.2f}x")
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
