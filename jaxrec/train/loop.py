"""The training loop: build from a config, train with progress, evaluate, report."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxrec.data.prefetch import Prefetcher
from jaxrec.train import builders, metrics
from jaxrec.distributed.mesh import make_mesh
from jaxrec.train.state import TrainState, place_state
from jaxrec.train.step import jit_steps


class MetricWriter:
  """Appends one JSON object per line to ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: str | None):
    self._f = None
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      self._f = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

  def write(self, **record):
    if self._f:
      self._f.write(json.dumps(record, default=float) + "\n")

  def close(self):
    if self._f:
      self._f.close()


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _say(msg: str):
  print(msg, flush=True)


def _data_sources(config):
  d = config.data
  if d.source != "synthetic":
    raise ValueError(f"config.data.source={d.source!r}: only 'synthetic' is wired into the "
                     "trainer so far")
  stream = builders.synthetic_stream(d)
  return stream, stream.config.cardinalities


def init_state(config, emb, model, tx) -> tuple:
  graphdef, params = nnx.split(model, nnx.Param)
  emb_state = emb.init(jax.random.key(config.seed + 1))
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), emb_state)


def evaluate(eval_fn, state, batches, to_device) -> tuple[np.ndarray, np.ndarray]:
  preds, labels = [], []
  for b in batches:
    preds.append(np.asarray(eval_fn(state, to_device(b))))
    labels.append(b.labels)
  return np.concatenate(labels), np.concatenate(preds)


