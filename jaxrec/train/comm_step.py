"""The sparse train step with the dense-gradient all-reduce under our control.

In the plain step (``step.make_train_step``) the dense part is auto-sharded and XLA inserts a
flat fp32 all-reduce. Here the embedding lookup runs as before (its custom_vjp applies the
sparse update), and the dense part runs in a ``jax.shard_map`` over every mesh axis: each
device computes the loss on its local batch with replicated parameters, and the parameter
gradients are summed with ``config.comm``'s method and precision (error-feedback residual in
and out); the feature gradients it returns feed the lookup's VJP.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.comm import allreduce
from jaxrec.comm.spec import CommSpec
from jaxrec.monitoring.step_metrics import step_monitor_metrics
from jaxrec.train import tasks
from jaxrec.train.state import TrainState


def residual_size(params, num_devices: int, spec: CommSpec) -> int:
  n = ravel_pytree(params)[0].shape[0]
  return allreduce.padded_size(n, num_devices, spec.block_size)


def init_comm_state(params, emb, spec: CommSpec):
  """The TrainState.comm of ``spec``: a zero residual per device ([devices, n] float32, split
  over the mesh) when the dense all-reduce is lossy, else None."""
  if not spec.error_feedback:
    return None
  n = residual_size(params, emb.num_devices, spec)
  return {"dense_residual": jax.device_put(jnp.zeros((emb.num_devices, n), jnp.float32),
                                           NamedSharding(emb.mesh, P(emb.axes)))}


def make_comm_train_step(graphdef, emb, tx: optax.GradientTransformation, spec: CommSpec,
                         forward: Callable, monitors=None, task_weights=None) -> Callable:
  """``forward(graphdef, params, feats, dense, num_tasks) -> logits`` is the step's model
  call; ``monitors``: a ``StepMonitors`` (the step then also returns the monitor values);
  ``task_weights``: as in ``jaxrec.train.tasks``."""
  if getattr(emb, "is_dynamic", False):
    raise ValueError("config.comm: a controlled dense all-reduce (dense_allreduce="
                     f"{spec.dense_allreduce!r}, dense_precision={spec.dense_precision!r}) is "
                     "wired for ShardedEmbedding only; use the defaults with dynamic tables")
  axes, nd = emb.axes, emb.num_devices
  spec_b = P(axes)

  def local(params, feats, dense, labels, residual, step):
    def loss_fn(params, feats):
      logits = forward(graphdef, params, feats, dense, tasks.num_tasks(task_weights))
      return tasks.task_loss(logits, labels, task_weights), logits

    (loss, logits), (g_params, g_feats) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, feats)
    g_flat, unravel = ravel_pytree(g_params)
    n = g_flat.shape[0]
    if spec.error_feedback:
      key = None
      if spec.stochastic_rounding:
        key = jax.random.fold_in(jax.random.key(0x5EED), step)
      padded = jnp.pad(g_flat.astype(jnp.float32), (0, residual.shape[1] - n))
      summed, new_res = allreduce.compressed_allreduce(
          padded, residual[0], axes, method=spec.dense_allreduce,
          precision=spec.dense_precision, block_size=spec.block_size, key=key)
      summed, residual = summed[:n], new_res[None]
    else:
      summed = allreduce.allreduce(g_flat, axes, spec.dense_allreduce)
    # The global loss is the mean of the devices' local means (equal local batches).
    g_params = unravel((summed / nd).astype(g_flat.dtype))
    g_feats = [g / nd for g in g_feats]
    return jax.lax.pmean(loss, axes), logits, g_params, g_feats, residual

  def train_step(state: TrainState, batch: dict):
    step = state.step + 1
    feats, emb_vjp, stats = jax.vjp(
        lambda e: emb.lookup(e, batch["ids"], batch["mask"], step), state.emb, has_aux=True)
    if spec.error_feedback:
      if not state.comm or "dense_residual" not in state.comm:
        raise ValueError("config.comm.dense_precision="
                         f"{spec.dense_precision!r} needs TrainState.comm from "
                         "jaxrec.train.comm_step.init_comm_state (the error-feedback residual)")
      residual = state.comm["dense_residual"]
    else:
      residual = jnp.zeros((nd, 1), jnp.float32)  # unused placeholder
    feat_specs = [spec_b] * len(feats)
    fn = jax.shard_map(
        local, mesh=emb.mesh,
        in_specs=(P(), feat_specs, spec_b, spec_b, spec_b, P()),
        out_specs=(P(), spec_b, P(), feat_specs, spec_b),
        # The all-gathered sum is the same on every device, which the vma types cannot see.
        check_vma=False)
    loss, logits, g_params, g_feats, residual = fn(state.params, list(feats), batch["dense"],
                                           batch["labels"], residual, step)
    (emb_state,) = emb_vjp(g_feats)
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    comm = {**state.comm, "dense_residual": residual} if spec.error_feedback else state.comm
    metrics = {
        "loss": loss,
        "dense_grad_norm": optax.tree.norm(g_params),
        "embedding_overflow": stats[0],
        "invalid_ids": stats[1],
    }
    if monitors is not None:
      first = lambda x: x[:, 0] if x.ndim == 2 else x   # the monitors follow task 0
      metrics |= step_monitor_metrics(monitors, loss, first(logits), first(batch["labels"]),
                                      g_params, g_feats)
    return TrainState(step, params, opt_state, emb_state, comm), metrics

  return train_step
