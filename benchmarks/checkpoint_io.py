"""Snapshot I/O: bytes written and seconds for a full save vs incremental saves with 1% and
10% of the embedding rows touched since the previous save.

The model: ``--tables`` row-wise-sharded tables of ``--dim`` floats with row-wise Adagrad
(one accumulator a row), ``--table_gb`` GB of rows + slots in all, plus a DLRM-sized dense part
(MLPs and their Adam state). Rows are "touched" as training touches them: a random set of rows
of every table gets new values and a new accumulator (a jitted scatter on the sharded state),
and the next save is timed. Bytes are what lands on disk, per Orbax item: ``tables/`` (rows,
their slots and, in increments, their indices) and ``dense/`` (everything else). Seconds:
``blocking`` is what the training loop waits for (fingerprints, gathering changed rows,
device->host copies); ``total`` runs until the version is published.

  python benchmarks/checkpoint_io.py                     # 2 GB of tables (the issue's size)
  python benchmarks/checkpoint_io.py --table_gb=0.1      # a quick run

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

if "jax" not in sys.modules and not os.environ.get("JAX_PLATFORMS", "").startswith(("cuda", "gpu")):
  os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # fake devices: a sharded layout on CPU

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxrec.checkpoint import Checkpointer, SnapshotOptions, StackedEmbeddingLayout  # noqa: E402
from jaxrec.checkpoint import manifest  # noqa: E402
from jaxrec.distributed.mesh import make_mesh  # noqa: E402
from jaxrec.embedding.sharded import ShardedEmbedding  # noqa: E402
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec  # noqa: E402
from jaxrec.train import builders  # noqa: E402
from jaxrec.train.state import TrainState, place_state  # noqa: E402


def parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--table_gb", type=float, default=2.0, help="GB (1e9 bytes) of rows + slots")
  p.add_argument("--tables", type=int, default=8)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--fractions", default="0.01,0.1", help="touched fractions, in save order")
  p.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
  p.add_argument("--keep", action="store_true", help="keep the snapshots")
  p.add_argument("--no_restore", action="store_true", help="skip timing the chain's restore")
  return p.parse_args()


def build(args):
  mesh = make_mesh()
  opt = SparseOptimizer(name="rowwise_adagrad", learning_rate=0.01)
  row_bytes = args.dim * 4 + 4
  rows = int(args.table_gb * 1e9 / row_bytes / args.tables)
  tables = [TableSpec(name=f"t{i}", rows=rows, dim=args.dim, optimizer=opt,
                      sharding="row_wise") for i in range(args.tables)]
  features = [FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=1) for i in range(args.tables)]
  emb = ShardedEmbedding(tables, features, mesh, batch_size=8 * mesh.size)
  model = builders.build_model(ml_collections.ConfigDict(dict(
      name="dlrm", embedding_dim=args.dim, bottom_mlp=(512, 256, args.dim),
      top_mlp=(1024, 1024, 512, 256, 1))), 13, args.tables, 0)
  _, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-3)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), emb.init(0))
  return emb, place_state(state, emb), rows


def touch(emb, state, fraction, seed):
  """New values and accumulators for ``fraction`` of every sharded stack's slab rows."""
  tables, slots = dict(state.emb.tables), {k: dict(v) for k, v in state.emb.slots.items()}
  rng = np.random.default_rng(seed)
  for s in emb.stacks:
    t = tables[s.name]
    n_dev, rows = t.shape[0], t.shape[1]
    k = int(fraction * n_dev * rows)
    flat = rng.choice(n_dev * rows, k, replace=False)
    dev, row = (jnp.asarray(x, jnp.int32) for x in np.divmod(flat, rows))

    @jax.jit
    def upd(t, acc, dev, row, key):
      v = jax.random.normal(key, (dev.shape[0], t.shape[-1]), t.dtype)
      return t.at[dev, row].add(v), acc.at[dev, row].add(1.0)

    tables[s.name], slots[s.name]["acc"] = upd(t, slots[s.name]["acc"], dev, row,
                                                jax.random.key(seed))
  emb_state = type(state.emb)(tables, slots)
  return state.replace(emb=emb_state, step=state.step + 1)


def version_bytes(d, step):
  v = os.path.join(d, str(step))
  return {"tables": manifest.dir_bytes(os.path.join(v, "tables")),
          "dense": manifest.dir_bytes(os.path.join(v, "dense")), "total": manifest.dir_bytes(v)}


