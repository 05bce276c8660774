"""How fast is the jnp device hash table next to a Python dict and grow-by-concatenation?

Workload per (capacity, load factor): a table pre-filled to the load factor with random 64-bit
IDs, then batches of --batch queries: ~90% present IDs drawn Zipf(--zipf) over a random order
of the present ones, the rest new random IDs (fewer when the table lacks room for them; the
printed table gives the real fraction). Measured, keys/s, median of --reps timed calls after
--warmup untimed ones (compile excluded), every call on a fresh copy of the same pre-filled
state (copies, and freeing every method's results, are not timed):

  find             jnp, ID -> row only (read-only)
  find_or_insert   jnp, the ID -> row mapping alone, inserting the new IDs: a table with no
                   value rows (dim 0), frequency and last-seen metadata kept as by default
  f_or_i dim       the same on the dim-wide table: new rows' initial values written too
  +gather          that followed by the dim-wide value gather of every query's row
  dict             Python dict ID -> row, inserting new IDs (setdefault-style loop)
  concat           dict + new rows concatenated onto a numpy table each batch + np.take
  probe            mean buckets visited per hit; rej: keys rejected for lack of room

The dict is the mapping-alone baseline of find_or_insert (and of f_or_i dim, which does more),
the concatenation that of +gather. The JSON also holds process CPU seconds (all threads) of
find_or_insert, +gather, dict and concat and their ratios: on a shared, loaded machine wall
time gives the 2-thread jax calls a larger share of the cores than the 1-thread Python
baselines, so compare the CPU ratios too. ``call_ms`` lists every timed call's milliseconds:
this shared machine stalls some calls by 100+ ms of system time, mostly on the dim-wide table;
the medians are the figures.

Like the other launchers, the benchmark first restarts itself under
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 where THP is madvise-only (jaxrec/hugepages.py): glibc
then asks for transparent huge pages on its large chunks, which hold XLA:CPU's buffers (and the
baselines' dict and arrays). That roughly halves the random row gathers and scatters of a 2 GiB
table (TLB misses); it is a process setting, not table code. --no-huge_pages keeps 4 KiB pages.

Run: PYTHONPATH=. python benchmarks/hash_table.py [--quick] [--no-huge_pages]
       [--capacities=17,20,23] [--load_factors=0.5,0.9]
The last line printed is one JSON object; its headline figures are at load factor 0.5, the
largest capacity, and the given batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import hugepages as hugepages_lib
from jaxrec.embedding import hash_table as ht


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--capacities", default="17,18,19,20,21,22,23",
                 help="comma-separated log2 capacities")
  p.add_argument("--load_factors", default="0.5,0.9")
  p.add_argument("--batch", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--new_fraction", type=float, default=0.1)
  p.add_argument("--zipf", type=float, default=1.1)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--dict_reps", type=int, default=3)
  p.add_argument("--skip_baselines", action="store_true")
  p.add_argument("--huge_pages", action=argparse.BooleanOptionalAction, default=True,
                 help="restart under glibc.malloc.hugetlb=1 where THP is madvise-only (see the "
                      "docstring); --no-huge_pages keeps 4 KiB pages")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: capacities 2^14,2^16, batch 2^15, 2 reps")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  if a.quick:
    a.capacities, a.batch, a.reps, a.dict_reps = "14,16", 1 << 15, 2, 1
  return a


def _random_ids(rng, n, exclude=None):
  ids = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
  ids = np.unique(ids)
  if exclude is not None:
    ids = ids[~np.isin(ids, exclude)]
  rng.shuffle(ids)
  return ids


def _workload(rng, capacity, lf, batch, new_fraction, zipf, n_batches):
  n_present = int(capacity * lf)
  present = _random_ids(rng, n_present + 16)[:n_present]
  free = capacity - n_present
  n_new = int(min(new_fraction * batch, max(free // 2, 0)))
  perm = rng.permutation(n_present)
  batches = []
  for _ in range(n_batches):
    z = (rng.zipf(zipf, size=batch - n_new) - 1) % n_present
    q = present[perm[z]]
    new = _random_ids(rng, n_new + 16, exclude=present)[:n_new]
    q = np.concatenate([q, new])
    rng.shuffle(q)
    batches.append(q)
  return present, batches, n_new / batch


def _time(fn, args_fn, reps, warmup, calls=None):
  """Median wall seconds and median process CPU seconds (all threads) of the timed calls;
  each call's wall milliseconds are appended to ``calls`` when given.

  The result is freed after the clock stops: dropping the returned copy of a 2 GiB table
  costs ~70 ms of munmap here, which a training loop (that keeps its state) never pays.
  """
  ts, cs = [], []
  for r in range(warmup + reps):
    args = jax.block_until_ready(args_fn(r))
    t0, c0 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    del out, args
    if r >= warmup:
      ts.append(dt)
      cs.append(dc)
  if calls is not None:
    calls.extend(round(1000 * t, 1) for t in ts)
  return float(np.median(ts)), float(np.median(cs))


def _fill(spec, present, batch):
  f = jax.jit(ht.find_or_insert, static_argnums=0, donate_argnums=1)
  st = ht.init(spec)
  for i in range(0, len(present), batch):
    chunk = ht.keys_to_pairs(present[i:i + batch])
    st, rows, stats = f(spec, st, jnp.asarray(chunk), 0)
    if int(stats.rejected):
      raise RuntimeError(f"prefill rejected {int(stats.rejected)} keys")
  return st


def _dict_lookup(d, keys):
  """ID -> row, inserting new IDs at the next row: the plain-Python baseline."""
  get = d.get
  out = []
  app = out.append
  n = len(d)
  for k in keys.tolist():
    r = get(k)
    if r is None:
      r = d[k] = n
      n += 1
    app(r)
  return np.asarray(out, np.int64)


def _concat_lookup(d, table, keys, dim, rng):
  """dict + growing numpy table: new rows concatenated each batch, then gathered."""
  n0 = len(d)
  rows = _dict_lookup(d, keys)
  n_new = len(d) - n0
  if n_new:
    table = np.concatenate([table, rng.uniform(-0.05, 0.05, (n_new, dim)).astype(np.float32)])
  return table, table.take(rows, axis=0)


def main():
  a = _parse()
  hugepages_lib.reexec_with_huge_pages(a.huge_pages)
  hugepages = hugepages_lib.active()
  rng = np.random.default_rng(a.seed)
  caps = [1 << int(c) for c in a.capacities.split(",")]
  lfs = [float(x) for x in a.load_factors.split(",")]
  n_batches = a.warmup + a.reps
  print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{platform.processor() or platform.machine()}; batch {a.batch}, dim {a.dim}, "
        f"zipf {a.zipf}; keys/s, median of {a.reps} (dict/concat: {a.dict_reps}); "
        f"malloc huge pages {'on' if hugepages else 'off'} (THP {hugepages_lib.thp_mode()})")
  hdr = (f"{'capacity':>9} {'lf':>4} {'new%':>5} {'find':>9} {'f_or_i':>9} {'f_or_i dim':>10} "
         f"{'f_or_i+g':>9} {'find+g':>9} {'dict':>9} {'concat':>9} {'probe':>6} {'rej':>7}")
  print(hdr)
  results = []
  for cap in caps:
    for lf in lfs:
      present, batches, new_frac = _workload(rng, cap, lf, a.batch, a.new_fraction, a.zipf,
                                             n_batches)
      spec = ht.HashTableSpec(name=f"bench_{cap}", capacity=cap, dim=a.dim)
      base = _fill(spec, present, a.batch)
      qs = [jnp.asarray(ht.keys_to_pairs(b)) for b in batches]

      def fresh(r):
        return jax.tree.map(jnp.copy, base), qs[r]

      # Return the new state, as a train step does: a donated table that is not an output
      # cannot be updated in place, and XLA then copies it.
      foi = jax.jit(lambda st, q: ht.find_or_insert(spec, st, q, 1), donate_argnums=0)
      # The mapping alone: the same keys and metadata, no value rows.
      spec0 = dataclasses.replace(spec, dim=0)
      foi0 = jax.jit(lambda st, q: ht.find_or_insert(spec0, st, q, 1), donate_argnums=0)

      def fresh0(r):
        st = jax.tree.map(jnp.copy, dataclasses.replace(base, values=base.values[:, :0]))
        return st, qs[r]

      def foi_g(st, q):
        st, rows, stats = ht.find_or_insert(spec, st, q, 1)
        return st, rows, ht.gather_values(st, rows), stats
      foi_g = jax.jit(foi_g, donate_argnums=0)
      fnd = jax.jit(lambda st, q: ht.find(spec, st, q))

      def fnd_g(st, q):
        rows, stats = ht.find(spec, st, q)
        return rows, ht.gather_values(st, rows)
      fnd_g = jax.jit(fnd_g)
      calls = {"find_or_insert": [], "find_or_insert_dim": [], "find_or_insert_gather": []}
      t_foi0, c_foi0 = _time(foi0, fresh0, a.reps, a.warmup, calls["find_or_insert"])
      t_foi, c_foi = _time(foi, fresh, a.reps, a.warmup, calls["find_or_insert_dim"])
      t_foig, c_foig = _time(foi_g, fresh, a.reps, a.warmup, calls["find_or_insert_gather"])
      t_find, _ = _time(fnd, lambda r: (base, qs[r]), a.reps, a.warmup)
      t_findg, _ = _time(fnd_g, lambda r: (base, qs[r]), a.reps, a.warmup)
      _, _, stats = foi(*fresh(0))
      rej = int(stats.rejected)
      r = {"capacity": cap, "load_factor": lf, "new_fraction": new_frac,
           "find_keys_per_s": a.batch / t_find, "find_or_insert_keys_per_s": a.batch / t_foi0,
           "find_or_insert_dim_keys_per_s": a.batch / t_foi,
           "find_or_insert_gather_keys_per_s": a.batch / t_foig,
           "find_gather_keys_per_s": a.batch / t_findg, "rejected": rej,
           "find_or_insert_cpu_s": c_foi0, "find_or_insert_dim_cpu_s": c_foi,
           "find_or_insert_gather_cpu_s": c_foig,
           "probe_mean": float(stats.probe_mean), "call_ms": calls}
      del base
      if not a.skip_baselines:
        d0 = dict(zip(present.tolist(), range(len(present))))
        t, c = [], []
        for i in range(a.dict_reps):
          d = dict(d0)
          t0, c0 = time.perf_counter(), time.process_time()
          out = _dict_lookup(d, batches[a.warmup + i])
          t.append(time.perf_counter() - t0)
          c.append(time.process_time() - c0)
          del out
        r["dict_keys_per_s"] = a.batch / float(np.median(t))
        r["dict_cpu_s"] = float(np.median(c))
        table0 = rng.uniform(-0.05, 0.05, (len(present), a.dim)).astype(np.float32)
        t, c = [], []
        for i in range(a.dict_reps):
          d = dict(d0)
          t0, c0 = time.perf_counter(), time.process_time()
          out = _concat_lookup(d, table0, batches[a.warmup + i], a.dim, rng)
          t.append(time.perf_counter() - t0)
          c.append(time.process_time() - c0)
          del out
        r["concat_keys_per_s"] = a.batch / float(np.median(t))
        r["concat_cpu_s"] = float(np.median(c))
        del d0, d, table0
      results.append(r)
      f = lambda k: f"{r[k] / 1e6:8.2f}M" if k in r else f"{'-':>9}"
      print(f"{cap:>9} {lf:>4} {100 * new_frac:5.1f} {f('find_keys_per_s')} "
            f"{f('find_or_insert_keys_per_s')} {f('find_or_insert_dim_keys_per_s'):>10} "
            f"{f('find_or_insert_gather_keys_per_s')} "
            f"{f('find_gather_keys_per_s')} {f('dict_keys_per_s')} {f('concat_keys_per_s')} "
            f"{r['probe_mean']:6.2f} {rej:>7}", flush=True)
  head = [r for r in results if r["load_factor"] == 0.5 and r["capacity"] == max(caps)]
  head = head[0] if head else results[-1]
  out = {"benchmark": "hash_table", "device": jax.devices()[0].device_kind,
         "backend": jax.default_backend(), "batch": a.batch, "dim": a.dim,
         "capacity": head["capacity"], "load_factor": head["load_factor"],
         "huge_pages": hugepages, "thp": hugepages_lib.thp_mode()}
  for k in ("find_or_insert_keys_per_s", "find_keys_per_s", "find_or_insert_dim_keys_per_s",
            "find_or_insert_gather_keys_per_s", "dict_keys_per_s", "concat_keys_per_s"):
    if k in head:
      out[k] = round(head[k])
  if "dict_keys_per_s" in head:
    out["speedup_vs_dict"] = round(head["find_or_insert_keys_per_s"] / head["dict_keys_per_s"], 2)
    out["dim_speedup_vs_dict"] = round(
        head["find_or_insert_dim_keys_per_s"] / head["dict_keys_per_s"], 2)
    out["gather_speedup_vs_concat"] = round(
        head["find_or_insert_gather_keys_per_s"] / head["concat_keys_per_s"], 2)
    # On a loaded machine wall time favours the 2-thread jax calls over 1-thread Python;
    # the CPU-time ratios (work done, all threads summed) are the conservative figures.
    out["cpu_speedup_vs_dict"] = round(head["dict_cpu_s"] / head["find_or_insert_cpu_s"], 2)
    out["cpu_dim_speedup_vs_dict"] = round(head["dict_cpu_s"] / head["find_or_insert_dim_cpu_s"],
                                           2)
    out["cpu_gather_speedup_vs_concat"] = round(
        head["concat_cpu_s"] / head["find_or_insert_gather_cpu_s"], 2)
  out["all"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                for r in results]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
