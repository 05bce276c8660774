"""Training monitors: streaming AUC vs exact, per-group gradient norms vs a direct computation,
hot-row share vs a plain count, TensorBoard events read back, and the anomaly action (log, stop,
rollback) with a NaN injected into one batch of the real loop."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrec.checkpoint import from_config, list_versions
from jaxrec.monitoring import (AnomalyStop, Monitor, MonitorOptions, StepMonitors, binned_auc,
                               hot_row_share, tie_bound)
from jaxrec.monitoring.step_metrics import logit_histograms
from jaxrec.train import builders, loop, metrics
from jaxrec.train.step import jit_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "dlrm_synthetic.py")
B = 64


def tiny_config(devices: int = 1, **monitor):
  """A seconds-sized DLRM run (four small features) of the ``:tiny`` config."""
  c = from_config.load_config(CONFIG + ":tiny")
  c.data.preset = "kaggle"  # the preset that takes explicit cardinalities
  c.data.synthetic = ml_collections.ConfigDict({"cardinalities": (40, 300, 1000, 7),
                                                "weighted_features": 4, "num_pairs": 2})
  c.data.batch_size = B
  c.data.train_examples = B * 30
  c.data.eval_examples = B * 16
  c.data.eval_batch_size = B * 4
  c.model.embedding_dim = 8
  c.model.bottom_mlp = (16, 8)
  c.model.top_mlp = (16, 1)
  c.embedding.max_rows = 512
  c.embedding.min_rows = 16
  c.optimizer.warmup_steps = 5
  c.log_every_steps = 5
  c.mesh = ml_collections.ConfigDict({"shape": (devices,)})
  c.checkpoint.every_steps = 5
  for k, v in monitor.items():
    c.monitor[k] = v
  return c


# ---- streaming AUC -------------------------------------------------------------------------------

@pytest.mark.parametrize("bins", [16, 1024])
def test_streaming_auc_matches_exact_auc_within_bin_resolution(bins):
  rng = np.random.default_rng(bins)
  n = 20_000
  labels = (rng.random(n) < 0.1).astype(np.float32)
  logits = rng.normal(size=n) * 2 + labels * 1.5 - 2.5     # a 10% click rate, AUC ~0.85
  logits[:5] = [-50.0, 50.0, 8.0, -8.0, 0.0]                # beyond the range: end bins
  hist = np.zeros((2, bins), np.int64)
  for chunk in np.array_split(np.arange(n), 7):             # streamed over several "steps"
    hist += np.asarray(logit_histograms(jnp.asarray(logits[chunk], jnp.float32),
                                        jnp.asarray(labels[chunk]), bins, 8.0))
  assert hist.sum() == n and hist[1].sum() == labels.sum()
  exact = metrics.auc(labels, logits)
  # Reference: the exact AUC of the bin-quantised scores (ties count 1/2) is the binned AUC.
  quantised = np.clip(np.floor((np.clip(logits, -8, 8) + 8) * bins / 16), 0, bins - 1)
  assert binned_auc(hist) == pytest.approx(metrics.auc(labels, quantised), abs=1e-9)
  assert abs(binned_auc(hist) - exact) <= tie_bound(hist) + 1e-12
  if bins == 1024:
    assert abs(binned_auc(hist) - exact) < 2e-3
  else:
    assert tie_bound(hist) > 2e-3      # the bound is not vacuous: coarse bins lose resolution


def test_logit_histograms_skip_non_finite_logits():
  h = np.asarray(logit_histograms(jnp.array([0.1, jnp.nan, jnp.inf, -0.1]),
                                  jnp.array([1.0, 1.0, 0.0, 0.0]), 4, 8.0))
  assert h.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0]]
  assert math.isnan(binned_auc(np.zeros((2, 4))))


def test_nonfinite_count_is_exact_and_skipped_only_when_all_is_finite():
  from jaxrec.monitoring.step_metrics import step_monitor_metrics
  spec = StepMonitors(auc_bins=8)
  params = {"top": {"w": jnp.ones((3, 4))}, "bottom": {"b": jnp.ones(5)}}
  feats = [jnp.ones((4, 2)), jnp.ones((4, 2))]
  logits, labels = jnp.zeros(4), jnp.array([0.0, 1.0, 0.0, 1.0])
  m = step_monitor_metrics(spec, jnp.float32(0.7), logits, labels, params, feats)
  assert int(m["nonfinite"]) == 0
  bad_params = {"top": {"w": jnp.ones((3, 4)).at[0, 1].set(jnp.nan).at[2, 2].set(-jnp.inf)},
                "bottom": {"b": jnp.ones(5)}}
  bad_feats = [jnp.ones((4, 2)), jnp.ones((4, 2)).at[3, 0].set(jnp.nan)]
  m = step_monitor_metrics(spec, jnp.float32(jnp.inf), logits.at[1].set(jnp.nan), labels,
                           bad_params, bad_feats)
  assert int(m["nonfinite"]) == 5                           # loss, 1 logit, 2 + 1 gradients
  assert math.isnan(float(m["grad_norm/top"])) and float(m["grad_norm/bottom"]) == \
      pytest.approx(math.sqrt(5))
  huge = {"top": {"w": jnp.full((3, 4), 1e30)}, "bottom": {"b": jnp.ones(5)}}
  m = step_monitor_metrics(spec, jnp.float32(0.7), logits, labels, huge, feats)
  assert math.isinf(float(m["grad_norm/top"])) and int(m["nonfinite"]) == 0   # overflow only


# ---- hot-row share -------------------------------------------------------------------------------

def test_hot_row_share_matches_a_plain_count():
  rng = np.random.default_rng(0)
  b, cols = 512, 6
  column_tables = np.array([0, 0, 1, 2, 2, 2])              # multi-hot features, a shared table
  ids = (rng.zipf(1.3, size=(b, cols)) % 5000).astype(np.uint64)
  ids[:, 3] += np.uint64(1) << np.uint64(40)                # 64-bit IDs
  mask = rng.random((b, cols)) < 0.8
  counts = collections.Counter()
  for i in range(b):
    for j in range(cols):
      if mask[i, j]:
        counts[(int(column_tables[j]), int(ids[i, j]))] += 1
  for frac in (0.01, 0.1, 1.0):
    k = math.ceil(frac * len(counts))
    want = sum(sorted(counts.values(), reverse=True)[:k]) / sum(counts.values())
    assert hot_row_share(ids, mask, column_tables, frac) == pytest.approx(want)
    pairs = ids.view(np.uint32).reshape(b, cols, 2)          # as the step receives IDs
    assert hot_row_share(pairs, mask, column_tables, frac) == pytest.approx(want)
  # The same ID in two tables is two rows.
  same = np.ones((4, 2), np.uint64)
  assert hot_row_share(same, np.ones((4, 2), bool), [0, 1], 0.5) == 0.5
  assert math.isnan(hot_row_share(same, np.zeros((4, 2), bool), [0, 1]))


# ---- per-group gradient norms, embedding-gradient norm, non-finite count -------------------------

def test_step_grad_norms_per_group_match_a_direct_computation():
  c = tiny_config(devices=2)
  c.embedding.replicate_below_kib = 0                       # sharded tables, all_to_all
  run = from_config.build(c)
  train, _ = jit_steps(run.graphdef, run.emb, run.tx, run.state,
                       monitors=StepMonitors(auc_bins=64))
  host = run.stream.examples(0, B)
  batch = jax.device_put(builders.device_batch(run.emb.check_batch(host)), run.emb.batch_sharding)

  # Reference: plain jax.grad w.r.t. (params, pooled features), norms per top-level module.
  state = run.state

  @jax.jit
  def reference(state, batch):
    feats, _, _ = run.emb.forward(state.emb, batch["ids"], batch["mask"])

    def loss_fn(params, feats):
      model = nnx.merge(run.graphdef, params)
      logits = model(batch["dense"], jnp.stack(feats, axis=1))[:, 0]
      return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(), logits

    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(state.params, feats)

  (_, logits), (g_params, g_feats) = reference(state, batch)
  want = {name: math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                              for x in jax.tree.leaves(sub)))
          for name, sub in g_params.items()}
  want_emb = math.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in g_feats))
  logits, labels = np.asarray(logits), np.asarray(batch["labels"])

  state, m = train(state, batch)
  assert sorted(k for k in m if k.startswith("grad_norm/")) == sorted(
      [f"grad_norm/{k}" for k in want] + ["grad_norm/embedding"])
  assert set(want) == {"bottom", "top"}
  for k, v in want.items():
    assert float(m[f"grad_norm/{k}"]) == pytest.approx(v, rel=1e-4), k
  assert float(m["grad_norm/embedding"]) == pytest.approx(want_emb, rel=1e-4)
  assert float(m["dense_grad_norm"]) == pytest.approx(math.sqrt(sum(v * v for v in
                                                                    want.values())), rel=1e-4)
  assert int(m["nonfinite"]) == 0
  hist = np.asarray(m["auc_hist"])
  assert hist.sum() == B and hist[1].sum() == labels.sum()
  assert abs(binned_auc(hist) - metrics.auc(labels, logits)) <= tie_bound(hist) + 1e-9

  bad = jax.device_put(builders.device_batch(dataclasses.replace(
      host, dense=np.full_like(host.dense, np.nan))), run.emb.batch_sharding)
  _, m = train(state, bad)
  assert int(m["nonfinite"]) >= 1 + B                       # the loss and every logit
  assert math.isnan(float(m["loss"]))


# ---- the Monitor's anomaly detection, fed by hand ------------------------------------------------

def _fake_metrics(loss, norm=1.0):
  return {"loss": np.float32(loss), "dense_grad_norm": np.float32(norm),
          "grad_norm/embedding": np.float32(norm), "nonfinite": np.int32(0),
          "auc_hist": np.array([[3, 1], [1, 3]], np.int32)}


@pytest.mark.parametrize("check_every", [1, 7])
def test_monitor_names_the_first_bad_step_whenever_it_checks(check_every):
  said = []
  opts = MonitorOptions(log_every_steps=100, anomaly_action="stop", spike_factor=5.0,
                        spike_warmup_steps=10, check_every_steps=check_every)
  mon = Monitor(opts, workdir=None, total_steps=100, batch_size=8, say=said.append)
  with pytest.raises(AnomalyStop, match=r"step 23: loss spiked to 9 .*anomaly_action='stop'"):
    for step in range(1, 101):
      mon.after_step(step, _fake_metrics(9.0 if step in (23, 24) else 1.0), None,
                     {"example": 8 * step})
  assert step == (23 if check_every == 1 else 28)           # how far training ran on

  # "log" trains on and counts; the non-finite count alone is an anomaly too.
  mon = Monitor(dataclasses.replace(opts, anomaly_action="log", log_every_steps=10),
                workdir=None, total_steps=20, batch_size=8, say=said.append)
  for step in range(1, 21):
    m = _fake_metrics(1.0)
    m["nonfinite"] = np.int32(3 if step == 12 else 0)
    assert mon.after_step(step, m, None, {"example": 8 * step}).ok
  assert mon.anomalies == [{"step": 12, "reason": "step 12: 3 non-finite loss/gradient values",
                            "steps": 1}]
  assert mon.last_record["anomalies"] == 1 and mon.last_record["nonfinite"] == 3
  assert mon.last_record["train_auc"] == pytest.approx(binned_auc([[30, 10], [10, 30]]))
  assert any("anomaly at step 12" in s for s in said)


def test_rollback_without_checkpoints_stops_instead():
  said = []
  mon = Monitor(MonitorOptions(), workdir=None, total_steps=10, batch_size=8, say=said.append)
  assert mon.action == "stop" and "stopping on an anomaly instead" in said[0]
  with pytest.raises(ValueError, match="anomaly_action='retry'"):
    MonitorOptions(anomaly_action="retry")


# ---- the real loop: a NaN in one batch -----------------------------------------------------------

BAD_STEP = 13   # its batch holds examples [(BAD_STEP - 1) * B, BAD_STEP * B)


class _Edited:
  """The run's stream with NaN dense features in the batch that starts at example ``poison``,
  and without the training batches that start in ``skip``."""

  def __init__(self, inner, poison=None, skip=()):
    self.inner, self.poison, self.skip = inner, poison, set(skip)

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def batches(self, batch_size, start=0, stop=None, with_prob=False):
    for i, b in enumerate(self.inner.batches(batch_size, start, stop, with_prob)):
      if start + i * batch_size == self.poison:
        b = dataclasses.replace(b, dense=np.full_like(b.dense, np.nan))
      if start + i * batch_size not in self.skip:
        yield b


def _edit_stream(monkeypatch, **edits):
  real = builders.synthetic_stream
  monkeypatch.setattr(builders, "synthetic_stream", lambda d: _Edited(real(d), **edits))


@pytest.fixture
def poisoned(monkeypatch):
  _edit_stream(monkeypatch, poison=(BAD_STEP - 1) * B)


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_nan_batch_with_action_log_trains_on_and_logs_to_tensorboard(tmp_path, poisoned):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  c = tiny_config(anomaly_action="log")
  c.checkpoint.enabled = False
  s = loop.train_and_evaluate(c, str(tmp_path))
  assert s["steps"] == 30 and s["anomalous_steps"] >= 1
  assert {"peak_memory_bytes", "collective_bytes_per_step"} <= set(s)
  assert s["peak_memory_bytes"] > 0 and s["peak_memory_source"] == "process_rss"
  recs = _records(tmp_path)
  events = [r for r in recs if r.get("event") == "anomaly"]
  assert events[0]["step"] == BAD_STEP and events[0]["action"] == "log"
  assert events[0]["reason"].startswith(f"step {BAD_STEP}: loss became nan")
  logs = [r for r in recs if "samples_per_s" in r and "step" in r]
  assert [r["step"] for r in logs] == [5, 10, 15, 20, 25, 30]     # trained to the end
  assert math.isfinite(logs[1]["loss"]) and math.isnan(logs[-1]["loss"])

  ea = EventAccumulator(str(tmp_path / "tensorboard"))
  ea.Reload()
  tags = set(ea.Tags()["scalars"])
  assert {"loss", "train_auc", "samples_per_s", "grad_norm/bottom", "grad_norm/top",
          "grad_norm/embedding", "nonfinite", "anomalies", "time/input_wait_ms",
          "time/device_wait_ms", "time/host_ms", "hot_row_share", "memory/bytes_in_use",
          "memory/peak_bytes", "embedding_overflow", "final/test_auc"} <= tags, tags
  loss = {e.step: e.value for e in ea.Scalars("loss")}
  assert set(loss) == {5, 10}                               # NaN points are left out
  assert loss[10] == pytest.approx(logs[1]["loss"], rel=1e-6)
  auc = {e.step: e.value for e in ea.Scalars("train_auc")}
  assert auc[5] == pytest.approx(logs[0]["train_auc"], rel=1e-6)
  assert any(t.startswith("reason") for t in ea.Tags()["tensors"])   # the anomaly's text


def test_nan_batch_with_action_stop_raises_naming_step_and_metric(tmp_path, poisoned):
  c = tiny_config(anomaly_action="stop")
  c.checkpoint.enabled = False
  c.embedding.dynamic = True                 # dynamic tables: their stats are monitors too
  with pytest.raises(AnomalyStop, match=rf"stopped at step {BAD_STEP}: loss became nan"):
    loop.train_and_evaluate(c, str(tmp_path))
  logs = [r for r in _records(tmp_path) if "samples_per_s" in r]
  assert [r["step"] for r in logs] == [5, 10]
  tables = {k.split("/")[1] for k in logs[0] if k.endswith("/load_factor")}
  assert len(tables) == 4
  # Admissions and evictions are summed over each record's window: rows held = all admitted
  # so far less all evicted.
  held = np.cumsum([r["dynamic/admitted"] - r["dynamic/evicted"] for r in logs])
  assert held.tolist() == [r["dynamic/size"] for r in logs] and held[0] > 0
  assert all(r["dynamic/rejected"] >= 0 and 0 < r["dynamic/t_C1/load_factor"] <= 1 for r in logs)


def test_nan_batch_with_action_rollback_restores_and_skips_the_window(tmp_path, monkeypatch):
  c = tiny_config(anomaly_action="rollback")
  _edit_stream(monkeypatch, poison=(BAD_STEP - 1) * B)
  s = loop.train_and_evaluate(c, str(tmp_path))
  recs = _records(tmp_path)
  events = [r["event"] for r in recs if "event" in r]
  assert events[0] == "anomaly"
  assert (f"step {BAD_STEP}: loss became nan" in events[1]
          and "rolled back to version 10" in events[1]
          and f"skipped the data from {{'example': {10 * B}}} to {{'example': {BAD_STEP * B}}}"
          in events[1]), events
  # Steps 11..13 are undone and their 3 batches skipped: the run ends 3 steps short.
  last = max(v.step for v in list_versions(str(tmp_path / "checkpoints")))
  assert last == 30 - 3
  assert s["anomalous_steps"] == 1
  assert all(math.isfinite(r["loss"]) for r in recs if "samples_per_s" in r)
  # Reference: a clean run that never sees the batches of steps 11..13: the same model exactly.
  _edit_stream(monkeypatch, skip=[i * B for i in range(10, BAD_STEP)])
  c.checkpoint.enabled = False
  ref = loop.train_and_evaluate(c, str(tmp_path / "reference"))
  assert (s["test_auc"], s["test_logloss"]) == (ref["test_auc"], ref["test_logloss"])
