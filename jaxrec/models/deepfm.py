"""DeepFM (Guo et al. 2017): first-order terms + a factorization machine's pairwise term over
the field embeddings + a deep MLP over the same embeddings, summed into one logit per task."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from jaxrec.models.layers import MLP, Dense, FieldLinear, concat_fields, fm_second_order


class DeepFM(nnx.Module):
  """Fields are the F pooled embeddings plus the dense features projected to one more
  D-dim field by the bottom MLP. First order: a linear model over the raw dense features and
  FieldLinear over the field embeddings (the ID's weight is <w_f, E_f[id]>, see FieldLinear).
  The FM term is shared by all tasks."""

  def __init__(self, *, num_dense: int, num_sparse: int, embedding_dim: int,
               bottom_mlp: Sequence[int], top_mlp: Sequence[int], rngs: nnx.Rngs,
               compute_dtype=None, num_tasks: int = 1):
    if bottom_mlp[-1] != embedding_dim:
      raise ValueError(f"DeepFM: the bottom MLP must end at the embedding dim ({embedding_dim}) "
                       f"to make the dense features an FM field, got bottom_mlp={list(bottom_mlp)}")
    if top_mlp[-1] != num_tasks:
      raise ValueError(f"DeepFM: the top MLP must end at {num_tasks} output(s), got {list(top_mlp)}")
    n = num_sparse + 1
    self.bottom = MLP(num_dense, bottom_mlp, rngs=rngs, compute_dtype=compute_dtype)
    self.dense_linear = Dense(num_dense, num_tasks, rngs=rngs)
    self.field_linear = FieldLinear(n, embedding_dim, num_tasks, rngs=rngs)
    self.deep = MLP(n * embedding_dim, top_mlp, rngs=rngs, final_activation=False,
                    compute_dtype=compute_dtype)

  def __call__(self, dense, sparse):
    """dense [B, num_dense]; sparse [B, num_sparse, D] pooled embeddings -> logits [B, tasks]."""
    x = self.bottom(dense)
    v = concat_fields([x[:, None, :], sparse.astype(jnp.float32)])
    first = self.dense_linear(dense) + self.field_linear(v)
    return first + fm_second_order(v) + self.deep(v.reshape(v.shape[0], -1))
