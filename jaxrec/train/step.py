"""Pure train and eval steps. No I/O, no Python branching on data."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrec.embedding.stacked import StackedEmbedding
from jaxrec.train.state import TrainState


def _forward(graphdef, emb: StackedEmbedding, params, gathered, batch):
  model = nnx.merge(graphdef, params)
  pooled = jnp.stack(emb.pool(gathered, batch["mask"]), axis=1)
  return model(batch["dense"], pooled)[:, 0].astype(jnp.float32)


def make_train_step(graphdef, emb: StackedEmbedding, tx: optax.GradientTransformation
                    ) -> Callable:
  def train_step(state: TrainState, batch: dict):
    rows = emb.rows(batch["ids"])
    gathered = emb.gather(state.emb, rows)

    def loss_fn(params, gathered):
      logits = _forward(graphdef, emb, params, gathered, batch)
      return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean()

    loss, (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state.params, gathered)
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    emb_state = emb.apply_gradients(state.emb, rows, g_rows, batch["mask"], step)
    metrics = {
        "loss": loss,
        "dense_grad_norm": optax.global_norm(g_params),
        "embedding_grad_norm": optax.global_norm(g_rows),
    }
    return TrainState(step, params, opt_state, emb_state), metrics

  return train_step


def make_eval_step(graphdef, emb: StackedEmbedding) -> Callable:
  def eval_step(state: TrainState, batch: dict):
    rows = emb.rows(batch["ids"])
    gathered = emb.gather(state.emb, rows)
    return jax.nn.sigmoid(_forward(graphdef, emb, state.params, gathered, batch))

  return eval_step