def main():
  args = parse()
  fractions = [float(f) for f in args.fractions.split(",")]
  root = args.workdir or tempfile.mkdtemp(prefix="jaxrec_ckpt_io_")
  d = os.path.join(root, "checkpoints")
  shutil.rmtree(d, ignore_errors=True)
  emb, state, rows = build(args)
  jax.block_until_ready(state)
  leaves = jax.tree.leaves(state)
  table_nbytes = sum(x.nbytes for x in jax.tree.leaves(state.emb))
  dense_nbytes = sum(x.nbytes for x in leaves) - table_nbytes
  print(f"model: {args.tables} tables x {rows:,} rows x {args.dim} (row-wise Adagrad), "
        f"{table_nbytes / 1e9:.2f} GB in memory (incl. slab padding) + dense "
        f"{dense_nbytes / 1e6:.1f} MB; "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh {dict(emb.mesh.shape)}")
  ck = Checkpointer(d, SnapshotOptions(save_every_steps=1, keep_latest=10, full_every=100,
                                       max_dirty_fraction=0.5),
                    layouts={"emb": StackedEmbeddingLayout(emb)})
  results = []
  for i, frac in enumerate([None] + fractions):
    if frac is not None:
      state = touch(emb, state, frac, seed=i)
      jax.block_until_ready(state)
    step = int(state.step)
    t0 = time.perf_counter()
    info = ck.save(step, state, data_position={"example": step})
    blocking = time.perf_counter() - t0
    ck.wait_until_finished()
    total = time.perf_counter() - t0
    b = version_bytes(d, step)
    results.append({"fraction": frac, "kind": info.kind, "rows": info.dirty_rows,
                    "blocking_s": blocking, "total_s": total, **b})
  full = results[0]
  print(f"\n{'save':<16}{'rows written':>14}{'tables':>12}{'vs full':>9}{'goal':>8}"
        f"{'dense':>11}{'total':>12}{'blocking':>10}{'total s':>9}")
  for r in results:
    name = "full" if r["fraction"] is None else f"incr {r['fraction'] * 100:g}%"
    ratio = r["tables"] / full["tables"]
    goal = "" if r["fraction"] is None else f"{1.2 * r['fraction']:.3f}"
    print(f"{name:<16}{r['rows']:>14,}{r['tables'] / 1e6:>10.1f}MB{ratio:>9.4f}{goal:>8}"
          f"{r['dense'] / 1e6:>9.1f}MB{r['total'] / 1e6:>10.1f}MB{r['blocking_s']:>9.2f}s"
          f"{r['total_s']:>8.2f}s")
  restore_s = None
  if not args.no_restore:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    want = np.asarray(state.emb.tables[emb.stacks[0].name][0, :4])
    del state  # room for the restored copy
    t0 = time.perf_counter()
    state = ck.restore(abstract).state
    jax.block_until_ready(state)
    restore_s = time.perf_counter() - t0
    np.testing.assert_array_equal(np.asarray(state.emb.tables[emb.stacks[0].name][0, :4]), want)
    print(f"\nrestore of the chain (full + {len(fractions)} increments): {restore_s:.2f}s")
  # The first full save paid for compiles; a second one shows the steady state.
  state = state.replace(step=state.step + 1)
  t0 = time.perf_counter()
  ck.save(int(state.step), state, data_position={"example": 0}, full=True)
  warm_blocking = time.perf_counter() - t0
  ck.wait_until_finished()
  warm_total = time.perf_counter() - t0
  print(f"full save again (compiled): {warm_blocking:.2f}s blocking, {warm_total:.2f}s total")
  out = {"benchmark": "checkpoint_io", "table_gb": args.table_gb, "tables": args.tables,
         "dim": args.dim, "rows_per_table": rows, "devices": jax.device_count(),
         "platform": jax.devices()[0].platform, "machine": platform.processor() or
         platform.machine(), "cpus": os.cpu_count(),
         "full_table_bytes": full["tables"], "full_dense_bytes": full["dense"],
         "full_bytes": full["total"], "full_blocking_s": full["blocking_s"],
         "full_total_s": full["total_s"], "full_warm_blocking_s": warm_blocking,
         "full_warm_total_s": warm_total, "restore_chain_s": restore_s}
  for r in results[1:]:
    tag = f"{r['fraction'] * 100:g}pct"
    out.update({f"incremental_table_bytes_{tag}": r["tables"],
                f"incremental_dense_bytes_{tag}": r["dense"],
                f"incremental_bytes_{tag}": r["total"],
                f"incremental_rows_{tag}": r["rows"],
                f"incremental_table_ratio_{tag}": r["tables"] / full["tables"],
                f"incremental_blocking_s_{tag}": r["blocking_s"],
                f"incremental_total_s_{tag}": r["total_s"]})
  if not args.keep and not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
