"""Feature admission for the device hash table: who earns a row.

Two filters, combined with AND (DeepRec's CounterFilter and a Bernoulli filter):

* count: a key is admitted once it has been looked up ``min_count`` times while absent. The
  counts live in a count-min sketch held in the table state, so rare IDs cost no table slot.
  The sketch over-counts on hash collisions (admits a little early), never under-counts.
* probability: a new key is admitted with probability ``probability``. The coin is a hash of
  the key and a seed drawn from the caller's rng key, so every copy of a key in one batch gets
  the same answer and a rerun with the same rng key admits the same keys.

Keys are 64-bit IDs as uint32 (lo, hi) halves; everything here works with x64 disabled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN32 = 0x9E3779B9


def fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection on uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_pair(lo: jax.Array, hi: jax.Array, seed: int | jax.Array) -> jax.Array:
  """A uint32 hash of the 64-bit key (lo, hi) under ``seed``; keys differing only in hi differ."""
  seed = jnp.asarray(seed, jnp.uint32) if not isinstance(seed, int) else jnp.uint32(seed)
  return fmix32(lo ^ fmix32(hi ^ seed))


@dataclasses.dataclass(frozen=True)
class AdmissionPolicy:
  """When a key not yet in the table gets a row.

  min_count: admit once the key was seen this many times while absent (1 = at first sight).
  probability: admit a new key with this probability (needs an rng key in find_or_insert).
  sketch_depth, sketch_width: the count-min sketch's shape (width a power of two); used only
    when min_count > 1. Memory is depth * width * 4 bytes per table shard.
  """

  min_count: int = 1
  probability: float = 1.0
  sketch_depth: int = 4
  sketch_width: int = 1 << 16

  def __post_init__(self):
    if self.min_count < 1:
      raise ValueError(f"AdmissionPolicy.min_count must be >= 1, got {self.min_count}")
    if not 0.0 <= self.probability <= 1.0:
      raise ValueError(f"AdmissionPolicy.probability must be in [0, 1], got {self.probability}")
    if self.sketch_depth < 1:
      raise ValueError(f"AdmissionPolicy.sketch_depth must be >= 1, got {self.sketch_depth}")
    w = self.sketch_width
    if w < 1 or w & (w - 1):
      raise ValueError(f"AdmissionPolicy.sketch_width must be a power of two, got {w}")

  @property
  def uses_sketch(self) -> bool:
    return self.min_count > 1

  @property
  def uses_rng(self) -> bool:
    return self.probability < 1.0

  @property
  def probability_threshold(self) -> int:
    """The uint32 cut: a key is admitted when its coin hash is below this."""
    return int(min(np.floor(self.probability * 2.0**32), 2.0**32 - 1))


def init_sketch(policy: AdmissionPolicy | None) -> jax.Array:
  """[depth, width] int32 zeros, or a [0, 1] placeholder when no count filter is configured."""
  if policy is None or not policy.uses_sketch:
    return jnp.zeros((0, 1), jnp.int32)
  return jnp.zeros((policy.sketch_depth, policy.sketch_width), jnp.int32)


def sketch_columns(lo: jax.Array, hi: jax.Array, depth: int, width: int) -> jax.Array:
  """[depth, n] int32 column of each key in each sketch row (one independent hash per row)."""
  seeds = (np.arange(depth, dtype=np.uint64) * _GOLDEN32 + 0x5BD1E995) % (1 << 32)
  cols = [hash_pair(lo, hi, int(s)) & jnp.uint32(width - 1) for s in seeds]
  return jnp.stack(cols).astype(jnp.int32)


def sketch_add(sketch: jax.Array, lo: jax.Array, hi: jax.Array, mask: jax.Array) -> jax.Array:
  """Counts one sighting of each key where ``mask`` (duplicates count once per occurrence)."""
  depth, width = sketch.shape
  cols = sketch_columns(lo, hi, depth, width)
  cols = jnp.where(mask[None, :], cols, width)  # out of range: dropped
  rows = jnp.broadcast_to(jnp.arange(depth, dtype=jnp.int32)[:, None], cols.shape)
  return sketch.at[rows, cols].add(1, mode="drop")


def sketch_estimate(sketch: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """[n] int32 count-min estimate of how often each key was counted."""
  depth, width = sketch.shape
  cols = sketch_columns(lo, hi, depth, width)
  rows = jnp.arange(depth, dtype=jnp.int32)[:, None]
  return jnp.min(sketch[rows, cols], axis=0)


def decay_sketch(sketch: jax.Array) -> jax.Array:
  """Halves every count, so keys that were frequent long ago must earn admission again."""
  return sketch >> 1


def probability_coin(lo: jax.Array, hi: jax.Array, rng: jax.Array) -> jax.Array:
  """[n] uint32 per-key coin: the same for every copy of a key under one rng key."""
  seed = jax.random.bits(rng, (), jnp.uint32)
  return hash_pair(lo ^ jnp.uint32(0xA5A5A5A5), hi, seed)


def admit(policy: AdmissionPolicy | None, sketch: jax.Array, lo: jax.Array, hi: jax.Array,
          rng: jax.Array | None) -> jax.Array:
  """[n] bool: which absent keys may take a row, given a sketch that already counts this batch."""
  ok = jnp.ones(lo.shape, bool)
  if policy is None:
    return ok
  if policy.uses_sketch:
    ok = ok & (sketch_estimate(sketch, lo, hi) >= policy.min_count)
  if policy.uses_rng:
    if rng is None:
      raise ValueError("AdmissionPolicy.probability < 1 needs an rng key: pass rng= to "
                       "find_or_insert")
    ok = ok & (probability_coin(lo, hi, rng) < jnp.uint32(policy.probability_threshold))
  return ok
