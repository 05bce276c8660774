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


def state_shardings(state: TrainState, emb) -> TrainState:
  """Dense parameters and their optimizer state replicated; tables and slots as the engine
  lays them out (``emb`` is a ShardedEmbedding)."""
  rep = NamedSharding(emb.mesh, P())
  return TrainState(rep, jax.tree.map(lambda _: rep, state.params),
                    jax.tree.map(lambda _: rep, state.opt_state), emb.state_shardings())


def place_state(state: TrainState, emb) -> TrainState:
  """The state moved onto the engine's mesh in its sharded layout."""
  return jax.device_put(state, state_shardings(state, emb))
