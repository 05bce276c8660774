"""Ablation grids: variants x seeds of one experiment config, summarised as one table.

  python benchmarks/ablate.py --config=experiments/configs/ablations/embedding_dim.py
  python benchmarks/ablate.py --config=experiments/configs/ablations/sharding.py:tiny \
      --output_dir=/tmp/ablations/sharding_tiny

The ablation config (``experiments/configs/ablations/<name>.py``) names a base experiment config
(``base``, e.g. ``experiments/configs/dlrm_sharded.py:tiny``), overrides shared by every run, the
variants (name -> dotted-key overrides) and the seeds. Every variant x seed is one call of
``jaxrec.train.loop.train_and_evaluate``. The output dir gets:

  table.md, table.csv   mean and std (over seeds, ddof=1) per variant: samples/s, final AUC,
                        logloss, collective bytes/step, peak device memory, host peak RSS
  runs.csv              one row per run, the raw figures the table aggregates
  auc_vs_steps.png      held-out AUC vs steps (or examples) per variant, mean +- std over seeds
  loss_vs_steps.png     training loss vs steps per variant
  throughput.png        samples/s bars with std error bars
  runs/<variant>/seed<k>/  each run's spec.json, metrics.jsonl, summary.json, log.txt

Finished runs (summary.json beside an identical spec.json) are skipped, so an interrupted grid
resumes where it stopped; --rerun repeats them; --norun tabulates a partial grid, running nothing.

Isolation: by default each run is its own Python process (``--isolation=subprocess``). The
device count must be set before jax starts (a mesh of 8 fake CPU devices for the sharding
ablation, 1 device for the others), a run's compiled executables and allocator state cannot
leak into the next run's timing, a crash loses one run and not the grid, and each process's
peak RSS is that run's. The price is a jax import per run (a few seconds); seeds of one variant
share compiled code through a persistent compilation cache in the output dir.
``--isolation=inprocess`` runs everything in this process (the test suite's tiny grid) and
needs as many visible devices as the largest mesh.

``kind = "dlrm_throughput"`` configs run benchmarks/dlrm_throughput.py instead (variants are its
flags, seeds are repeats) and tabulate jaxrec vs TorchRec samples/s
(experiments/configs/ablations/torchrec_cpu.py).

Prints the table and ends with one JSON line.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # configs build on each other (`from experiments.configs import ...`)
  sys.path.insert(0, ROOT)

# (summary key, column title, unit) per kind of ablation; a key absent from a run's summary
# (e.g. collective bytes before the monitors land) shows as n/a.
TRAIN_METRICS = (
    ("samples_per_s", "samples/s", "count"),
    ("test_auc", "AUC", "auc"),
    ("test_logloss", "logloss", "loss"),
    ("collective_bytes_per_step", "collective bytes/step", "bytes"),
    ("peak_memory_bytes", "peak device memory", "bytes"),
    ("host_peak_rss_bytes", "host peak RSS", "bytes"),
)
THROUGHPUT_METRICS = (
    ("samples_per_s", "jaxrec samples/s", "count"),
    ("torchrec_samples_per_s", "TorchRec samples/s", "count"),
    ("speedup_vs_torchrec", "jaxrec / TorchRec", "ratio"),
)


class AblationError(ValueError):
  """A config problem found before any run starts."""


# ----------------------------------------------------------------------------- configs

def load_config_file(spec: str):
  """``path.py[:variant]`` -> the ConfigDict its ``get_config(variant)`` returns."""
  path, _, variant = spec.partition(":")
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.exists(full):
    raise AblationError(f"config file {path!r} does not exist (paths are relative to {ROOT})")
  name = "_ablate_cfg_" + hashlib.md5(full.encode()).hexdigest()[:8]
  mod_spec = importlib.util.spec_from_file_location(name, full)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(variant) if variant else mod.get_config()


def _pairs(x) -> list[tuple[str, object]]:
  return list(x.items()) if isinstance(x, dict) else [tuple(p) for p in (x or ())]


def apply_overrides(config, overrides, where: str):
  """Sets dotted keys on a (locked) ConfigDict; a key the config lacks is an AblationError
  that names it, the part that is missing and what exists there."""
  for key, value in overrides:
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      known = list(node.keys()) if hasattr(node, "keys") else []
      if part not in known:
        prefix = ".".join(["config"] + parts[:i])
        raise AblationError(
            f"{where}: override {key!r} names no field of the config: {prefix} has no "
            f"{part!r} (it has {sorted(known)}). A key another branch adds (comm precision, "
            "dedup) exists only once that branch is merged.")
      if i < len(parts) - 1:
        node = node[part]
    if isinstance(value, list):  # JSON round trip of a tuple
      value = tuple(value)
    try:
      setattr(node, parts[-1], value)
    except (TypeError, AttributeError) as e:
      raise AblationError(f"{where}: override {key}={value!r}: {e}") from e
  return config


def plan_runs(abl) -> list[dict]:
  """One JSON-serialisable spec per variant x seed, in config order."""
  kind = abl.get("kind", "train")
  if kind not in ("train", "dlrm_throughput"):
    raise AblationError(f"ablation {abl.name!r}: kind={kind!r}; expected train or dlrm_throughput")
  variants = _pairs(abl.variants)
  names = [v for v, _ in variants]
  if not variants or len(set(names)) != len(names):
    raise AblationError(f"ablation {abl.name!r}: variants must be non-empty with unique names, "
                        f"got {names}")
  runs = []
  for variant, ov in variants:
    for seed in abl.seeds:
      overrides = [list(p) for p in _pairs(abl.get("overrides")) + _pairs(ov)]
      spec = dict(ablation=abl.name, kind=kind, variant=variant, seed=int(seed),
                  overrides=overrides, devices=int(abl.get("devices", 0) or 0))
      if kind == "train":
        spec["base"] = abl.base
        spec["seed_keys"] = list(abl.get("seed_keys", ("seed",)))
      else:
        spec["torchrec_python"] = abl.get("torchrec_python", "") or ""
      runs.append(json.loads(json.dumps(spec)))  # as spec.json holds it: resume compares
  return runs


def run_config(spec: dict):
  """The experiment ConfigDict of one train run (base + overrides + seed)."""
  where = f"ablation {spec['ablation']!r}, variant {spec['variant']!r}"
  c = load_config_file(spec["base"])
  pre = []
  if "checkpoint" in c:  # ablation runs train from scratch: no resume from a stale snapshot
    pre.append(("checkpoint.enabled", False))
  if spec["devices"] and "mesh" in c and c.mesh.get("shape") is None:
    pre.append(("mesh.shape", (spec["devices"],)))  # "every device" = the ablation's count
  apply_overrides(c, pre + [tuple(p) for p in spec["overrides"]], where)
  apply_overrides(c, [(k, spec["seed"]) for k in spec["seed_keys"]], where + " (seed_keys)")
  return c


def validate(runs: list[dict]):
  """Builds every run's config before anything trains, so a bad key fails in seconds, and
  stamps each train spec with a hash of it (resume reruns a run whose base config changed)."""
  for spec in runs:
    if spec["kind"] == "train":
      resolved = run_config(spec).to_json(sort_keys=True)
      spec["config_sha1"] = hashlib.sha1(resolved.encode()).hexdigest()
    elif spec["torchrec_python"] and not os.path.exists(spec["torchrec_python"]):
      raise AblationError(
          f"ablation {spec['ablation']!r}: torchrec_python={spec['torchrec_python']!r} does not "
          "exist; set --config.torchrec_python to a venv with TorchRec (see "
          "benchmarks/torchrec_dlrm.py; TorchRec is never a jaxrec dependency) or to '' for "
          "jaxrec alone")


def run_dir(output_dir: str, spec: dict) -> str:
  return os.path.join(output_dir, "runs", spec["variant"], f"seed{spec['seed']}")


def finished(rdir: str, spec: dict) -> dict | None:
  try:
    with open(os.path.join(rdir, "spec.json")) as f:
      if json.load(f) != spec:
        return None
    with open(os.path.join(rdir, "summary.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------- running

def _write_json(path: str, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(tmp, path)  # summary.json appears only complete: resume trusts it


def _train_in_this_process(spec: dict, rdir: str) -> dict:
  from jaxrec.train.loop import train_and_evaluate
  t = time.perf_counter()
  summary = dict(train_and_evaluate(run_config(spec), rdir))
  summary["wall_s"] = time.perf_counter() - t
  return summary


def worker_main(rdir: str) -> int:
  """``ablate.py --worker=RUN_DIR``: one train run in this (fresh) process."""
  with open(os.path.join(rdir, "spec.json")) as f:
    spec = json.load(f)
  summary = _train_in_this_process(spec, rdir)
  summary["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  _write_json(os.path.join(rdir, "summary.json"), summary)
  return 0


def _child_env(spec: dict, cache_dir: str) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("JAX_PLATFORMS", "cpu")
  if spec["devices"]:
    env["JAX_NUM_CPU_DEVICES"] = str(spec["devices"])
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return env


def _run_subprocess(args: list[str], env: dict, rdir: str) -> tuple[int, str]:
  with open(os.path.join(rdir, "log.txt"), "w") as log:
    rc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                        check=False).returncode
  with open(os.path.join(rdir, "log.txt")) as f:
    return rc, f.read()[-3000:]


def _throughput_run(spec: dict, rdir: str, env: dict) -> dict:
  args = [sys.executable, os.path.join(ROOT, "benchmarks", "dlrm_throughput.py")]
  args += [f"--{k}={v}" for k, v in spec["overrides"]]
  if spec["torchrec_python"]:
    args.append(f"--torchrec_python={spec['torchrec_python']}")
  t = time.perf_counter()
  rc, tail = _run_subprocess(args, env, rdir)
  if rc != 0:
    raise RuntimeError(f"dlrm_throughput.py exited {rc}:\n{tail}")
  summary = json.loads(tail.strip().splitlines()[-1])
  summary["wall_s"] = time.perf_counter() - t
  _write_json(os.path.join(rdir, "summary.json"), summary)
  return summary


def execute(spec: dict, rdir: str, isolation: str, cache_dir: str) -> dict:
  """Runs one spec into a clean ``rdir`` and returns its summary."""
  if os.path.exists(rdir):
    shutil.rmtree(rdir)  # metrics.jsonl appends: a half-finished run starts over
  os.makedirs(rdir)
  _write_json(os.path.join(rdir, "spec.json"), spec)
  env = _child_env(spec, cache_dir)
  if spec["kind"] == "dlrm_throughput":
    return _throughput_run(spec, rdir, env)
  if isolation == "inprocess":
    import jax
    need = spec["devices"] or 1
    if jax.device_count() < need:
      raise AblationError(f"--isolation=inprocess: variant {spec['variant']!r} needs {need} "
                          f"devices, this process has {jax.device_count()} (set "
                          "JAX_NUM_CPU_DEVICES or use --isolation=subprocess)")
    summary = _train_in_this_process(spec, rdir)
    _write_json(os.path.join(rdir, "summary.json"), summary)
    return summary
  rc, tail = _run_subprocess([sys.executable, os.path.abspath(__file__), f"--worker={rdir}"],
                             env, rdir)
  if rc != 0:
    raise RuntimeError(f"run exited {rc}; the end of {rdir}/log.txt:\n{tail}")
  with open(os.path.join(rdir, "summary.json")) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- aggregation

def mean_std(values) -> tuple[float | None, float | None]:
  """Mean and sample std (ddof=1) of the values that exist; std is None for one value."""
  xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not xs:
    return None, None
  m = sum(xs) / len(xs)
  if len(xs) < 2:
    return m, None
  return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(x: float | None, unit: str) -> str:
  if x is None:
    return "n/a"
  if unit == "bytes":
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
      if abs(x) >= div:
        return f"{x / div:.2f} {suffix}"
    return f"{x:.0f} B"
  if unit == "count":
    return f"{x:,.0f}"
  if unit == "ratio":
    return f"{x:.2f}x"
  return f"{x:.4f}"


def fmt_cell(m: float | None, s: float | None, unit: str) -> str:
  if m is None:
    return "n/a"
  return _fmt(m, unit) if s is None else f"{_fmt(m, unit)} ± {_fmt(s, unit)}"


def aggregate(variants: list[str], results: dict, metrics) -> dict:
  """variant -> metric -> (mean, std, n) over that variant's finished runs."""
  cells = {}
  for v in variants:
    runs = [s for (name, _), s in results.items() if name == v]
    cells[v] = {}
    for key, _, _ in metrics:
      m, s = mean_std(r.get(key) for r in runs)
      cells[v][key] = (m, s, sum(r.get(key) is not None for r in runs))
  return cells


