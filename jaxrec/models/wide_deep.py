"""Wide & Deep (Cheng et al. 2016): a linear ("wide") model over the sparse and dense features
plus a deep MLP over the embeddings, summed into one logit per task."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from jaxrec.models.layers import MLP, Dense, FieldLinear


class WideDeep(nnx.Module):
  """The wide part is FieldLinear over the pooled embeddings (an ID's wide weight is
  <w_f, E_f[id]>, read from the table the deep part uses; see FieldLinear) plus a linear model
  over the raw dense features. A separate 1-wide table per feature, or hashed feature crosses,
  would be a truer wide model but needs a second lookup outside the model's interface."""

  def __init__(self, *, num_dense: int, num_sparse: int, embedding_dim: int,
               bottom_mlp: Sequence[int], top_mlp: Sequence[int], rngs: nnx.Rngs,
               compute_dtype=None, num_tasks: int = 1):
    if bottom_mlp[-1] != embedding_dim:
      raise ValueError(f"WideDeep: the bottom MLP must end at the embedding dim ({embedding_dim}), "
                       f"got bottom_mlp={list(bottom_mlp)}")
    if top_mlp[-1] != num_tasks:
      raise ValueError(f"WideDeep: the top MLP must end at {num_tasks} output(s), "
                       f"got {list(top_mlp)}")
    self.wide_dense = Dense(num_dense, num_tasks, rngs=rngs)
    self.wide_sparse = FieldLinear(num_sparse, embedding_dim, num_tasks, rngs=rngs)
    self.bottom = MLP(num_dense, bottom_mlp, rngs=rngs, compute_dtype=compute_dtype)
    self.deep = MLP((num_sparse + 1) * embedding_dim, top_mlp, rngs=rngs, final_activation=False,
                    compute_dtype=compute_dtype)

  def __call__(self, dense, sparse):
    """dense [B, num_dense]; sparse [B, num_sparse, D] pooled embeddings -> logits [B, tasks]."""
    wide = self.wide_dense(dense) + self.wide_sparse(sparse)
    x = jnp.concatenate([self.bottom(dense),
                         sparse.reshape(sparse.shape[0], -1).astype(jnp.float32)], axis=1)
    return wide + self.deep(x)
