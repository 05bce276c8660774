"""Wire codecs: what a collective moves instead of float32 rows.

A "row" is the last axis of an array; each row is one scaling unit (a block of a flattened
dense gradient, or one embedding row). The encoded array holds only integers: XLA:CPU widens
bf16/fp16 collectives to f32, so half precision travels bitcast to uint16, and int8 rows carry
their scale as two extra int8 columns (a bf16 rounded up, so no value clips).

  fp32: float32 [..., d]          (identity)
  bf16: uint16 [..., d]           (round to nearest even)
  fp16: uint16 [..., d]
  int8: int8 [..., d + 2]         (q = round(x / scale), scale = max|row| / 127, as bf16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_HALF = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


def check_precision(precision: str, what: str) -> str:
  if precision not in PRECISIONS:
    raise ValueError(f"{what}={precision!r}; expected one of {list(PRECISIONS)}")
  return precision


def wire_width(precision: str, d: int) -> int:
  """Columns of an encoded row of ``d`` values."""
  return d + 2 if precision == "int8" else d


def row_scales(x):
  """float32 [...]: the int8 scale of each row, max|row| / 127 rounded *up* to a bf16 (so
  |x / scale| <= 127 holds after rounding), and its uint16 bf16 bits."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
  bits = jax.lax.bitcast_convert_type(amax / 127.0, jnp.uint32)
  # Ceil to bf16 precision: bump the low 16 bits into the high half, then truncate.
  hi = ((bits + jnp.uint32(0xFFFF)) >> 16).astype(jnp.uint16)
  scale = jax.lax.bitcast_convert_type(hi.astype(jnp.uint32) << 16, jnp.float32)
  return scale, hi


def encode(x, precision: str, key=None):
  """x float [..., d] -> the wire array. ``key``: stochastic rounding for int8 (unbiased:
  E[decode(encode(x))] = x), else round to nearest."""
  if precision == "fp32":
    return x.astype(jnp.float32)
  if precision in _HALF:
    return jax.lax.bitcast_convert_type(x.astype(_HALF[precision]), jnp.uint16)
  x = x.astype(jnp.float32)
  scale, hi = row_scales(x)
  y = x / jnp.where(scale > 0, scale, 1.0)[..., None]
  if key is None:
    y = jnp.round(y)
  else:
    y = jnp.floor(y + jax.random.uniform(key, y.shape, jnp.float32))
  q = jnp.clip(y, -127, 127).astype(jnp.int8)
  s = jax.lax.bitcast_convert_type(hi, jnp.int8)  # [..., 2]
  return jnp.concatenate([q, s], axis=-1)


def decode(w, precision: str):
  """The wire array -> float32 [..., d]."""
  if precision == "fp32":
    return w
  if precision in _HALF:
    return jax.lax.bitcast_convert_type(w, _HALF[precision]).astype(jnp.float32)
  hi = jax.lax.bitcast_convert_type(w[..., -2:], jnp.uint16)
  scale = jax.lax.bitcast_convert_type(hi.astype(jnp.uint32) << 16, jnp.float32)
  return w[..., :-2].astype(jnp.float32) * scale[..., None]


def roundtrip(x, precision: str, key=None):
  """decode(encode(x)): what the receiver of ``x`` sees."""
  return decode(encode(x, precision, key), precision)
