"""The complete train state: everything a snapshot must hold to resume exactly."""

from __future__ import annotations

import flax.struct
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.embedding.stacked import EmbeddingState


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: optimizer steps taken
  params: object             # nnx.State of the dense model
  opt_state: object          # optax state of the dense part
  emb: EmbeddingState        # tables and sparse optimizer slots
  comm: object = None        # per-device error-feedback residuals (jaxrec.comm), or None


def state_shardings(state: TrainState, emb) -> TrainState:
  """Dense parameters and their optimizer state replicated; tables and slots as the engine
  lays them out (``emb`` is a ShardedEmbedding); comm residuals one row per device."""
  rep = NamedSharding(emb.mesh, P())
  per_device = NamedSharding(emb.mesh, P(emb.axes))
  return TrainState(rep, jax.tree.map(lambda _: rep, state.params),
                    jax.tree.map(lambda _: rep, state.opt_state), emb.state_shardings(),
                    jax.tree.map(lambda _: per_device, state.comm))


def place_state(state: TrainState, emb) -> TrainState:
  """The state moved onto the engine's mesh in its sharded layout."""
  return jax.device_put(state, state_shardings(state, emb))
