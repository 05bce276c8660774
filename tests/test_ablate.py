"""The ablation harness (benchmarks/ablate.py): a tiny grid end to end, its table and CSV
against the per-run summaries, figures, resume, and config errors before any run."""

import csv
import glob
import json
import os

import numpy as np
import pytest

from benchmarks import ablate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join("experiments", "configs", "ablations")


def _tiny_grid():
  """embedding_dim.py:tiny shrunk further: 2 dims x 2 seeds, 8 steps each, eval at step 4."""
  abl = ablate.load_config_file(os.path.join(ABLATIONS, "embedding_dim.py") + ":tiny")
  abl.name = "test_grid"
  abl.overrides += (("data.train_examples", 4096), ("data.eval_examples", 4096),
                    ("data.eval_batch_size", 4096), ("eval_every_steps", 4),
                    ("log_every_steps", 2), ("optimizer.warmup_steps", 2),
                    ("model.top_mlp", (16, 1)))
  abl.variants = tuple((f"dim{d}", {"model.embedding_dim": d, "model.bottom_mlp": (8, d)})
                       for d in (4, 8))
  return abl


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ablation"))
  lines = []
  summary = ablate.run_ablation(_tiny_grid(), out, isolation="inprocess", say=lines.append)
  return out, summary, lines


def _summaries(out):
  runs = {}
  for path in glob.glob(os.path.join(out, "runs", "*", "seed*", "summary.json")):
    variant, seed = path.split(os.sep)[-3:-1]
    with open(path) as f:
      runs[(variant, int(seed[4:]))] = json.load(f)
  return runs


def test_grid_runs_every_variant_and_seed(grid):
  out, summary, _ = grid
  runs = _summaries(out)
  assert sorted(runs) == [("dim4", 0), ("dim4", 1), ("dim8", 0), ("dim8", 1)]
  assert summary["failed"] == [] and summary["runs"] == 4 and summary["skipped"] == 0
  for s in runs.values():
    assert s["steps"] == 8 and s["samples_per_s"] > 0
    assert 0.3 < s["test_auc"] < 1.0 and np.isfinite(s["test_logloss"])
  # Seeds change the initialisation, so the two seeds of a variant differ.
  assert runs[("dim4", 0)]["test_auc"] != runs[("dim4", 1)]["test_auc"]


def test_csv_holds_mean_and_sample_std_of_the_run_summaries(grid):
  out, summary, _ = grid
  runs = _summaries(out)
  with open(os.path.join(out, "table.csv")) as f:
    rows = {r["variant"]: r for r in csv.DictReader(f)}
  assert list(rows) == ["dim4", "dim8"]
  for v, row in rows.items():
    assert row["runs"] == "2"
    for key in ("samples_per_s", "test_auc", "test_logloss", "collective_bytes_per_step",
                "peak_memory_bytes"):
      vals = [runs[(v, s)].get(key) for s in (0, 1)]
      if vals[0] is None:    # a figure the loop does not report (yet): empty, n/a in the table
        assert row[f"{key}_mean"] == row[f"{key}_std"] == ""
        assert summary["cells"][v][key]["n"] == 0
        continue
      np.testing.assert_allclose(float(row[f"{key}_mean"]), np.mean(vals), rtol=1e-12)
      np.testing.assert_allclose(float(row[f"{key}_std"]), np.std(vals, ddof=1), rtol=1e-12)
      assert summary["cells"][v][key]["mean"] == pytest.approx(np.mean(vals), rel=1e-12)
  with open(os.path.join(out, "runs.csv")) as f:
    per_run = list(csv.DictReader(f))
  assert len(per_run) == 4
  for r in per_run:
    assert float(r["test_auc"]) == runs[(r["variant"], int(r["seed"]))]["test_auc"]


def test_markdown_table_and_printed_output(grid):
  out, _, lines = grid
  runs = _summaries(out)
  with open(os.path.join(out, "table.md")) as f:
    md = f.read()
  rows = [l for l in md.splitlines() if l.startswith("| dim")]
  assert len(rows) == 2
  cells = rows[0].split(" | ")
  auc = [runs[("dim4", s)]["test_auc"] for s in (0, 1)]
  assert f"{np.mean(auc):.4f} ± {np.std(auc, ddof=1):.4f}" in cells
  assert "model.embedding_dim=4" in rows[0]
  assert "load average" in md and "Command" not in md   # no command given in-process
  assert any("| variant |" in l for l in lines)  # the table is printed too


