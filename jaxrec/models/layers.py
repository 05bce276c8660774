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


def concat_fields(parts, axis: int = 1):
  """``jnp.concatenate(parts, axis)`` of [B, n_i, D] field tensors, done on [B, n_i, D/8, 8].

  The concatenation is where XLA:CPU fuses the embedding gather; with 8-wide innermost tiles
  its loop runs about 6x faster than with D-wide rows (same values, same result layout).
  """
  d = parts[0].shape[-1]
  if d % 8 or d == 8 or any(p.ndim != 3 for p in parts):
    return jnp.concatenate(parts, axis=axis)
  tiled = [p.reshape(*p.shape[:-1], d // 8, 8) for p in parts]
  out = jnp.concatenate(tiled, axis=axis)
  return out.reshape(*out.shape[:-2], d)


def upper_triangle_indices(n: int, self_interaction: bool = False):
  return np.triu_indices(n, 0 if self_interaction else 1)


def _gram(z):
  """Per-example z @ z^T in fp32; bf16 inputs accumulate in fp32 (6x faster than fp32 on AMX).

  fp32: z^T is materialised (the barrier stops XLA folding the transpose back into the dot):
  XLA:CPU's batched [n, d] x [d, n] dot with a plain right operand runs about 2x faster than
  the [n, d] x [n, d]^T form, and the copy costs less than the difference (a DLRM step with
  26 fields, dim 64: +10%). bf16 keeps the folded form, which is faster there.
  """
  if z.dtype == jnp.float32:
    zt = jax.lax.optimization_barrier(jnp.swapaxes(z, 1, 2))
    return jnp.einsum("bid,bdj->bij", z, zt, preferred_element_type=jnp.float32)
  return jnp.einsum("bid,bjd->bij", z, z, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _pairwise_upper(z, rows, cols):
  return _gram(z)[:, rows, cols]


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


def _project(x, w, compute_dtype):
  """x @ w, on bf16 operands with fp32 accumulation when compute_dtype is bfloat16."""
  if compute_dtype == jnp.bfloat16:
    return matmul_bf16(x, w)
  return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))


class CrossNetwork(nnx.Module):
  """DCNv2's cross layers: x_{l+1} = x0 * (W_l x_l + b_l) + x_l, with a full-rank W_l [d, d]
  or, with ``low_rank=r``, W_l = U_l V_l^T (U_l, V_l [d, r]): 2dr parameters instead of d^2.
  Row vectors here, so W_l x_l is ``x_l @ kernel`` (kernel = W_l^T) or ``x_l @ v @ u``."""

  def __init__(self, dim: int, num_layers: int, *, rngs: nnx.Rngs, low_rank: int | None = None,
               compute_dtype=None):
    if num_layers < 1:
      raise ValueError(f"CrossNetwork: num_layers must be >= 1, got {num_layers}")
    if low_rank is not None and not 0 < low_rank < dim:
      raise ValueError(f"CrossNetwork: low_rank must be in (0, {dim}), got {low_rank}")
    init = nnx.initializers.variance_scaling(1.0, "fan_avg", "normal")
    if low_rank is None:
      self.kernels = nnx.List([nnx.Param(init(rngs.params(), (dim, dim), jnp.float32))
                               for _ in range(num_layers)])
    else:
      self.v = nnx.List([nnx.Param(init(rngs.params(), (dim, low_rank), jnp.float32))
                         for _ in range(num_layers)])
      self.u = nnx.List([nnx.Param(init(rngs.params(), (low_rank, dim), jnp.float32))
                         for _ in range(num_layers)])
    # Zero biases: at init each layer is x0 * (W x) + x, no constant x0 term.
    self.biases = nnx.List([nnx.Param(jnp.zeros((dim,), jnp.float32)) for _ in range(num_layers)])
    self.low_rank = low_rank
    self.compute_dtype = compute_dtype

  def __call__(self, x0):
    x0 = x0.astype(jnp.float32)
    x = x0
    for l, b in enumerate(self.biases):
      if self.low_rank is None:
        wx = _project(x, self.kernels[l].get_value(), self.compute_dtype)
      else:
        h = _project(x, self.v[l].get_value(), self.compute_dtype)
        wx = _project(h, self.u[l].get_value(), self.compute_dtype)
      x = x0 * (wx + b.get_value()) + x
    return x


def fm_second_order(v):
  """Factorization machine's pairwise term sum_{i<j} <v_i, v_j> for fields v [B, n, d] -> [B, 1],
  by the O(nd) identity 0.5 * sum_d ((sum_i v_i)^2 - sum_i v_i^2); fp32 whatever v's dtype."""
  v = v.astype(jnp.float32)
  s = jnp.sum(v, axis=1)
  return 0.5 * jnp.sum(s * s - jnp.sum(v * v, axis=1), axis=-1, keepdims=True)


class FieldLinear(nnx.Module):
  """A linear model over pooled field embeddings e [B, F, D]: sum_f <w_f, e_f> per output.

  The first-order / wide term of DeepFM and Wide&Deep. Classically that is a 1-wide embedding
  per ID; here the ID's weight is <w_f, E_f[id]>, so it shares the table the engine already
  looks up (no second lookup), at the price of lying in the span of the D-dim embeddings."""

  def __init__(self, num_fields: int, dim: int, out_features: int = 1, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(np.sqrt(1.0 / (num_fields * dim)))
    self.kernel = nnx.Param(init(rngs.params(), (num_fields, dim, out_features), jnp.float32))

  def __call__(self, e):
    return jnp.einsum("bfd,fdo->bo", e.astype(jnp.float32), self.kernel.get_value())
