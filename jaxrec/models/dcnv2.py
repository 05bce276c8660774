"""DCNv2 (Wang et al. 2021): explicit feature crosses x_{l+1} = x0 * (W x_l + b) + x_l over the
concatenated embeddings, combined with a deep MLP either stacked (cross, then deep) or in
parallel (cross || deep, concatenated)."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from jaxrec.models.layers import MLP, CrossNetwork, Dense

STRUCTURES = ("stacked", "parallel")


class DCNv2(nnx.Module):

  def __init__(self, *, num_dense: int, num_sparse: int, embedding_dim: int,
               bottom_mlp: Sequence[int], top_mlp: Sequence[int], rngs: nnx.Rngs,
               compute_dtype=None, num_tasks: int = 1, num_cross_layers: int = 3,
               structure: str = "stacked", low_rank: int | None = None):
    if bottom_mlp[-1] != embedding_dim:
      raise ValueError(f"DCNv2: the bottom MLP must end at the embedding dim ({embedding_dim}), "
                       f"got bottom_mlp={list(bottom_mlp)}")
    if top_mlp[-1] != num_tasks:
      raise ValueError(f"DCNv2: the top MLP must end at {num_tasks} output(s), got {list(top_mlp)}")
    if structure not in STRUCTURES:
      raise ValueError(f"DCNv2: structure={structure!r}; expected one of {STRUCTURES}")
    # The dense features become one more field, so x0 is [bottom(dense), e_1, ..., e_F].
    d = (num_sparse + 1) * embedding_dim
    self.bottom = MLP(num_dense, bottom_mlp, rngs=rngs, compute_dtype=compute_dtype)
    self.cross = CrossNetwork(d, num_cross_layers, rngs=rngs, low_rank=low_rank,
                              compute_dtype=compute_dtype)
    hidden = tuple(top_mlp[:-1])
    self.deep = MLP(d, hidden, rngs=rngs, compute_dtype=compute_dtype)
    deep_out = hidden[-1] if hidden else d
    self.final = Dense(deep_out + (d if structure == "parallel" else 0), num_tasks, rngs=rngs,
                       compute_dtype=compute_dtype)
    self.structure = structure

  def __call__(self, dense, sparse):
    """dense [B, num_dense]; sparse [B, num_sparse, D] pooled embeddings -> logits [B, tasks]."""
    x = self.bottom(dense)
    x0 = jnp.concatenate([x, sparse.reshape(sparse.shape[0], -1).astype(jnp.float32)], axis=1)
    if self.structure == "stacked":
      h = self.deep(self.cross(x0))
    else:
      h = jnp.concatenate([self.cross(x0), self.deep(x0)], axis=1)
    return self.final(h)
