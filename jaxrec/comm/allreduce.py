"""Dense-gradient all-reduce inside ``jax.shard_map``: flat ``psum``, hierarchical, compressed.

hierarchical (mesh ("host", "local")): reduce-scatter over "local" (inside a host), all-reduce
  of the 1/L piece over "host", all-gather over "local"; the slow cross-host links carry 1/L
  of the vector. On any other mesh it is ``psum``.

compressed (bf16 / int8): a reduce-scatter done as an ``all_to_all`` of encoded chunks plus a
  local float32 sum, level by level (["local", "host"] when hierarchical, else all axes at
  once), then the reduced chunk is encoded once more and all-gathered back up the levels, so
  every byte on the wire is encoded (see ``codec``). Error feedback: each device adds its
  residual to what it sends and keeps, as the new residual, every quantisation error it made
  (its own contribution, and the re-encoding of the chunks it reduced), placed at the positions
  they hit. The output then equals the exact sum minus the sum of the new residuals, so the
  error of a running sum of outputs stays bounded instead of growing with the steps.

Everything here runs per device inside a shard_map over the named axes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxrec.comm import codec

METHODS = ("psum", "hierarchical")


def _size(axes) -> int:
  return int(jax.lax.axis_size(tuple(axes)))


def levels(method: str, axes: Sequence[str]) -> tuple[tuple[str, ...], ...]:
  """The reduce-scatter levels, innermost first."""
  axes = tuple(axes)
  if method == "hierarchical" and axes == ("host", "local"):
    return (("local",), ("host",))
  return (axes,)


def padded_size(n: int, num_devices: int, block_size: int) -> int:
  """Length the flat vector is padded to: whole blocks in every device's chunk."""
  unit = num_devices * block_size
  return max(1, math.ceil(n / unit)) * unit


def hierarchical_psum(x, host: str = "host", local: str = "local"):
  """psum over (host, local) as reduce-scatter(local) -> psum(host) -> all-gather(local)."""
  flat = x.reshape(-1)
  n = flat.shape[0]
  k = _size((local,))
  flat = jnp.pad(flat, (0, -n % k))
  part = jax.lax.psum_scatter(flat, local, scatter_dimension=0, tiled=True)
  part = jax.lax.psum(part, host)
  return jax.lax.all_gather(part, local, axis=0, tiled=True)[:n].reshape(x.shape)


def allreduce(x, axes: Sequence[str], method: str = "psum"):
  """Exact sum of ``x`` over ``axes`` by ``method``."""
  if method not in METHODS:
    raise ValueError(f"dense_allreduce={method!r}; expected one of {list(METHODS)}")
  if levels(method, axes) == (("local",), ("host",)):
    return hierarchical_psum(x)
  return jax.lax.psum(x, tuple(axes))


def compressed_allreduce(x, residual, axes: Sequence[str], *, method: str = "psum",
                         precision: str = "int8", block_size: int = 256, key=None):
  """(sum over ``axes`` of ``x + residual``, new residual), every collective moving encoded
  chunks. x, residual: float32 [n] with n a multiple of (devices x block_size) (see
  ``padded_size``); residual may be None (no error feedback). ``key``: stochastic rounding
  (int8), the same on every device (each device folds in its index)."""
  codec.check_precision(precision, "dense_precision")
  lv = levels(method, axes)
  nd = math.prod(_size(a) for a in lv)
  n = x.shape[0]
  if n % (nd * block_size):
    raise ValueError(f"compressed_allreduce: length {n} is not a multiple of {nd} devices x "
                     f"block_size {block_size}; pad it to padded_size(...)")
  if key is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(tuple(axes)))
  keys = [None if key is None else jax.random.fold_in(key, i) for i in range(len(lv) + 1)]
  v = x.astype(jnp.float32) if residual is None else x.astype(jnp.float32) + residual
  err = jnp.zeros((n,), jnp.float32)
  cur, offset, span = v, jnp.zeros((), jnp.int32), n
  for i, a in enumerate(lv):
    k = _size(a)
    w = codec.encode(cur.reshape(k, -1, block_size), precision, keys[i])
    # What the peers will decode from me, kept as this level's error at the positions it hits.
    lost = cur - codec.decode(w, precision).reshape(-1)
    err = jax.lax.dynamic_update_slice(
        err, jax.lax.dynamic_slice(err, (offset,), (span,)) + lost, (offset,))
    recv = jax.lax.all_to_all(w, a, 0, 0, tiled=True)
    cur = codec.decode(recv, precision).sum(0).reshape(-1)
    span //= k
    offset = offset + jax.lax.axis_index(a).astype(jnp.int32) * span
  w = codec.encode(cur.reshape(-1, block_size), precision, keys[-1])
  lost = cur - codec.decode(w, precision).reshape(-1)
  err = jax.lax.dynamic_update_slice(
      err, jax.lax.dynamic_slice(err, (offset,), (span,)) + lost, (offset,))
  for a in reversed(lv):
    w = jax.lax.all_gather(w, a, axis=0, tiled=True)
  return codec.decode(w, precision).reshape(-1), err
