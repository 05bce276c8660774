"""Model building blocks against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.models.dlrm import DLRM
from jaxrec.models.layers import (MLP, _bf16_transpose, concat_fields, dot_interaction,
                                  dot_interaction_reference, matmul_bf16)


def test_bf16_transpose_is_a_transpose():
  x = jax.random.normal(jax.random.key(0), (10, 7)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(_bf16_transpose(x)), np.asarray(x).T)


def test_matmul_bf16_gradients_match_upcast_reference():
  x = jax.random.normal(jax.random.key(0), (64, 30))
  w = jax.random.normal(jax.random.key(1), (30, 20))
  up = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  f = lambda x, w: (matmul_bf16(x, w) ** 2).sum()
  r = lambda x, w: ((up(x) @ up(w)) ** 2).sum()
  np.testing.assert_allclose(matmul_bf16(x, w), up(x) @ up(w), rtol=1e-5, atol=1e-4)
  for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(r, (0, 1))(x, w)):
    assert float(jnp.abs(a - b).max() / jnp.abs(b).max()) < 1e-2   # g is rounded to bf16


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_dot_interaction_and_its_gradient(dtype, tol):
  z = jax.random.normal(jax.random.key(0), (8, 6, 5))
  g = jax.random.normal(jax.random.key(1), (8, 15))
  zc = z.astype(dtype)
  ref = dot_interaction_reference(zc.astype(jnp.float32))
  np.testing.assert_allclose(dot_interaction(zc), ref, rtol=tol, atol=tol)
  got = jax.grad(lambda z: (dot_interaction(z) * g).sum())(zc).astype(jnp.float32)
  want = jax.grad(lambda z: (dot_interaction_reference(z) * g).sum())(zc.astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.abs(want).max()))
  # The pairs are the upper triangle of z z^T, computed by hand.
  zz = np.asarray(z, np.float64)
  i, j = 1, 4
  k = [(a, b) for a in range(6) for b in range(a + 1, 6)].index((i, j))
  np.testing.assert_allclose(np.asarray(dot_interaction(z))[:, k], (zz[:, i] * zz[:, j]).sum(-1),
                             rtol=1e-5)


def test_mlp_matches_numpy():
  mlp = MLP(4, (8, 1), rngs=nnx.Rngs(0), final_activation=False)
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  w0, b0 = np.asarray(mlp.layers[0].kernel.get_value()), np.asarray(mlp.layers[0].bias.get_value())
  w1, b1 = np.asarray(mlp.layers[1].kernel.get_value()), np.asarray(mlp.layers[1].bias.get_value())
  want = np.maximum(x @ w0 + b0, 0) @ w1 + b1
  np.testing.assert_allclose(mlp(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


def test_dlrm_shapes_and_config_errors():
  m = DLRM(num_dense=13, num_sparse=3, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1),
           rngs=nnx.Rngs(0))
  out = m(jnp.ones((2, 13)), jnp.ones((2, 3, 4)))
  assert out.shape == (2, 1)
  with pytest.raises(ValueError, match="embedding dim"):
    DLRM(num_dense=13, num_sparse=3, embedding_dim=4, bottom_mlp=(8, 5), top_mlp=(8, 1),
         rngs=nnx.Rngs(0))
  mb = DLRM(num_dense=13, num_sparse=3, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1),
            rngs=nnx.Rngs(0), compute_dtype=jnp.bfloat16)
  np.testing.assert_allclose(mb(jnp.ones((2, 13)), jnp.ones((2, 3, 4))), out, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dim", [4, 8, 12, 16, 64])
def test_concat_fields_equals_concatenate(dim):
  rng = np.random.default_rng(dim)
  a = rng.normal(size=(5, 1, dim)).astype(np.float32)
  b = rng.normal(size=(5, 3, dim)).astype(np.float32)
  np.testing.assert_array_equal(concat_fields([jnp.asarray(a), jnp.asarray(b)]),
                                np.concatenate([a, b], axis=1))
