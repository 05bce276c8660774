"""Embedding lookup throughput: the sharded engine vs the naive path, same inputs, same run.

One step = forward (lookup + pooling) + backward + row-wise optimizer update, for
``features`` one-hot features of ``batch`` examples, each reading its own table of ``rows`` x
``dim`` (float32, row-wise Adagrad). Figures are looked-up rows (IDs) per second.

  engine: ShardedEmbedding.lookup (custom_vjp over shard_map: dedup, route, gather, pool;
          backward: segment-sum per unique row, fused row-wise Adagrad on touched rows).
  naive:  what one writes first: ``jnp.take`` of global rows, the dense gradient built with
          ``.at[rows].add`` into a [rows, dim] buffer, and a dense-style row-wise Adagrad over
          every row. Looped over tables (``fori_loop``) so one table's dense gradient is live
          at a time; on n devices the tables are row-sharded and GSPMD partitions it.

IDs are Zipf(1.05)-ranked or uniform over each table. Default run (the CPU goal):

  python benchmarks/embedding_lookup.py            # 26 x 4096, dim 64, 10^6 rows per table

GPU (report rows/s and fraction of measured copy bandwidth):

  python benchmarks/embedding_lookup.py --batch=16384 --dim=128 --devices=1

The last line printed is one JSON object (engine_rows_per_s / naive_rows_per_s are those of
the first configuration: 1 device, Zipf).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "jax" not in sys.modules and not os.environ.get("JAX_PLATFORMS", "").startswith(("cuda", "gpu")):
  os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # fake devices for the n-device runs (CPU)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxrec import hugepages  # noqa: E402
from jaxrec.distributed.mesh import make_mesh  # noqa: E402
from jaxrec.embedding import routing  # noqa: E402
from jaxrec.embedding.sharded import ShardedEmbedding  # noqa: E402
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec  # noqa: E402

LR, EPS = 0.01, 1e-8


def parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--features", type=int, default=26)
  p.add_argument("--batch", type=int, default=4096)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--rows", type=int, default=1_000_000)
  p.add_argument("--devices", default="1,8", help="comma-separated device counts")
  p.add_argument("--dists", default="zipf,uniform")
  p.add_argument("--steps", type=int, default=5, help="timed engine steps per configuration")
  p.add_argument("--naive_steps", type=int, default=2, help="timed naive steps (they are slow)")
  p.add_argument("--sharding", default=None, help="override every table's sharding type")
  p.add_argument("--capacity_factor", type=float, default=None)
  p.add_argument("--skip_naive", action="store_true")
  p.add_argument("--copy_bandwidth", action="store_true",
                 help="also measure device copy bandwidth and plain jnp.take gather rate")
  p.add_argument("--huge_pages", action=argparse.BooleanOptionalAction, default=True,
                 help="restart with glibc's THP tunable where THP is madvise-only "
                      "(jaxrec/hugepages.py); --no-huge_pages keeps 4 KiB pages")
  return p.parse_args()


def make_ids(dist: str, rng, batch: int, features: int, rows: int) -> np.ndarray:
  """[batch, features] uint64 IDs; the rank -> ID map is a fixed odd multiply (a bijection)."""
  if dist == "zipf":
    s = 1.05
    u = rng.random((batch, features))
    a = 1.0 - s
    ranks = np.floor((1.0 + u * ((rows + 1.0) ** a - 1.0)) ** (1.0 / a)).astype(np.int64) - 1
    ranks = np.clip(ranks, 0, rows - 1).astype(np.uint64)
  elif dist == "uniform":
    ranks = rng.integers(0, rows, (batch, features)).astype(np.uint64)
  else:
    raise ValueError(f"--dists: unknown distribution {dist!r} (zipf, uniform)")
  return ranks * np.uint64(0x9E3779B97F4A7C15) + np.uint64(12345)


def timed(fn, state, inputs, steps: int, warmup: int = 1):
  """Seconds per step (median of steps), cycling through ``inputs``; returns (sec, state)."""
  for i in range(warmup):
    state = fn(state, *inputs[i % len(inputs)])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state = fn(state, *inputs[(i + warmup) % len(inputs)])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), state


def engine_run(args, mesh, batches):
  opt = SparseOptimizer("rowwise_adagrad", learning_rate=LR, eps=EPS)
  tables = [TableSpec(f"t{i}", args.rows, args.dim, opt, sharding=args.sharding)
            for i in range(args.features)]
  features = [FeatureSpec(f"f{i}", f"t{i}") for i in range(args.features)]
  emb = ShardedEmbedding(tables, features, mesh, batch_size=args.batch,
                         capacity_factor=args.capacity_factor)
  state = emb.init(0)
  ct = jax.device_put(jnp.ones((args.batch, args.dim), jnp.float32) / args.batch,
                      emb.batch_sharding)

  def step(state, ids, mask):
    def loss(st):
      feats, stats = emb.lookup(st, ids, mask, 1)
      return sum(jnp.sum(f * ct) for f in feats), stats
    (_, stats), new = jax.value_and_grad(loss, has_aux=True)(state)
    return new

  fn = jax.jit(step, donate_argnums=0)
  inputs = [(jax.device_put(u, emb.batch_sharding), jax.device_put(m, emb.batch_sharding))
            for u, m in batches]
  mem = fn.lower(state, *inputs[0]).compile().memory_analysis()
  sec, state = timed(fn, state, inputs, args.steps)
  kinds = sorted({p.kind for p in emb.plan.placements})
  del state
  return sec, kinds, mem


def naive_run(args, mesh, batches):
  t, r, d = args.features, args.rows, args.dim
  axes = tuple(mesh.axis_names)
  tsh = NamedSharding(mesh, P(None, axes, None))
  ash = NamedSharding(mesh, P(None, axes))
  bsh = NamedSharding(mesh, P(axes))
  # Elementwise in iota (one fused loop): no temporaries the size of the tables.
  table = jax.jit(lambda: ((jax.lax.broadcasted_iota(jnp.uint32, (t, r, d), 1)
                            * jnp.uint32(0x9E3779B1) >> 8).astype(jnp.float32) / 2**24 - 0.5)
                  * 0.002, out_shardings=tsh)()
  acc = jax.jit(lambda: jnp.zeros((t, r), jnp.float32), out_shardings=ash)()
  ct = jnp.ones((args.batch, d), jnp.float32) / args.batch

  salts = jnp.asarray([routing.table_salt(f"t{i}") for i in range(t)], jnp.uint32)

  def step(state, ids, mask):
    table, acc = state
    rows = (routing.hash_u64_pair(ids, salts) % jnp.uint32(r)).astype(jnp.int32)  # as the engine

    def one_table(i, carry):
      table, acc = carry
      w = table[i]
      emb = jnp.take(w, rows[:, i], axis=0) * mask[:, i, None]          # forward
      g = ct * mask[:, i, None]                                          # d loss / d emb
      dense_g = jnp.zeros_like(w).at[rows[:, i]].add(g)                  # dense gradient
      a = acc[i] + jnp.mean(dense_g * dense_g, axis=-1)                  # dense-style update
      w = w - LR * dense_g / (jnp.sqrt(a)[:, None] + EPS)
      del emb
      return table.at[i].set(w), acc.at[i].set(a)

    return jax.lax.fori_loop(0, t, one_table, (table, acc))

  fn = jax.jit(step, donate_argnums=0, in_shardings=((tsh, ash), bsh, bsh),
               out_shardings=(tsh, ash))
  inputs = [(jax.device_put(ids, bsh), jax.device_put(mask, bsh)) for ids, mask in batches]
  mem = fn.lower((table, acc), *inputs[0]).compile().memory_analysis()
  sec, state = timed(fn, (table, acc), inputs, args.naive_steps)
  del state
  return sec, mem


def copy_and_gather(args):
  """Device copy bandwidth (bytes read + written per second) and plain jnp.take rows/s."""
  n = 1 << 28 if jax.devices()[0].platform != "cpu" else 1 << 26
  x = jnp.ones((n,), jnp.float32)
  copy = jax.jit(lambda x: x * 1.0000001)
  sec, _ = timed(lambda s: copy(s), x, [()], 10)
  bw = 2 * n * 4 / sec
  table = jnp.ones((args.features * args.rows, args.dim), jnp.float32)
  rng = np.random.default_rng(0)
  ids = make_ids("zipf", rng, args.batch, args.features, args.rows) % np.uint64(table.shape[0])
  rows = jnp.asarray(ids.astype(np.int32))
  gather = jax.jit(lambda tb, r: jnp.take(tb, r, axis=0))
  gather(table, rows).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(10):
    out = gather(table, rows)
  out.block_until_ready()
  take_rate = rows.size * 10 / (time.perf_counter() - t0)
  return bw, take_rate


def main():
  args = parse()
  hugepages.reexec_with_huge_pages(args.huge_pages)
  lookups = args.batch * args.features
  dev0 = jax.devices()[0]
  print(f"device: {dev0.platform} {dev0.device_kind} x{jax.device_count()}; {args.features} "
        f"features x batch {args.batch:,} ({lookups:,} lookups/step), dim {args.dim}, "
        f"{args.rows:,} rows per table, row-wise Adagrad", flush=True)
  results = []
  rng = np.random.default_rng(0)
  for n in [int(x) for x in args.devices.split(",")]:
    if n > jax.device_count():
      print(f"skip {n} devices: only {jax.device_count()} visible")
      continue
    mesh = make_mesh((n,))
    for dist in args.dists.split(","):
      batches = []
      for _ in range(3):
        ids = make_ids(dist, rng, args.batch, args.features, args.rows)
        batches.append((ids.view(np.uint32).reshape(args.batch, args.features, 2),
                        np.ones((args.batch, args.features), bool)))
      uniq = np.mean([len(np.unique(b[0].reshape(-1, 2), axis=0)) for b in batches[:1]])
      sec, kinds, mem = engine_run(args, mesh, batches)
      row = {"devices": n, "dist": dist, "engine_s": sec, "engine_rows_per_s": lookups / sec,
             "engine_temp_mib": mem.temp_size_in_bytes / 2**20 if mem else None,
             "plan": kinds, "unique_frac": float(uniq / lookups)}
      if not args.skip_naive:
        nsec, nmem = naive_run(args, mesh, batches)
        row.update(naive_s=nsec, naive_rows_per_s=lookups / nsec,
                   naive_temp_mib=nmem.temp_size_in_bytes / 2**20 if nmem else None,
                   speedup=nsec / sec)
      results.append(row)
      print(f"  {n} dev {dist:>7}: engine {row['engine_rows_per_s'] / 1e6:8.2f} M rows/s "
            f"({sec * 1e3:7.1f} ms/step, plan {','.join(kinds)}, "
            f"{row['unique_frac']:.0%} unique IDs)" +
            (f" | naive {row['naive_rows_per_s'] / 1e6:8.3f} M rows/s ({nsec * 1e3:8.1f} "
             f"ms/step) | {row['speedup']:.1f}x" if "naive_s" in row else ""), flush=True)
  summary = {"benchmark": "embedding_lookup", "device": f"{dev0.platform}:{dev0.device_kind}",
             "features": args.features, "batch": args.batch, "dim": args.dim,
             "rows": args.rows, "results": results}
  if results:
    summary["engine_rows_per_s"] = results[0]["engine_rows_per_s"]
    summary["naive_rows_per_s"] = results[0].get("naive_rows_per_s")
    summary["speedup"] = results[0].get("speedup")
  if args.copy_bandwidth:
    bw, take_rate = copy_and_gather(args)
    row_bytes = args.dim * 4
    # Fwd + bwd + update touch >= 5 row-sized blocks per lookup (gather read + pooled write,
    # gradient read, row read + write); copy bandwidth counts bytes read + written.
    summary.update(copy_bandwidth_bytes_per_s=bw, take_rows_per_s=take_rate,
                   engine_fraction_of_copy_bw=summary["engine_rows_per_s"] * 5 * row_bytes / bw)
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s; plain jnp.take {take_rate / 1e6:,.0f} M rows/s; "
          f"engine = {summary['engine_fraction_of_copy_bw']:.1%} of copy bandwidth "
          "(5 row transfers per lookup)")
  summary["huge_pages"] = hugepages.active()
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
