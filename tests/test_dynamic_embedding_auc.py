"""Issue #4's acceptance: on the synthetic stream with drift, DLRM with dynamic tables
(capacity below the distinct IDs, admission threshold 2, age eviction) ends within 0.005 AUC of
the same model with large static hashed tables, while holding fewer rows."""

from __future__ import annotations

import json

import pytest

from experiments.configs import dlrm_dynamic
from jaxrec.train import builders, loop


def _run(variant: str, workdir, **overrides) -> tuple[dict, int]:
  """(summary, rows held at the end) of one run of the dlrm_dynamic config."""
  c = dlrm_dynamic.get_config(variant)
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  c.checkpoint.enabled = False   # metrics.jsonl only: snapshots are tested elsewhere
  summary = loop.train_and_evaluate(c, workdir=str(workdir))
  cards = builders.synthetic_stream(c.data).config.cardinalities
  # Static tables hold all their rows; dynamic ones the rows in use at the end.
  min_vocab = c.embedding.get("dynamic_min_vocab", 0) if c.embedding.dynamic else float("inf")
  rows = sum(builders.table_rows(card, c.embedding) for card in cards if card < min_vocab)
  if c.embedding.dynamic:
    records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    rows += int([r for r in records if "dynamic/size" in r][-1]["dynamic/size"])
  return summary, rows


# In the default suite (about 20 s on one core): the acceptance at a small size; the
# full test-stream version below is slow-marked (about 150 s, a 50 s compile).
def test_dynamic_tables_match_static_on_a_small_drifting_stream(tmp_path):
  small = {"data.preset": "kaggle", "data.synthetic.cardinalities": (3000, 60),
           "data.synthetic.num_pairs": 1,
           "data.train_examples": 64 * 1024, "data.eval_examples": 16 * 1024,
           "data.eval_start": 64 * 1024, "data.eval_batch_size": 4096, "log_every_steps": 64,
           "optimizer.warmup_steps": 10}
  dyn, dyn_rows = _run("test", tmp_path / "dyn", **small)
  static, static_rows = _run("test_static", tmp_path / "static", **small)
  print(f"dynamic AUC {dyn['test_auc']:.4f} ({dyn_rows} rows), static AUC "
        f"{static['test_auc']:.4f} ({static_rows} rows)")
  assert dyn["test_auc"] > 0.6
  assert dyn["test_auc"] >= static["test_auc"] - 0.005
  assert dyn_rows < static_rows


@pytest.mark.slow
def test_dynamic_tables_match_static_on_the_drifting_test_stream(tmp_path):
  dyn, dyn_rows = _run("test", tmp_path / "dyn")
  static, static_rows = _run("test_static", tmp_path / "static")
  print(f"dynamic AUC {dyn['test_auc']:.4f} ({dyn_rows} rows), static AUC "
        f"{static['test_auc']:.4f} ({static_rows} rows)")
  assert dyn["test_auc"] >= static["test_auc"] - 0.005
  assert dyn_rows < static_rows
