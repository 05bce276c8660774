"""Pure train and eval steps. No I/O, no Python branching on data.

The embedding lookup is a custom_vjp whose backward applies the sparse optimizer and returns
the updated tables as the "gradient" of the embedding state (jax-tpu-embedding's scheme), so
one ``value_and_grad`` over (dense params, embedding state) yields the dense gradients and the
new embedding state together: no second code path for the sparse update in the step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.comm.spec import CommSpec
from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.train.comm_step import make_comm_train_step
from jaxrec.monitoring.step_metrics import StepMonitors, step_monitor_metrics
from jaxrec.train import tasks
from jaxrec.train.state import TrainState, state_shardings


def _forward(graphdef, params, feats, dense, num_tasks: int = 1):
  """Logits [B] (one task) or [B, num_tasks]; see jaxrec/train/tasks.py."""
  model = nnx.merge(graphdef, params)
  logits = model(dense, jnp.stack(feats, axis=1)).astype(jnp.float32)
  return tasks.task_logits(logits, num_tasks)


def _task0(x):
  """The first task's column (the monitors follow the click task)."""
  return x[:, 0] if x.ndim == 2 else x


def make_dynamic_train_step(graphdef, emb, tx: optax.GradientTransformation,
                            monitors: StepMonitors | None = None,
                            task_weights=None) -> Callable:
  """The step for a ``DynamicEmbedding``: its forward inserts and evicts (integer state, no
  custom_vjp), so the step differentiates w.r.t. the features and calls its ``update``. A
  ``MixedEmbedding`` also has static tables: their lookup runs inside the loss, and the
  gradient w.r.t. their state is the updated state (the custom_vjp of ``make_train_step``)."""
  mixed = getattr(emb, "is_mixed", False)

  def train_step(state: TrainState, batch: dict):
    step = state.step + 1
    emb_state, feats, res, stats = emb.forward_train(state.emb, batch["ids"], batch["mask"],
                                                     step)

    n = tasks.num_tasks(task_weights)

    def loss_fn(params, feats, static):
      s_stats = jnp.zeros((2,), jnp.int32)
      if mixed:  # every feature in model order; the static lookup's VJP updates `static`
        feats, s_stats = emb.static_lookup(static, feats, batch["ids"], batch["mask"], step)
      logits = _forward(graphdef, params, feats, batch["dense"], n)
      return tasks.task_loss(logits, batch["labels"], task_weights), (logits, s_stats)

    (loss, (logits, s_stats)), (g_params, g_feats, static) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True)(
            state.params, feats, emb_state["static"] if mixed else None)
    emb_state = emb.update(emb_state, res, g_feats, step)
    if mixed:
      emb_state = {**emb_state, "static": static}
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tables = list(emb.specs)   # the dynamic ones
    metrics = {
        "loss": loss,
        "dense_grad_norm": optax.tree.norm(g_params),
        "embedding_overflow": sum(stats[f"{t}/overflow"] for t in tables) + s_stats[0],
        "invalid_ids": s_stats[1],
        "dynamic/size": sum(stats[f"{t}/size"] for t in tables),  # rows held, all tables
        **{f"dynamic/{k}": v for k, v in stats.items()},
        **{f"dynamic/{k}": sum(stats[f"{t}/{k}"] for t in tables)   # all tables, this step
           for k in ("admitted", "rejected", "evicted", "insert_failures")},
    }
    if monitors is not None:
      metrics |= step_monitor_metrics(monitors, loss, _task0(logits), _task0(batch["labels"]),
                                      g_params, g_feats)
    return TrainState(step, params, opt_state, emb_state, state.comm), metrics

  return train_step


def _loss_fn(graphdef, batch, task_weights=None):
  """(params, pooled features) -> (loss, logits): the (task-weighted) mean logloss."""
  n = tasks.num_tasks(task_weights)
  def loss_fn(params, feats):
    logits = _forward(graphdef, params, feats, batch["dense"], n)
    return tasks.task_loss(logits, batch["labels"], task_weights), logits
  return loss_fn


def make_train_step(graphdef, emb: ShardedEmbedding, tx: optax.GradientTransformation, *,
                    comm: CommSpec | None = None,
                    monitors: StepMonitors | None = None, task_weights=None) -> Callable:
  """``comm``: how dense gradients are all-reduced (None: XLA's flat fp32 psum);
  ``monitors``: also compute the monitor values of ``jaxrec.monitoring.step_metrics``;
  ``task_weights``: None (one task) or one loss weight per task (jaxrec/train/tasks.py)."""
  if comm is not None and not comm.dense_is_default:
    return make_comm_train_step(graphdef, emb, tx, comm, _forward, monitors, task_weights)
  if getattr(emb, "is_dynamic", False):
    return make_dynamic_train_step(graphdef, emb, tx, monitors, task_weights)

  def train_step(state: TrainState, batch: dict):
    step = state.step + 1
    # vjp through the lookup, so the gradient w.r.t. the pooled features is at hand (a
    # monitor); pulling it back through the custom_vjp yields the updated embedding state.
    feats, lookup_vjp, stats = jax.vjp(
        lambda s: emb.lookup(s, batch["ids"], batch["mask"], step), state.emb, has_aux=True)
    (loss, logits), (g_params, g_feats) = jax.value_and_grad(
        _loss_fn(graphdef, batch, task_weights), argnums=(0, 1), has_aux=True)(state.params,
                                                                               feats)
    (emb_state,) = lookup_vjp(g_feats)
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "dense_grad_norm": optax.tree.norm(g_params),
        "embedding_overflow": stats[0],   # requests dropped by full buckets (0 by default)
        "invalid_ids": stats[1],          # out-of-range IDs of index tables, treated as padding
    }
    if monitors is not None:
      metrics |= step_monitor_metrics(monitors, loss, _task0(logits), _task0(batch["labels"]),
                                      g_params, g_feats)
    return TrainState(step, params, opt_state, emb_state, state.comm), metrics

  return train_step


def make_eval_step(graphdef, emb: ShardedEmbedding, num_tasks: int = 1) -> Callable:
  def eval_step(state: TrainState, batch: dict):
    feats, _, _ = emb.forward(state.emb, batch["ids"], batch["mask"])
    return jax.nn.sigmoid(_forward(graphdef, state.params, feats, batch["dense"], num_tasks))

  return eval_step


def jit_steps(graphdef, emb: ShardedEmbedding, tx: optax.GradientTransformation,
              state: TrainState, *, comm: CommSpec | None = None,
              monitors: StepMonitors | None = None, task_weights=None):
  """(train_step, eval_step) jitted with explicit shardings; train donates the state. Eval
  gives probabilities [B], or [B, T] with T = len(task_weights) tasks.
  ``comm``: how the dense gradients are all-reduced (None: XLA's flat fp32 psum)."""
  sh = state_shardings(state, emb)
  rep = NamedSharding(emb.mesh, P())
  train = jax.jit(make_train_step(graphdef, emb, tx, comm=comm, monitors=monitors,
                                  task_weights=task_weights),
                  in_shardings=(sh, emb.batch_sharding), out_shardings=(sh, rep),
                  donate_argnums=0)
  evaluate = jax.jit(make_eval_step(graphdef, emb, tasks.num_tasks(task_weights)),
                     in_shardings=(sh, emb.batch_sharding),
                     out_shardings=emb.batch_sharding)
  return train, evaluate
