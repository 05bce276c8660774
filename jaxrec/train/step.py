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

from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.train.state import TrainState, state_shardings


def _forward(graphdef, params, feats, dense):
  model = nnx.merge(graphdef, params)
  return model(dense, jnp.stack(feats, axis=1))[:, 0].astype(jnp.float32)


def make_dynamic_train_step(graphdef, emb, tx: optax.GradientTransformation) -> Callable:
  """The step for a ``DynamicEmbedding``: its forward inserts and evicts (integer state, no
  custom_vjp), so the step differentiates w.r.t. the features and calls its ``update``. A
  ``MixedEmbedding`` also has static tables: their lookup runs inside the loss, and the
  gradient w.r.t. their state is the updated state (the custom_vjp of ``make_train_step``)."""
  mixed = getattr(emb, "is_mixed", False)

  def train_step(state: TrainState, batch: dict):
    step = state.step + 1
    emb_state, feats, res, stats = emb.forward_train(state.emb, batch["ids"], batch["mask"],
                                                     step)

    def loss_fn(params, feats, static):
      s_stats = jnp.zeros((2,), jnp.int32)
      if mixed:  # every feature in model order; the static lookup's VJP updates `static`
        feats, s_stats = emb.static_lookup(static, feats, batch["ids"], batch["mask"], step)
      logits = _forward(graphdef, params, feats, batch["dense"])
      return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(), s_stats

    (loss, s_stats), (g_params, g_feats, static) = jax.value_and_grad(
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
    }
    return TrainState(step, params, opt_state, emb_state), metrics

  return train_step


def make_train_step(graphdef, emb: ShardedEmbedding, tx: optax.GradientTransformation
                    ) -> Callable:
  if getattr(emb, "is_dynamic", False):
    return make_dynamic_train_step(graphdef, emb, tx)

  def train_step(state: TrainState, batch: dict):
    step = state.step + 1

    def loss_fn(params, emb_state):
      feats, stats = emb.lookup(emb_state, batch["ids"], batch["mask"], step)
      logits = _forward(graphdef, params, feats, batch["dense"])
      return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(), stats

    (loss, stats), (g_params, emb_state) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.emb)
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "dense_grad_norm": optax.tree.norm(g_params),
        "embedding_overflow": stats[0],   # requests dropped by full buckets (0 by default)
        "invalid_ids": stats[1],          # out-of-range IDs of index tables, treated as padding
    }
    return TrainState(step, params, opt_state, emb_state), metrics

  return train_step


def make_eval_step(graphdef, emb: ShardedEmbedding) -> Callable:
  def eval_step(state: TrainState, batch: dict):
    feats, _, _ = emb.forward(state.emb, batch["ids"], batch["mask"])
    return jax.nn.sigmoid(_forward(graphdef, state.params, feats, batch["dense"]))

  return eval_step


def jit_steps(graphdef, emb: ShardedEmbedding, tx: optax.GradientTransformation,
              state: TrainState):
  """(train_step, eval_step) jitted with explicit shardings; train donates the state."""
  sh = state_shardings(state, emb)
  rep = NamedSharding(emb.mesh, P())
  train = jax.jit(make_train_step(graphdef, emb, tx), in_shardings=(sh, emb.batch_sharding),
                  out_shardings=(sh, rep), donate_argnums=0)
  evaluate = jax.jit(make_eval_step(graphdef, emb), in_shardings=(sh, emb.batch_sharding),
                     out_shardings=emb.batch_sharding)
  return train, evaluate