def _overrides_text(abl, variant: str) -> str:
  ov = dict(_pairs(abl.variants))[variant]
  return ", ".join(f"{k}={v}" for k, v in _pairs(ov)) or "(base)"


def write_tables(abl, variants, cells, results, metrics, header: list[str], out: str) -> str:
  cols = ["variant", "overrides", "runs"] + [title for _, title, _ in metrics]
  lines = [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
  for v in variants:
    n = sum(1 for (name, _) in results if name == v)
    row = [v, _overrides_text(abl, v), str(n)]
    row += [fmt_cell(cells[v][k][0], cells[v][k][1], unit) for k, _, unit in metrics]
    lines.append(f"| {' | '.join(row)} |")
  table = "\n".join(lines)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(header) + "\n\n" + table + "\n")
  with open(os.path.join(out, "table.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["variant", "overrides", "runs"] +
               [f"{k}_{stat}" for k, _, _ in metrics for stat in ("mean", "std")])
    for v in variants:
      row = [v, _overrides_text(abl, v), sum(1 for (name, _) in results if name == v)]
      for k, _, _ in metrics:
        m, s, _ = cells[v][k]
        row += ["" if m is None else repr(m), "" if s is None else repr(s)]
      w.writerow(row)
  with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["variant", "seed"] + [k for k, _, _ in metrics])
    for (v, seed), s in results.items():
      w.writerow([v, seed] + ["" if s.get(k) is None else repr(s[k]) for k, _, _ in metrics])
  return table


