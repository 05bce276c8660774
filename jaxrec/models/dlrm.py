"""DLRM (Naumov et al. 2019): bottom MLP on dense features, dot interaction with the pooled
embeddings, top MLP on [bottom output, interactions]."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from jaxrec.models.layers import MLP, concat_fields, dot_interaction


class DLRM(nnx.Module):

  def __init__(self, *, num_dense: int, num_sparse: int, embedding_dim: int,
               bottom_mlp: Sequence[int], top_mlp: Sequence[int], rngs: nnx.Rngs,
               compute_dtype=None, num_tasks: int = 1):
    if bottom_mlp[-1] != embedding_dim:
      raise ValueError(f"DLRM: the bottom MLP must end at the embedding dim ({embedding_dim}), "
                       f"got bottom_mlp={list(bottom_mlp)}")
    if top_mlp[-1] != num_tasks:
      raise ValueError(f"DLRM: the top MLP must end at {num_tasks} output(s), got {list(top_mlp)}")
    self.bottom = MLP(num_dense, bottom_mlp, rngs=rngs, compute_dtype=compute_dtype)
    n = num_sparse + 1
    self.top = MLP(embedding_dim + n * (n - 1) // 2, top_mlp, rngs=rngs,
                   final_activation=False, compute_dtype=compute_dtype)
    self.compute_dtype = compute_dtype

  def __call__(self, dense, sparse):
    """dense [B, num_dense]; sparse [B, num_sparse, D] pooled embeddings -> logits [B, tasks]."""
    x = self.bottom(dense)
    z = concat_fields([x[:, None, :].astype(sparse.dtype), sparse])
    if self.compute_dtype is not None:
      z = z.astype(self.compute_dtype)
    inter = dot_interaction(z)
    return self.top(jnp.concatenate([x.astype(inter.dtype), inter], axis=1))
