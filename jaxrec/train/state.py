"""The complete train state: everything a snapshot must hold to resume exactly."""

from __future__ import annotations

import flax.struct
import jax

from jaxrec.embedding.stacked import EmbeddingState


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: optimizer steps taken
  params: object             # nnx.State of the dense model
  opt_state: object          # optax state of the dense part
  emb: EmbeddingState        # tables and sparse optimizer slots