def test_figures_exist_and_curves_come_from_metrics_jsonl(grid):
  out, summary, _ = grid
  import matplotlib.image
  names = sorted(os.path.basename(p) for p in summary["figures"])
  assert names == ["auc_vs_steps.png", "loss_vs_steps.png", "throughput.png"]
  for p in summary["figures"]:
    img = matplotlib.image.imread(p)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01       # something is drawn
  curves = ablate.read_curves(os.path.join(out, "runs", "dim8", "seed1"))
  s = _summaries(out)[("dim8", 1)]
  # eval at step 4 (not at the last step: the final evaluation covers it), then the final AUC.
  assert [st for st, _ in curves["auc"]] == [4, 8]
  assert curves["auc"][-1][1] == s["test_auc"]
  assert [st for st, _ in curves["loss"]] == [2, 4, 6, 8]


def test_resume_skips_finished_runs(grid, tmp_path):
  out, first, _ = grid
  with open(os.path.join(out, "table.csv")) as f:
    before = f.read()
  again = ablate.run_ablation(_tiny_grid(), out, isolation="inprocess", say=lambda _: None)
  assert again["skipped"] == 4 and again["failed"] == []
  with open(os.path.join(out, "table.csv")) as f:
    assert f.read() == before


def test_unknown_key_fails_before_any_run(tmp_path):
  abl = _tiny_grid()
  abl.variants += (("typo", {"embedding.no_such_knob": 1}),)
  with pytest.raises(ablate.AblationError, match=r"'embedding.no_such_knob'.*config.embedding "
                     r"has no 'no_such_knob'"):
    ablate.run_ablation(abl, str(tmp_path), isolation="inprocess", say=lambda _: None)
  assert not os.path.exists(os.path.join(tmp_path, "runs"))   # nothing trained
  abl = _tiny_grid()
  abl.overrides += (("data.batch_size", "large"),)
  with pytest.raises(ablate.AblationError, match="data.batch_size='large'"):
    ablate.validate(ablate.plan_runs(abl))


@pytest.mark.parametrize("name", sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, ABLATIONS, "*.py"))
    if os.path.basename(p) not in ("__init__.py", "common.py")))
@pytest.mark.parametrize("variant", ["", "tiny"])
def test_shipped_ablation_configs_resolve(name, variant):
  """Every shipped grid builds every run's config, or names the key its base still lacks."""
  abl = ablate.load_config_file(os.path.join(ABLATIONS, name + ".py") + (":" + variant
                                                                        if variant else ""))
  runs = ablate.plan_runs(abl)
  assert len(runs) == len(abl.variants) * len(abl.seeds) >= 2
  if abl.kind != "train":
    abl.torchrec_python = ""
    ablate.validate(ablate.plan_runs(abl))
    return
  base = ablate.load_config_file(abl.base)
  missing = []
  for spec in runs:
    for key, _ in spec["overrides"]:
      node = base
      for part in key.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
          missing.append(key)
          break
        node = node[part]
  if missing:       # comm precision / dedup before the communication branch is merged
    with pytest.raises(ablate.AblationError, match=repr(missing[0])):
      ablate.validate(runs)
  else:
    ablate.validate(runs)
    devices = {ablate.run_config(s).mesh.shape for s in runs}
    assert all(int(np.prod(d)) == abl.devices for d in devices), devices


@pytest.mark.slow
def test_command_line_with_one_process_per_run(tmp_path):
  """The documented command: subprocess isolation, 1 device per run, one JSON line at the end."""
  import subprocess
  import sys
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "ablate.py"),
       "--config=" + os.path.join(ROOT, ABLATIONS, "embedding_dim.py") + ":tiny",
       "--config.seeds=(0,)", f"--output_dir={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["failed"] == [] and summary["runs"] == 2
  runs = _summaries(str(tmp_path))
  for s in runs.values():
    assert s["host_peak_rss_bytes"] > 50 * 2**20      # measured in the run's own process
  assert "| dim16 |" in out.stdout and "Command: `python benchmarks/ablate.py" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/work/torchrec-venv/bin/python"),
                    reason="TorchRec venv not installed (never a jaxrec dependency)")
def test_torchrec_table_tiny(tmp_path):
  abl = ablate.load_config_file(os.path.join(ABLATIONS, "torchrec_cpu.py") + ":tiny")
  abl.variants = abl.variants[:1]
  summary = ablate.run_ablation(abl, str(tmp_path), say=lambda _: None)
  cell = summary["cells"]["sgd_fp32"]
  assert summary["failed"] == []
  assert cell["speedup_vs_torchrec"]["mean"] == pytest.approx(
      cell["samples_per_s"]["mean"] / cell["torchrec_samples_per_s"]["mean"])