def read_curves(rdir: str) -> dict:
  """Per run: steps/examples of held-out AUC points (eval/auc, then the final test AUC) and of
  training loss, from metrics.jsonl."""
  auc, loss = [], []
  final = None
  path = os.path.join(rdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {"auc": auc, "loss": loss}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if "eval/auc" in r:
        auc.append((r["step"], r["eval/auc"]))
      if "loss" in r:
        loss.append((r["step"], r["loss"]))
      if "final/test_auc" in r:
        final = (r["step"], r["final/test_auc"])
  if final is not None:
    auc.append(final)
  return {"auc": auc, "loss": loss}


def _mean_curve(curves: list[list[tuple[int, float]]]):
  """Mean and std over seeds at the steps every seed logged."""
  import numpy as np
  common = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
  ys = np.array([[dict(c)[s] for s in common] for c in curves], np.float64)
  if not common:
    return np.zeros(0), np.zeros(0), np.zeros(0)
  sd = ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
  return np.array(common, np.float64), ys.mean(0), sd


def write_figures(abl, variants, results, cells, metrics, out: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  paths = []
  per_examples = abl.get("x_axis", "steps") == "examples"
  if abl.get("kind", "train") == "train":
    for what, ylabel, fname in (("auc", "held-out AUC", "auc_vs_steps.png"),
                                ("loss", "training loss", "loss_vs_steps.png")):
      fig, ax = plt.subplots(figsize=(6.4, 4.2))
      for v in variants:
        seeds = [(seed, s) for (name, seed), s in results.items() if name == v]
        curves = []
        for seed, s in seeds:
          c = read_curves(run_dir(out, dict(variant=v, seed=seed)))[what]
          scale = s["train_examples"] / max(s["steps"], 1) if per_examples else 1
          curves.append([(int(st * scale), y) for st, y in c])
        x, m, sd = _mean_curve([c for c in curves if c])
        if len(x):
          ax.plot(x, m, marker="o" if len(x) < 30 else None, ms=3, label=v)
          ax.fill_between(x, m - sd, m + sd, alpha=0.2)
      ax.set_xlabel("training examples" if per_examples else "step")
      ax.set_ylabel(ylabel)
      ax.set_title(f"{abl.name}: {ylabel} (mean ± std over seeds)", fontsize=10)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
      fig.tight_layout()
      fig.savefig(os.path.join(out, fname), dpi=110)
      plt.close(fig)
      paths.append(os.path.join(out, fname))
  bars = [(k, title) for k, title, unit in metrics if unit == "count"]
  fig, ax = plt.subplots(figsize=(max(6.4, 1.0 * len(variants) * len(bars) + 2), 4.2))
  width = 0.8 / len(bars)
  for j, (k, title) in enumerate(bars):
    means = [cells[v][k][0] or 0.0 for v in variants]
    errs = [cells[v][k][1] or 0.0 for v in variants]
    ax.bar(np.arange(len(variants)) + (j - (len(bars) - 1) / 2) * width, means, width,
           yerr=errs, capsize=3, label=title)
  ax.set_xticks(np.arange(len(variants)), variants, rotation=20, ha="right")
  ax.set_ylabel("samples/s")
  ax.set_title(f"{abl.name}: training throughput (mean ± std)", fontsize=10)
  if len(bars) > 1:
    ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "throughput.png"), dpi=110)
  plt.close(fig)
  paths.append(os.path.join(out, "throughput.png"))
  return paths


