"""Hierarchical and compressed all-reduce against psum and a numpy sum, on meshes (8,) and
(2, 4); the wire codecs against their definitions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.comm import allreduce, codec
from jaxrec.comm.accounting import collective_bytes
from jaxrec.distributed.mesh import make_mesh

MESHES = [(8,), (2, 4)]


def _per_device(mesh, fn, *xs, replicated=()):
  """fn(*local rows) per device on [devices, ...] inputs; outputs stacked [devices, ...]."""
  axes = mesh.axis_names
  specs = tuple(P() if i in replicated else P(axes) for i in range(len(xs)))
  f = jax.jit(jax.shard_map(lambda *a: jax.tree.map(lambda y: y[None], fn(*[
      b if i in replicated else b[0] for i, b in enumerate(a)])),
      mesh=mesh, in_specs=specs, out_specs=P(axes), check_vma=False))
  return f, [x if i in replicated else jax.device_put(x, NamedSharding(mesh, P(axes)))
             for i, x in enumerate(xs)]


def _run(mesh, fn, *xs, replicated=()):
  f, args = _per_device(mesh, fn, *xs, replicated=replicated)
  return jax.tree.map(np.asarray, f(*args))


@pytest.mark.parametrize("shape", MESHES)
def test_hierarchical_equals_psum(shape):
  mesh = make_mesh(shape)
  rng = np.random.default_rng(0)
  ints = rng.integers(-1000, 1000, (8, 3, 37)).astype(np.float32)  # exact in any order
  flt = rng.normal(size=(8, 101)).astype(np.float32)
  for x, exact in ((ints, True), (flt, False)):
    h = _run(mesh, lambda v: allreduce.allreduce(v, mesh.axis_names, "hierarchical"), x)
    p = _run(mesh, lambda v: allreduce.allreduce(v, mesh.axis_names, "psum"), x)
    ref = x.astype(np.float64).sum(0)
    for d in range(8):
      if exact:
        np.testing.assert_array_equal(h[d], ref)
        np.testing.assert_array_equal(p[d], ref)
      else:
        np.testing.assert_allclose(h[d], p[d], rtol=1e-6, atol=1e-6)


def test_hierarchical_moves_a_quarter_across_hosts():
  mesh = make_mesh((2, 4))
  f, args = _per_device(mesh, lambda v: allreduce.allreduce(v, mesh.axis_names, "hierarchical"),
                        np.ones((8, 1024), np.float32))
  out = collective_bytes(f.lower(*args).compile(), mesh)
  assert out["by_kind"]["reduce-scatter"] == pytest.approx(3 / 4 * 4096)
  assert out["by_axis"]["host"] == pytest.approx(2 * 1 / 2 * 1024)  # 1/4 of the vector
  assert out["by_kind"]["all-gather"] == pytest.approx(3 / 4 * 4096)


@pytest.mark.parametrize("shape,method", [((8,), "psum"), ((8,), "hierarchical"),
                                          ((2, 4), "psum"), ((2, 4), "hierarchical")])
def test_compressed_fp32_path_is_exact(shape, method):
  """The all_to_all / all_gather schedule itself (no quantisation) returns the exact sum."""
  mesh = make_mesh(shape)
  n = allreduce.padded_size(1000, 8, 16)
  x = np.random.default_rng(1).integers(-99, 99, (8, n)).astype(np.float32)
  out, res = _run(mesh, lambda v: allreduce.compressed_allreduce(
      v, None, mesh.axis_names, method=method, precision="fp32", block_size=16), x)
  for d in range(8):
    np.testing.assert_array_equal(out[d], x.sum(0))
  assert not res.any()


@pytest.mark.parametrize("shape,method,stochastic", [
    ((8,), "psum", False), ((2, 4), "hierarchical", False), ((2, 4), "psum", True),
    ((2, 4), "hierarchical", True)])
def test_int8_error_is_bounded_by_block_scales(shape, method, stochastic):
  mesh = make_mesh(shape)
  bs = 32
  n = allreduce.padded_size(3000, 8, bs)
  rng = np.random.default_rng(2)
  # Blocks of very different magnitudes: a per-tensor scale would swamp the small ones.
  x = (rng.normal(size=(8, n)) * 10.0 ** rng.integers(-4, 2, (1, n // bs)).repeat(bs, 1)
       ).astype(np.float32)
  key = jax.random.key(3)
  out, res = _run(mesh, lambda v, k: allreduce.compressed_allreduce(
      v, None, mesh.axis_names, method=method, precision="int8", block_size=bs,
      key=k if stochastic else None), x, key, replicated=(1,))
  exact = x.astype(np.float64).sum(0)
  # Per block: each device's scale (max|block| / 127), then every re-encoded partial sum,
  # whose scale is at most the sum of the devices' scales; half a step each (one full step
  # with stochastic rounding).
  s = np.abs(x).reshape(8, -1, bs).max(-1) / 127.0 * (1 + 2**-7)
  re_encodings = len(allreduce.levels(method, mesh.axis_names))  # partial levels + the gather
  bound = s.sum(0) * (1 + re_encodings) * (1.0 if stochastic else 0.5) * (1 + 1e-3)
  err = np.abs(out - exact[None]).reshape(8, -1, bs).max(-1)
  assert (err <= bound[None] + 1e-30).all(), (err / bound).max()
  assert (err > 0).any()                       # it really quantised
  for d in range(1, 8):                        # every device got the same result
    np.testing.assert_array_equal(out[d], out[0])
  # The identity error feedback relies on: output = exact sum - sum of the residuals.
  np.testing.assert_allclose(out[0], exact - res.astype(np.float64).sum(0),
                             rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("shape,method", [((8,), "psum"), ((2, 4), "hierarchical")])
def test_error_feedback_drives_accumulated_error_to_zero(shape, method):
  """The same gradients every step, as near a plateau: without feedback the rounding bias adds
  up linearly; with it the error of the running sum stays bounded, so its mean goes to zero."""
  mesh = make_mesh(shape)
  bs = 16
  n = allreduce.padded_size(500, 8, bs)
  g = np.random.default_rng(4).normal(size=(8, n)).astype(np.float32)
  step = functools.partial(allreduce.compressed_allreduce, axes=mesh.axis_names, method=method,
                           precision="int8", block_size=bs)
  f_ef, (gd, r) = _per_device(mesh, lambda v, res: step(v, res), g, np.zeros_like(g))
  f_no, _ = _per_device(mesh, lambda v: step(v, None), g)
  exact = g.astype(np.float64).sum(0)
  acc_ef = np.zeros(n)
  acc_no = np.zeros(n)
  ef_err, no_err = [], []
  for t in range(1, 65):
    out, r = f_ef(gd, r)
    acc_ef += np.asarray(out)[0]
    acc_no += np.asarray(f_no(gd)[0])[0]
    ef_err.append(np.abs(acc_ef - t * exact).max())
    no_err.append(np.abs(acc_no - t * exact).max())
  # Bounded by the last residuals: the running-sum error is exactly minus their sum.
  np.testing.assert_allclose(acc_ef - 64 * exact, -np.asarray(r, np.float64).sum(0),
                             atol=1e-3)
  assert max(ef_err[31:]) <= 1.5 * max(ef_err[:32])       # not growing
  assert no_err[-1] > 15 * no_err[0]                      # without feedback: ~linear growth
  assert ef_err[-1] < no_err[-1] / 10
  assert ef_err[-1] / 64 < ef_err[0] / 8                 # the mean error shrinks ~ 1/t


def test_compressed_int8_cuts_wire_bytes_by_70_percent():
  mesh = make_mesh((2, 4))
  n = allreduce.padded_size(100_000, 8, 256)
  x = np.ones((8, n), np.float32)
  fp32, args = _per_device(mesh, lambda v: allreduce.allreduce(v, mesh.axis_names, "psum"), x)
  i8, _ = _per_device(mesh, lambda v: allreduce.compressed_allreduce(
      v, v, mesh.axis_names, method="hierarchical", precision="int8", block_size=256)[0], x)
  b32 = collective_bytes(fp32.lower(*args).compile(), mesh)
  b8 = collective_bytes(i8.lower(*args).compile(), mesh)
  assert b32["total"] == pytest.approx(2 * 7 / 8 * 4 * n)
  assert b8["total"] <= 0.3 * b32["total"], (b8["by_kind"], b32["by_kind"])
  assert set(b8["by_kind"]) == {"all-to-all", "all-gather"}


# ---- codecs ----------------------------------------------------------------------------------

def test_codec_half_precisions_are_casts_and_travel_as_integers():
  x = np.random.default_rng(5).normal(size=(7, 9)).astype(np.float32) * 100
  for p, dt in (("bf16", jnp.bfloat16), ("fp16", jnp.float16)):
    w = codec.encode(jnp.asarray(x), p)
    assert w.dtype == jnp.uint16 and w.shape == x.shape
    np.testing.assert_array_equal(codec.decode(w, p),
                                  np.asarray(jnp.asarray(x).astype(dt).astype(jnp.float32)))
  np.testing.assert_array_equal(codec.roundtrip(jnp.asarray(x), "fp32"), x)
  with pytest.raises(ValueError, match="embedding_precision='int4'"):
    codec.check_precision("int4", "embedding_precision")


def test_codec_int8_per_row_scale_and_error():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(50, 24)).astype(np.float32) * (10.0 ** rng.integers(-6, 4, (50, 1)))
  x[3] = 0.0                                   # an all-zero row (padding) decodes to zeros
  w = codec.encode(jnp.asarray(x), "int8")
  assert w.dtype == jnp.int8 and w.shape == (50, 26)
  scale = np.asarray(codec.row_scales(jnp.asarray(x))[0])
  amax = np.abs(x).max(1)
  assert (scale >= amax / 127).all() and (scale <= amax / 127 * (1 + 2**-7)).all()
  y = np.asarray(codec.decode(w, "int8"))
  assert (np.abs(y - x) <= scale[:, None] / 2 + 1e-30).all()
  assert not y[3].any()
  # Stochastic rounding: within one step, and unbiased over many keys.
  keys = jax.random.split(jax.random.key(0), 2000)
  ys = np.asarray(jax.vmap(lambda k: codec.roundtrip(jnp.asarray(x[:4]), "int8", k))(keys))
  assert (np.abs(ys - x[None, :4]) <= scale[None, :4, None] + 1e-30).all()
  bias = np.abs(ys.mean(0) - x[:4]) / np.maximum(scale[:4, None], 1e-30)
  assert bias.max() < 0.1                      # 2000 draws: sd of the mean <= 0.5/sqrt(2000)
