"""Building blocks shared by the ranking models."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


_NN = (((1,), (0,)), ((), ()))


def _bf16_transpose(x):
  """x.T for a bf16 matrix with an even row count, done on uint32 pairs of rows.

  XLA folds a plain transpose into the dot's dimension numbers, and XLA:CPU then runs the
  "transposed" bf16 dot upcast to fp32, about 4x slower than the plain bf16 dot on AMX; a
  transpose of 32-bit words cannot be folded that way.
  """
  m, k = x.shape
  u = jax.lax.bitcast_convert_type(x.reshape(m // 2, 2, k).transpose(0, 2, 1), jnp.uint32)
  return jax.lax.bitcast_convert_type(jnp.transpose(u), jnp.bfloat16).reshape(k, m)


def _transpose(x):
  if x.dtype == jnp.bfloat16 and x.shape[0] % 2 == 0:
    return _bf16_transpose(x)
  return jnp.transpose(x)


@jax.custom_vjp
def matmul_bf16(x, w):
  """x @ w with bf16 operands and fp32 accumulation and result, backward kept on bf16 dots."""
  return jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), _NN,
                             preferred_element_type=jnp.float32)


def _matmul_bf16_fwd(x, w):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  y = jax.lax.dot_general(xb, wb, _NN, preferred_element_type=jnp.float32)
  # Zero-size arrays carry the input dtypes (residuals must be arrays).
  return y, (xb, wb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_bf16_bwd(res, g):
  xb, wb, x_tag, w_tag = res
  gb = g.astype(jnp.bfloat16)
  dx = jax.lax.dot_general(gb, _transpose(wb), _NN, preferred_element_type=jnp.float32)
  dw = jax.lax.dot_general(_transpose(xb), gb, _NN, preferred_element_type=jnp.float32)
  return dx.astype(x_tag.dtype), dw.astype(w_tag.dtype)


matmul_bf16.defvjp(_matmul_bf16_fwd, _matmul_bf16_bwd)


class Dense(nnx.Module):
  """y = x @ kernel + bias. fp32 parameters; with ``compute_dtype=bfloat16`` the matmuls (both
  directions) run on bf16 operands with fp32 accumulation. A 1-wide layer is a reduction:
  XLA:CPU's matmuls with a unit dimension are slow in the backward pass."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               compute_dtype=None):
    init = nnx.initializers.variance_scaling(2.0, "fan_avg", "normal")
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))
    self.bias = nnx.Param(nnx.initializers.normal(np.sqrt(1.0 / out_features))(
        rngs.params(), (out_features,), jnp.float32))
    self.compute_dtype = compute_dtype

  def __call__(self, x):
    w = self.kernel.get_value()
    if w.shape[1] == 1:
      y = jnp.sum(x.astype(jnp.float32) * w[:, 0].astype(jnp.float32), axis=-1, keepdims=True)
    elif self.compute_dtype == jnp.bfloat16:
      y = matmul_bf16(x, w)
    else:
      y = jnp.dot(x.astype(jnp.float32), w)
    return y + self.bias.get_value()


class MLP(nnx.Module):
  """Dense layers with ReLU between them (and after the last one unless ``final_activation``
  is False). ``compute_dtype=bfloat16`` runs the matmuls in bf16 (AMX on CPUs, tensor cores on
  GPUs); parameters, activations between layers and gradients stay float32."""

  def __init__(self, in_features: int, sizes: Sequence[int], *, rngs: nnx.Rngs,
               final_activation: bool = True, compute_dtype=None):
    dims = [in_features, *sizes]
    self.layers = nnx.List([Dense(a, b, rngs=rngs, compute_dtype=compute_dtype)
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


def _gram(a, b):
  """Per-example a @ b^T; bf16 inputs accumulate in fp32 (6x faster than fp32 on AMX)."""
  return jnp.einsum("bid,bjd->bij", a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _pairwise_upper(z, rows, cols):
  return _gram(z, z)[:, rows, cols]


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
  dz = jnp.einsum("bij,bjd->bid", gmat.astype(z.dtype), z, preferred_element_type=jnp.float32)
  return dz.astype(z.dtype), None, None


_pairwise_upper.defvjp(_pairwise_upper_fwd, _pairwise_upper_bwd)


def dot_interaction(z, self_interaction: bool = False):
  """DLRM's interaction: the upper triangle of the pairwise dot products of z [B, n, d], in
  fp32 whatever the dtype of z."""
  rows, cols = upper_triangle_indices(z.shape[1], self_interaction)
  return _pairwise_upper(z, np.asarray(rows), np.asarray(cols))


def dot_interaction_reference(z, self_interaction: bool = False):
  rows, cols = upper_triangle_indices(z.shape[1], self_interaction)
  return jnp.einsum("bid,bjd->bij", z, z)[:, rows, cols]
