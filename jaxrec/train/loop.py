"""The training loop: build from a config, train with progress, evaluate, report."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxrec.data.prefetch import Prefetcher
from jaxrec.distributed import data as dist_data
from jaxrec.monitoring import Monitor, MonitorOptions
from jaxrec.monitoring.writers import JsonlWriter as MetricWriter  # noqa: F401 (its old home)
from jaxrec.train import builders, metrics, sources, tasks
from jaxrec.distributed.mesh import make_mesh
from jaxrec.train.state import TrainState, place_state
from jaxrec.train.step import jit_steps
from jaxrec.comm.spec import CommSpec
from jaxrec.train.comm_step import init_comm_state


def _say(msg: str):
  if dist_data.is_main_process():   # one voice in multi-process runs
    print(msg, flush=True)


def _data_sources(config):
  """(synthetic stream, vocabularies) of a generator-sourced config, for the benchmarks that
  build their own steps (the loop itself reads ``sources.open_data``)."""
  if config.data.source != "synthetic":
    raise ValueError(f"config.data.source={config.data.source!r}: this entry point reads the "
                     "synthetic stream only")
  data = sources.SyntheticData(config.data)
  return data.stream, data.cardinalities


def init_state(config, emb, model, tx) -> tuple:
  graphdef, params = nnx.split(model, nnx.Param)
  emb_state = emb.init(jax.random.key(config.seed + 1))
  comm = init_comm_state(params, emb, CommSpec.from_config(config.get("comm")))
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), emb_state,
                              comm)


def evaluate(eval_fn, state, batches, to_device) -> tuple[np.ndarray, np.ndarray]:
  """(labels, predictions) of the whole eval set, on every process (each feeds its rows)."""
  preds, labels = [], []
  for b in batches:
    batch = to_device(b)
    preds.append(dist_data.to_host(eval_fn(state, batch)))
    labels.append(dist_data.to_host(batch["labels"]))
  return np.concatenate(labels), np.concatenate(preds)


def _held_out(data, eval_step, state, eval_batch_size, rows, put) -> dict:
  """AUC and logloss of task 0 on the held-out examples (the final evaluation's, mid-run)."""
  labels, preds = evaluate(eval_step, state, data.eval_batches(eval_batch_size, rows), put)
  first = lambda x: x[:, 0] if x.ndim == 2 else x
  return {"auc": metrics.auc(first(labels), first(preds)),
          "logloss": metrics.logloss(first(labels), first(preds))}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _open_checkpoints(config, workdir, emb, state, data):
  """(checkpointer, state, step, example position): resumes from the newest complete snapshot
  in ``workdir/checkpoints`` when there is one. Without a workdir, or with checkpoint.enabled
  False, nothing is saved and training starts at step 0."""
  ck = config.get("checkpoint") or {}
  if not workdir or not ck.get("enabled", True):
    return None, state, 0, 0
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
  data.resume_from(r.data_position)
  if not fresh:
    _say(f"checkpoint: resumed from step {step} (example {pos:,}) in {ckpt_lib.checkpoint_dir(workdir)}")
  if fresh:  # a version to roll back to exists from the first step on
    ckpt.save(step, r.state, data_position=data.position(pos), force=True)
  return ckpt, r.state, step, pos


def train_and_evaluate(config, workdir: str | None = None) -> dict:
  """Trains the configured model on its data and returns the final summary."""
  d = config.data
  data = sources.open_data(config)
  layout, cards = data.layout, data.cardinalities
  steps = int(data.train_examples // d.batch_size)
  if steps < 1:
    raise ValueError(f"config.data.train_examples={data.train_examples} is smaller than one "
                     f"batch ({d.batch_size})")
  mesh_cfg = config.get("mesh") or {}
  mesh = make_mesh(mesh_cfg.get("shape"), mesh_cfg.get("axis_names"))
  comm = CommSpec.from_config(config.get("comm"))
  emb = builders.embedding_plan(layout, cards, config.embedding, config.model.embedding_dim,
                                mesh=mesh, batch_size=d.batch_size, comm=comm)
  model = builders.build_model(config.model, d.num_dense, layout.num_features, config.seed)
  tx = builders.dense_optimizer(config.optimizer, steps)
  graphdef, state = init_state(config, emb, model, tx)
  state = place_state(state, emb)
  monitor_options = MonitorOptions.from_config(config)
  # None: one task; (w_0, ..., w_T-1): fit T label columns (jaxrec/train/tasks.py).
  task_weights = tuple(config.model.get("task_weights") or ()) or None
  train_step, eval_step = jit_steps(graphdef, emb, tx, state, comm=comm,
                                    monitors=monitor_options.step_monitors(),
                                    task_weights=task_weights)
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
  # Shapes only: a multi-process jit cannot take host numpy arrays for sharded inputs.
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         to_device(data.example(d.batch_size)))
  t0 = time.perf_counter()
  compiled = train_step.lower(state, example).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    logging.info("train_step memory: temp %.1f MiB, args %.1f MiB",
                 mem.temp_size_in_bytes / 2**20, mem.argument_size_in_bytes / 2**20)
  _say(f"compiled train step in {time.perf_counter() - t0:.1f}s")

  ckpt, state, step, pos = _open_checkpoints(config, workdir, emb, state, data)
  end = steps * d.batch_size
  # Each process makes only its rows of every global batch (all of them with one process).
  multi = jax.process_count() > 1
  rows = dist_data.process_rows(emb.batch_sharding, d.batch_size) if multi else None
  put = lambda b: dist_data.to_global(to_device(b), emb.batch_sharding, d.batch_size)
  table_index = {t: i for i, t in enumerate(emb.table_specs)}
  feature_table = {f.name: table_index[f.table] for f in emb.features}
  monitor = Monitor(monitor_options, workdir=workdir if dist_data.is_main_process() else None,
                    total_steps=steps,
                    batch_size=d.batch_size, compiled=compiled, checkpointer=ckpt, say=_say,
                    column_tables=np.repeat([feature_table[n] for n in layout.names],
                                            layout.max_ids))
  eb = int(d.eval_batch_size)
  eval_rows = dist_data.process_rows(emb.batch_sharding, eb) if multi else None
  eval_put = lambda b: dist_data.to_global(to_device(b), emb.batch_sharding, eb)
  # Held-out AUC during training (AUC-vs-steps curves); its time is not training time.
  eval_every, eval_seconds = int(config.get("eval_every_steps") or 0), 0.0
  t_start = time.perf_counter()
  step_start = step
  while pos + d.batch_size <= end:          # more than one pass only after a rollback
    source = Prefetcher(data.train_batches(pos, end, rows), put, depth=4)
    rolled_back = False
    try:
      for batch in monitor.timed(source):
        state, m = compiled(state, batch)
        step += 1
        pos += d.batch_size
        act = monitor.after_step(step, m, batch, data.position(pos),
                                 last=pos + d.batch_size > end,
                                 save_due=ckpt is not None and ckpt.should_save(step))
        if act.kind == "rollback":
          r = monitor.guard.recover(act, _abstract(state))
          state, step, pos = r.state, int(r.step), int(r.data_position["example"])
          _say(f"checkpoint: {r.report[-1]}")
          monitor.event(step, r.report[-1])
          rolled_back = True
          break
        if ckpt is not None:
          ckpt.save(step, state, data_position=data.position(pos))   # async; the policy decides
        if eval_every and step % eval_every == 0 and step < steps:
          jax.block_until_ready(state)
          t_eval = time.perf_counter()
          monitor.write(step, **{f"eval/{k}": v for k, v in _held_out(
              data, eval_step, state, eb, eval_rows, eval_put).items()})
          eval_seconds += time.perf_counter() - t_eval
    finally:
      source.close()
    if not rolled_back:
      break
  jax.block_until_ready(state)
  train_time = time.perf_counter() - t_start - eval_seconds
  samples_per_s = max(steps - step_start, 0) * d.batch_size / max(train_time, 1e-9)

  labels, preds = evaluate(eval_step, state, data.eval_batches(eb, eval_rows), eval_put)
  teacher = data.eval_teacher(len(labels))  # None: no known teacher (real data)
  summary = {
      **tasks.summary(labels, preds, teacher),   # test_auc etc.: task 0 (click); then per task
      "samples_per_s": samples_per_s,
      "steps": steps,
      "train_examples": steps * d.batch_size,
      "eval_examples": int(len(labels)),
      "train_seconds": train_time,
      **monitor.summary(),
  }
  monitor.write(steps, **{f"final/{k}": v for k, v in summary.items()})
  monitor.close()
  if ckpt is not None:
    ckpt.save(step, state, data_position=data.position(pos),
              metrics={"auc": summary["test_auc"]}, force=True)
    ckpt.wait_until_finished()
    ckpt.close()
  if teacher is None:
    _say(f"test AUC {summary['test_auc']:.4f} (constant predictor 0.5000) | logloss "
         f"{summary['test_logloss']:.4f} (constant {summary['constant_logloss']:.4f}) | "
         f"{samples_per_s:,.0f} samples/s")
  else:
    _say(f"test AUC {summary['test_auc']:.4f}  vs  Bayes-optimal AUC {summary['bayes_auc']:.4f} "
         f"(gap {summary['bayes_auc'] - summary['test_auc']:.4f}; constant predictor 0.5000) | "
         f"logloss {summary['test_logloss']:.4f} (Bayes {summary['bayes_logloss']:.4f}, constant "
         f"{summary['constant_logloss']:.4f}) | {samples_per_s:,.0f} samples/s")
  for t in range(1, tasks.num_tasks(task_weights)):
    k = tasks.task_name(t)
    bayes = summary[f"bayes_auc_{k}"]
    _say(f"{k}: test AUC {summary[f'test_auc_{k}']:.4f}"
         + ("" if bayes is None else f"  vs  Bayes-optimal AUC {bayes:.4f}")
         + f" | logloss {summary[f'test_logloss_{k}']:.4f}")
  return summary