def _held_out(config, stream, eval_step, state, to_device) -> dict:
  """AUC and logloss on the held-out examples (the final evaluation's, mid-run)."""
  d = config.data
  start, eb = int(d.get("eval_start") or d.train_examples), int(d.eval_batch_size)
  labels, preds = evaluate(eval_step, state,
                           stream.batches(eb, start, start + (int(d.eval_examples) // eb) * eb),
                           to_device)
  return {"auc": metrics.auc(labels, preds), "logloss": metrics.logloss(labels, preds)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _open_checkpoints(config, workdir, emb, state):
  """(checkpointer, anomaly guard, state, step, example position): resumes from the newest
  complete snapshot in ``workdir/checkpoints`` when there is one. Without a workdir, or with
  checkpoint.enabled False, nothing is saved and training starts at step 0."""
  ck = config.get("checkpoint") or {}
  if not workdir or not ck.get("enabled", True):
    return None, None, state, 0, 0
  from jaxrec import checkpoint as ckpt_lib
  ckpt = ckpt_lib.Checkpointer(
      ckpt_lib.checkpoint_dir(workdir),
      ckpt_lib.SnapshotOptions(save_every_steps=int(ck.get("every_steps", 1000)),
                               keep_latest=int(ck.get("keep", 3)),
                               incremental=bool(ck.get("incremental", True))),
      layouts={"emb": ckpt_lib.layout_for(emb)})
  fresh = not ckpt.versions()
  r = ckpt.restore_or_init(state)
  for line in r.report:
    _say(f"checkpoint: {line}")
  step = int(r.step or 0)
  pos = int((r.data_position or {}).get("example", 0))
  if not fresh:
    _say(f"checkpoint: resumed from step {step} (example {pos:,}) in {ckpt_lib.checkpoint_dir(workdir)}")
  if fresh:  # a version to roll back to exists from the first step on
    ckpt.save(step, r.state, data_position={"example": pos}, force=True)
  guard = None
  if ck.get("auto_rollback", True):
    guard = ckpt_lib.AnomalyGuard(
        ckpt, ckpt_lib.GuardOptions(spike_factor=float(ck.get("spike_factor", 10.0))))
  return ckpt, guard, r.state, step, pos


def train_and_evaluate(config, workdir: str | None = None) -> dict:
  """Trains the configured model on its data and returns the final summary."""
  d = config.data
  stream, cards = _data_sources(config)
  layout = stream.layout
  steps = int(d.train_examples // d.batch_size)
  if steps < 1:
    raise ValueError(f"config.data.train_examples={d.train_examples} is smaller than one batch "
                     f"({d.batch_size})")
  mesh_cfg = config.get("mesh") or {}
  mesh = make_mesh(mesh_cfg.get("shape"), mesh_cfg.get("axis_names"))
  emb = builders.embedding_plan(layout, cards, config.embedding, config.model.embedding_dim,
                                mesh=mesh, batch_size=d.batch_size)
  model = builders.build_model(config.model, d.num_dense, layout.num_features, config.seed)
  tx = builders.dense_optimizer(config.optimizer, steps)
  graphdef, state = init_state(config, emb, model, tx)
  state = place_state(state, emb)
  train_step, eval_step = jit_steps(graphdef, emb, tx, state)
  writer = MetricWriter(workdir)
  table_rows = sum(t.rows or t.dynamic.capacity for t in emb.table_specs.values())
  _say(f"jaxrec: {config.model.name} on {d.source}/{d.preset}: {layout.num_features} sparse "
       f"features, {table_rows:,} embedding rows x {config.model.embedding_dim}, "
       f"{steps:,} steps x batch {d.batch_size:,} on {jax.devices()[0].platform} "
       f"(mesh {dict(mesh.shape)})")
  if mesh.size > 1:
    _say(f"embedding sharding plan:\n{emb.plan.describe()}")

  dropped = tuple(d.get("drop_features", ()) or ())
  if dropped:
    _say(f"dropping sparse features {list(dropped)} (their bags are empty)")
  to_device = lambda b: builders.device_batch(
      emb.check_batch(b.without_features(layout, dropped) if dropped else b))
  example = to_device(stream.examples(0, d.batch_size))
  t0 = time.perf_counter()
  compiled = train_step.lower(state, example).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    logging.info("train_step memory: temp %.1f MiB, args %.1f MiB",
                 mem.temp_size_in_bytes / 2**20, mem.argument_size_in_bytes / 2**20)
  _say(f"compiled train step in {time.perf_counter() - t0:.1f}s")

  ckpt, guard, state, step, pos = _open_checkpoints(config, workdir, emb, state)
  end = steps * d.batch_size
  put = lambda b: jax.device_put(to_device(b), emb.batch_sharding)
  log_every = max(1, int(config.log_every_steps))
  # Held-out AUC during training (AUC-vs-steps curves); its time is not training time.
  eval_every, eval_seconds = int(config.get("eval_every_steps") or 0), 0.0
  t_start = time.perf_counter()
  t_last, step_last, step_start = t_start, step, step
  while pos + d.batch_size <= end:          # more than one pass only after a rollback
    source = Prefetcher(stream.batches(d.batch_size, pos, end), put, depth=4)
    rolled_back = False
    try:
      for batch in source:
        state, m = compiled(state, batch)
        step += 1
        pos += d.batch_size
        if guard is not None:
          act = guard.observe(step, m, {"example": pos})
          if act.kind == "abort":
            raise FloatingPointError(act.reason)
          if act.kind == "rollback":
            r = guard.recover(act, _abstract(state))
            state, step, pos = r.state, int(r.step), int(r.data_position["example"])
            _say(f"checkpoint: {r.report[-1]}")
            writer.write(step=step, event=r.report[-1])
            t_last, step_last = time.perf_counter(), step
            rolled_back = True
            break
        if ckpt is not None:
          ckpt.save(step, state, data_position={"example": pos})   # async; the policy decides
        if step % log_every == 0 or step == steps:
          loss = float(m["loss"])  # syncs; only on log steps
          now = time.perf_counter()
          rate = (step - step_last) * d.batch_size / max(now - t_last, 1e-9)
          eta = (steps - step) * d.batch_size / max(rate, 1e-9)
          _say(f"step {step:>6,}/{steps:,}  loss {loss:.4f}  {rate:>9,.0f} samples/s  "
               f"ETA {_fmt_time(eta)}")
          writer.write(step=step, loss=loss, samples_per_s=rate,
                       **{k: float(v) for k, v in m.items() if k != "loss"})
          if not np.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}")
          t_last, step_last = now, step
        if eval_every and step % eval_every == 0 and step < steps:
          jax.block_until_ready(state)
          t_eval = time.perf_counter()
          writer.write(step=step, **{f"eval/{k}": v for k, v in
                                     _held_out(config, stream, eval_step, state, to_device).items()})
          t_eval = time.perf_counter() - t_eval
          eval_seconds, t_last = eval_seconds + t_eval, t_last + t_eval
    finally:
      source.close()
    if not rolled_back:
      break
  jax.block_until_ready(state)
  train_time = time.perf_counter() - t_start - eval_seconds
  samples_per_s = max(steps - step_start, 0) * d.batch_size / max(train_time, 1e-9)

  eval_start = int(d.get("eval_start") or d.train_examples)
  eval_n = int(d.eval_examples)
  eb = int(d.eval_batch_size)
  labels, preds = evaluate(eval_step, state,
                           stream.batches(eb, eval_start, eval_start + (eval_n // eb) * eb),
                           to_device)
  teacher = stream.teacher_probability(eval_start, eval_start + len(labels))
  summary = {
      "test_auc": metrics.auc(labels, preds),
      "test_logloss": metrics.logloss(labels, preds),
      "bayes_auc": metrics.auc(labels, teacher),
      "bayes_logloss": metrics.logloss(labels, teacher),
      "constant_logloss": metrics.logloss(labels, np.full_like(preds, labels.mean())),
      "samples_per_s": samples_per_s,
      "steps": steps,
      "train_examples": steps * d.batch_size,
      "eval_examples": int(len(labels)),
      "train_seconds": train_time,
  }
  writer.write(step=steps, **{f"final/{k}": v for k, v in summary.items()})
  writer.close()
  if ckpt is not None:
    ckpt.save(step, state, data_position={"example": pos},
              metrics={"auc": summary["test_auc"]}, force=True)
    ckpt.wait_until_finished()
    ckpt.close()
  _say(f"test AUC {summary['test_auc']:.4f}  vs  Bayes-optimal AUC {summary['bayes_auc']:.4f} "
       f"(gap {summary['bayes_auc'] - summary['test_auc']:.4f}; constant predictor 0.5000) | "
       f"logloss {summary['test_logloss']:.4f} (Bayes {summary['bayes_logloss']:.4f}, constant "
       f"{summary['constant_logloss']:.4f}) | {samples_per_s:,.0f} samples/s")
  return summary