# ----------------------------------------------------------------------------- driver

def machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{model}, {os.cpu_count()} cores"


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_ablation(abl, output_dir: str, isolation: str = "subprocess", rerun: bool = False,
                 command: str = "", say=print, run_missing: bool = True) -> dict:
  """Runs (or resumes) the grid of ``abl`` into ``output_dir``; returns the JSON summary.
  ``run_missing=False`` only tabulates the runs that finished (a partial grid)."""
  runs = plan_runs(abl)
  validate(runs)
  kind = abl.get("kind", "train")
  metrics = TRAIN_METRICS if kind == "train" else THROUGHPUT_METRICS
  variants = [v for v, _ in _pairs(abl.variants)]
  os.makedirs(output_dir, exist_ok=True)
  cache_dir = os.path.join(output_dir, "jax_cache")
  load_before, started = _load(), datetime.datetime.now(datetime.timezone.utc)
  results, failed, skipped, missing = {}, [], 0, []
  for i, spec in enumerate(runs):
    rdir = run_dir(output_dir, spec)
    tag = f"[{i + 1}/{len(runs)}] {abl.name}/{spec['variant']} seed {spec['seed']}"
    done = None if rerun else finished(rdir, spec)
    if done is not None:
      skipped += 1
      say(f"{tag}: finished earlier, skipped")
    elif not run_missing:
      missing.append(f"{spec['variant']}/seed{spec['seed']}")
      say(f"{tag}: not run (--norun)")
      continue
    else:
      t, load0 = time.perf_counter(), os.getloadavg()[0]
      try:
        done = execute(spec, rdir, isolation, cache_dir)
        # The machine's load during the run, kept with it (a resumed grid spans hours).
        done["load_avg_1min"] = [load0, os.getloadavg()[0]]
        _write_json(os.path.join(rdir, "summary.json"), done)
      except AblationError:
        raise
      except Exception as e:  # one broken run must not cost the others
        failed.append(f"{spec['variant']}/seed{spec['seed']}")
        last = [l for l in str(e).splitlines() if l.strip()][-1:] or [""]
        say(f"{tag}: FAILED ({type(e).__name__}: {last[0][:300]}; see {rdir}/log.txt)")
        continue
      key = "test_auc" if kind == "train" else "speedup_vs_torchrec"
      say(f"{tag}: {metrics[0][1]} {_fmt(done.get('samples_per_s'), 'count')}, {key} "
          f"{_fmt(done.get(key), 'ratio' if kind != 'train' else 'auc')} "
          f"({time.perf_counter() - t:.0f}s, load {_load()})")
    results[(spec["variant"], spec["seed"])] = done
  cells = aggregate(variants, results, metrics)
  header = [f"**{abl.name}** — {abl.get('description', '')}".rstrip(" —"),
            "",
            f"Command: `{command}`" if command else "",
            (f"Base: `{abl.base}`, seeds {list(abl.seeds)}" if kind == "train" else
             f"benchmarks/dlrm_throughput.py, {len(abl.seeds)} repeat(s)") +
            "; shared overrides: " + (", ".join(f"{k}={v}" for k, v in
                                               _pairs(abl.get("overrides"))) or "none") + ".",
            f"Machine: {machine()}; {started:%Y-%m-%d %H:%M} UTC; load average (1/5/15 min) "
            f"{load_before} before, {_load()} after; isolation {isolation}.",
            "Cells: mean ± sample std over seeds; n/a: the run summary has no such figure."]
  loads = [x for r in results.values() for x in r.get("load_avg_1min", ())]
  if loads:
    header.insert(-1, f"1-min load average at the start/end of the runs: {min(loads):.1f} to "
                      f"{max(loads):.1f} (2 cores: above 2, figures of samples/s are contended).")
  first = next(iter(results.values()), None)
  if kind == "train" and first is not None:
    header.insert(4, f"{first['steps']:,} steps x batch "
                     f"{first['train_examples'] // max(first['steps'], 1):,} (first "
                     f"variant), {first['eval_examples']:,} held-out examples; Bayes-optimal "
                     f"AUC {first['bayes_auc']:.4f}.")
  header = [h for h in header if h is not None]
  table = write_tables(abl, variants, cells, results, metrics, header, output_dir)
  figures = write_figures(abl, variants, results, cells, metrics, output_dir) if results else []
  say("\n" + "\n".join(h for h in header if h) + "\n\n" + table)
  return {"ablation": abl.name, "output_dir": output_dir, "runs": len(runs),
          "skipped": skipped, "failed": failed, "not_run": missing,
          "table": os.path.join(output_dir, "table.md"),
          "csv": os.path.join(output_dir, "table.csv"), "figures": figures,
          "cells": {v: {k: {"mean": m, "std": s, "n": n} for k, (m, s, n) in c.items()}
                    for v, c in cells.items()}}


