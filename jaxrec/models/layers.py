"""Building blocks shared by the ranking models."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class MLP(nnx.Module):
  """Dense layers with ReLU between them (and after the last one unless ``final_activation``
  is False). ``compute_dtype`` casts inputs and weights for the matmuls (bf16 on AMX/GPUs);
  parameters stay float32."""

  def __init__(self, in_features: int, sizes: Sequence[int], *, rngs: nnx.Rngs,
               final_activation: bool = True, compute_dtype=None):
    dims = [in_features, *sizes]
    self.layers = nnx.List([
        nnx.Linear(a, b, rngs=rngs, dtype=compute_dtype,
                   kernel_init=nnx.initializers.variance_scaling(2.0, "fan_avg", "normal"),
                   bias_init=nnx.initializers.normal(np.sqrt(1.0 / b)))
        for a, b in zip(dims[:-1], dims[1:])])
    self.final_activation = final_activation

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1 or self.final_activation:
        x = jax.nn.relu(x)
    return x


def upper_triangle_indices(n: int, self_interaction: bool = False):
  return np.triu_indices(n, 0 if self_interaction else 1)


@jax.custom_vjp
def _pairwise_upper(z, rows, cols):
  return jnp.einsum("bid,bjd->bij", z, z)[:, rows, cols]


def _pairwise_upper_fwd(z, rows, cols):
  return _pairwise_upper(z, rows, cols), (z, rows, cols)


def _pairwise_upper_bwd(res, g):
  # d/dz of sum_k g_k <z_i(k), z_j(k)>: scatter g into a symmetric [n, n] matrix with a
  # constant-index gather (XLA:CPU's autodiff of the triangle gather is a slow scatter).
  z, rows, cols = res
  n = z.shape[1]
  sym = np.zeros((n, n), np.int32)              # index into [0, g...]: 0 means zero
  k = np.arange(1, len(rows) + 1)
  sym[rows, cols] = k
  sym[cols, rows] = k
  gz = jnp.concatenate([jnp.zeros_like(g[:, :1]), g], axis=1)
  gmat = jnp.take(gz, jnp.asarray(sym.reshape(-1)), axis=1).reshape(g.shape[0], n, n)
  diag = np.zeros(n)
  diag[rows[rows == cols]] = 1.0                # self-interaction terms count twice
  gmat = gmat * (1.0 + jnp.asarray(np.diag(diag), g.dtype))
  return jnp.einsum("bij,bjd->bid", gmat, z), None, None


_pairwise_upper.defvjp(_pairwise_upper_fwd, _pairwise_upper_bwd)


def dot_interaction(z, self_interaction: bool = False):
  """DLRM's interaction: the upper triangle of the pairwise dot products of z [B, n, d]."""
  rows, cols = upper_triangle_indices(z.shape[1], self_interaction)
  return _pairwise_upper(z, np.asarray(rows), np.asarray(cols))


def dot_interaction_reference(z, self_interaction: bool = False):
  rows, cols = upper_triangle_indices(z.shape[1], self_interaction)
  return jnp.einsum("bid,bjd->bij", z, z)[:, rows, cols]
