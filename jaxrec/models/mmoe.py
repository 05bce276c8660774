"""MMoE (Ma et al. 2018): shared expert MLPs, one softmax gate per task mixing them, and one
tower per task; logits [B, num_tasks] (e.g. click, conversion)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.models.layers import MLP, Dense


class MMoE(nnx.Module):
  """Input: [bottom(dense), e_1, ..., e_F] flattened. ``expert_mlp`` sizes each expert,
  ``top_mlp`` each task's tower (ending at 1 logit)."""

  def __init__(self, *, num_dense: int, num_sparse: int, embedding_dim: int,
               bottom_mlp: Sequence[int], top_mlp: Sequence[int], rngs: nnx.Rngs,
               compute_dtype=None, num_tasks: int = 2, num_experts: int = 4,
               expert_mlp: Sequence[int] = (128, 64)):
    if bottom_mlp[-1] != embedding_dim:
      raise ValueError(f"MMoE: the bottom MLP must end at the embedding dim ({embedding_dim}), "
                       f"got bottom_mlp={list(bottom_mlp)}")
    if top_mlp[-1] != 1:
      raise ValueError(f"MMoE: each task tower (top_mlp) must end at 1 logit, got {list(top_mlp)}")
    if num_tasks < 1 or num_experts < 1 or not expert_mlp:
      raise ValueError(f"MMoE: need num_tasks >= 1, num_experts >= 1 and a non-empty expert_mlp, "
                       f"got {num_tasks}, {num_experts}, {list(expert_mlp)}")
    d = (num_sparse + 1) * embedding_dim
    self.bottom = MLP(num_dense, bottom_mlp, rngs=rngs, compute_dtype=compute_dtype)
    self.experts = nnx.List([MLP(d, expert_mlp, rngs=rngs, compute_dtype=compute_dtype)
                             for _ in range(num_experts)])
    self.gates = nnx.List([Dense(d, num_experts, rngs=rngs, compute_dtype=compute_dtype)
                           for _ in range(num_tasks)])
    self.towers = nnx.List([MLP(expert_mlp[-1], top_mlp, rngs=rngs, final_activation=False,
                                compute_dtype=compute_dtype) for _ in range(num_tasks)])

  def _input(self, dense, sparse):
    return jnp.concatenate([self.bottom(dense),
                            sparse.reshape(sparse.shape[0], -1).astype(jnp.float32)], axis=1)

  def gate_weights(self, dense, sparse):
    """The per-task mixtures over experts, [B, num_tasks, num_experts]; rows sum to 1."""
    x = self._input(dense, sparse)
    return jnp.stack([jax.nn.softmax(g(x), axis=-1) for g in self.gates], axis=1)

  def __call__(self, dense, sparse):
    """dense [B, num_dense]; sparse [B, num_sparse, D] pooled embeddings -> logits [B, tasks]."""
    x = self._input(dense, sparse)
    experts = jnp.stack([e(x) for e in self.experts], axis=1)           # [B, E, H]
    outs = []
    for gate, tower in zip(self.gates, self.towers):
      w = jax.nn.softmax(gate(x), axis=-1)                               # [B, E]
      outs.append(tower(jnp.einsum("be,beh->bh", w, experts)))
    return jnp.concatenate(outs, axis=1)