def main():
  # The worker is a plain re-entry (no absl parsing): the parent built its spec.json.
  if len(sys.argv) == 2 and sys.argv[1].startswith("--worker="):
    sys.exit(worker_main(sys.argv[1].split("=", 1)[1]))

  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "ablation config file",
                                           lock_config=True)
  out_flag = flags.DEFINE_string("output_dir", None,
                                 "where runs, tables and figures go (default "
                                 "/tmp/jaxrec_ablations/<name>)")
  iso_flag = flags.DEFINE_enum("isolation", "subprocess", ["subprocess", "inprocess"],
                               "one process per run, or every run in this process")
  rerun_flag = flags.DEFINE_bool("rerun", False, "repeat runs that finished earlier")
  run_flag = flags.DEFINE_bool("run", True, "--norun: tabulate the finished runs, start none")

  def _main(argv):
    del argv
    abl = config.value
    out = out_flag.value or os.path.join("/tmp/jaxrec_ablations", abl.name)
    command = "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] +
                                   sys.argv[1:])
    try:
      summary = run_ablation(abl, out, iso_flag.value, rerun_flag.value, command,
                             run_missing=run_flag.value)
    except AblationError as e:
      print(f"ablate.py: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps(summary, default=float))
    if summary["failed"]:
      sys.exit(1)

  flags.mark_flags_as_required(["config"])
  app.run(_main)


if __name__ == "__main__":
  main()
