"""A synthetic Criteo-like click stream with a planted, known teacher.

Every example is a deterministic function of (seed, example index), generated in blocks, so
the stream is unbounded, needs constant memory, and any range can be regenerated exactly (which
makes resume and per-process slicing trivial). Labels are Bernoulli draws from a hidden teacher:

  logit = bias + sum_f  s_f(rank) * w_f(identity)                       (per-ID effects)
               + sum_{(f,g) in pairs} gamma * <z_f(identity_f), z_g(identity_g)>  (interactions)
               + sum_j v_j * std(dense_j) + a * tanh(dense_a * dense_b)       (dense terms)

w and z are pseudo-random functions of the ID (hashes, not stored tables), so a 10^7-ID feature
costs no memory. s_f(rank) shrinks the effect of rare IDs: a rare ID still moves the label, but
less, which keeps the Bayes-optimal AUC reachable by a model trained on a few million examples
while leaving most of the signal in the large-cardinality features (masking them, or training
on a tenth of the data, costs a lot of AUC). The teacher's true probability of every example is
returned, so the Bayes-optimal AUC of any split is known exactly.

Conversion (optional second label, ``conversion=True``): a clicked example converts with
probability q = sigmoid(conv_bias + conv_shared * (click per-ID effects) + own per-ID effects of
the ``conversion_features`` largest features), drawn from its own random stream; a non-click
never converts. So P(conversion | x) = P(click | x) * q(x) is known, labels become [B, 2]
(click, conversion) and probabilities [B, 2]. Off, the stream is bit-identical to before.

Drift (optional): the item at popularity rank r at example t is identity r + floor(t * drift),
so new IDs keep entering the head and old ones fade, as in a real ads stream.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from typing import Iterator

import numpy as np

from jaxrec.data import hashing
from jaxrec.data.batch import Batch, SparseLayout

# Criteo Kaggle (display advertising challenge) per-field cardinalities, C1..C26.
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
NUM_DENSE = 13

_U53 = 1.0 / float(1 << 53)


def _hash_uniform(key: np.ndarray, salt: int) -> np.ndarray:
  """A uniform(0, 1) float64 that is a pure function of a uint64 key and a salt."""
  h = hashing.splitmix64(np.asarray(key, np.uint64) ^ hashing.splitmix64(np.uint64(salt)))
  return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * _U53


def _hash_normal(key: np.ndarray, salt: int) -> np.ndarray:
  """A standard normal that is a pure function of the key (Box-Muller on two hash uniforms)."""
  u1 = _hash_uniform(key, salt)
  u2 = _hash_uniform(key, salt + 0x5851F42D)
  return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Knobs of the synthetic stream. Defaults: Criteo-Kaggle-like sizes, one ID per feature."""

  seed: int = 0
  cardinalities: tuple[int, ...] = CRITEO_KAGGLE_CARDINALITIES
  zipf_exponent: float = 1.1
  # Max IDs per example for each feature; 1 everywhere means one-hot. A multi-hot feature draws
  # its bag length uniformly from [min_bag, max_ids] (0 allows empty bags).
  max_ids: tuple[int, ...] | None = None
  min_bag: int = 1
  # Teacher.
  bias: float = -1.2
  id_weight_scale: float = 0.35        # std of a head ID's effect, per feature
  weighted_features: int = 26          # how many features carry per-ID effects (largest first)
  rare_rank: float = 300.0             # effect of rank r shrinks as (1 + r / rare_rank)^-rare_power
  rare_power: float = 1.0
  num_pairs: int = 6                   # pairwise interaction terms among the largest features
  latent_dim: int = 4
  pair_scale: float = 0.2
  dense_scale: float = 0.3
  dense_nonlinear: float = 0.4
  drift: float = 0.0                   # identities shifted per example (0 = stationary)
  # Second label (conversion given click); see the module docstring.
  conversion: bool = False
  conversion_bias: float = -0.8
  conversion_shared: float = 0.6       # weight on the click teacher's per-ID effects
  conversion_id_weight_scale: float = 0.45   # std of the conversion-only head-ID effects
  conversion_features: int = 6         # how many features carry them (largest first, capped)
  block_size: int = 4096

  def __post_init__(self):
    if len(self.cardinalities) < 1:
      raise ValueError("SyntheticConfig.cardinalities must name at least one feature")
    if any(c < 1 for c in self.cardinalities):
      raise ValueError(f"SyntheticConfig.cardinalities must be >= 1, got {self.cardinalities}")
    if self.max_ids is not None and len(self.max_ids) != len(self.cardinalities):
      raise ValueError(f"SyntheticConfig.max_ids has {len(self.max_ids)} entries for "
                       f"{len(self.cardinalities)} features")
    if self.zipf_exponent <= 0:
      raise ValueError(f"SyntheticConfig.zipf_exponent must be > 0, got {self.zipf_exponent}")
    if self.conversion_features < 0:
      raise ValueError(f"SyntheticConfig.conversion_features must be >= 0, got "
                       f"{self.conversion_features}")

  @property
  def num_tasks(self) -> int:
    """Label columns: 1 (click) or 2 (click, conversion)."""
    return 2 if self.conversion else 1

  @property
  def num_features(self) -> int:
    return len(self.cardinalities)

  @property
  def layout(self) -> SparseLayout:
    max_ids = self.max_ids or (1,) * self.num_features
    return SparseLayout(tuple(f"C{i + 1}" for i in range(self.num_features)), tuple(max_ids))


class SyntheticCriteo:
  """The stream. ``examples(start, stop)`` gives any range; ``batches`` iterates."""

  _CACHED_BLOCKS = 4

  def __init__(self, config: SyntheticConfig = SyntheticConfig()):
    self.config = c = config
    self.layout = c.layout
    rng = np.random.default_rng([c.seed, 0x7EAC4E5])
    order = np.argsort(-np.asarray(c.cardinalities), kind="stable")
    self._weighted = np.zeros(c.num_features, bool)
    self._weighted[order[:c.weighted_features]] = True
    self._converting = np.zeros(c.num_features, bool)
    self._converting[order[:c.conversion_features]] = True
    big = order[:max(2, min(c.num_features, 8))]
    pairs = set()
    while len(pairs) < min(c.num_pairs, len(big) * (len(big) - 1) // 2):
      a, b = rng.choice(big, 2, replace=False)
      pairs.add((int(min(a, b)), int(max(a, b))))
    self.pairs = tuple(sorted(pairs))
    self._dense_mu = rng.uniform(0.0, 4.0, NUM_DENSE)
    self._dense_sigma = rng.uniform(0.6, 1.6, NUM_DENSE)
    self._dense_zero = rng.uniform(0.0, 0.4, NUM_DENSE)
    self._dense_w = rng.normal(0.0, 1.0, NUM_DENSE) * c.dense_scale
    self._dense_pair = rng.choice(NUM_DENSE, 2, replace=False)
    # Standardisation constants of log1p(count) estimated once from a fixed sample.
    sample = self._dense_counts(np.random.default_rng([c.seed, 99]), 20000)
    self._dense_mean = np.log1p(sample).mean(0)
    self._dense_std = np.log1p(sample).std(0) + 1e-6
    self._salts = [int(hashing.feature_salt(f)) for f in range(c.num_features)]
    # The last few blocks made: a batch smaller than a block (the quick start reads 1,024 of
    # 4,096), or a process's rows of each global batch, would otherwise regenerate the whole
    # block for every slice of it. Shared by the threads that read the stream (training
    # prefetch, evaluation); callers get copies, so nothing they do reaches the cache.
    self._cache: collections.OrderedDict[int, tuple[Batch, np.ndarray]] = (
        collections.OrderedDict())
    self._cache_lock = threading.Lock()

  # ---- pieces of the generator ---------------------------------------------------------------

  def _dense_counts(self, rng: np.random.Generator, n: int) -> np.ndarray:
    z = rng.standard_normal((n, NUM_DENSE))
    counts = np.floor(np.exp(self._dense_mu + self._dense_sigma * z))
    counts[rng.random((n, NUM_DENSE)) < self._dense_zero] = 0.0
    return counts

  def _zipf_ranks(self, rng: np.random.Generator, n: int, card: int, shape) -> np.ndarray:
    """Ranks 0..card-1 from a truncated continuous Zipf (inverse CDF; exact for any card)."""
    s = self.config.zipf_exponent
    u = rng.random(shape)
    if abs(s - 1.0) < 1e-9:
      x = np.exp(u * math.log(card + 1.0))
    else:
      a = 1.0 - s
      x = (1.0 + u * ((card + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, card - 1).clip(0)

  def _block(self, block: int, parts: dict | None = None) -> tuple[Batch, np.ndarray]:
    c = self.config
    n = c.block_size
    rng = np.random.default_rng([c.seed, 1, block])
    layout = self.layout
    counts = self._dense_counts(rng, n)
    dense = np.log1p(counts)
    std_dense = (dense - self._dense_mean) / self._dense_std
    logit = np.full(n, c.bias) + std_dense @ self._dense_w
    a, b = self._dense_pair
    logit += c.dense_nonlinear * np.tanh(std_dense[:, a] * std_dense[:, b])

    t = block * n + np.arange(n, dtype=np.int64)
    shift = np.floor(t * c.drift).astype(np.int64) if c.drift else np.zeros(n, np.int64)
    ids = np.zeros((n, layout.num_columns), np.uint64)
    mask = np.zeros((n, layout.num_columns), bool)
    latent: dict[int, np.ndarray] = {}
    # Conversion teacher: per-ID parts only, so the click stream's draws are untouched.
    id_effects = np.zeros(n)
    conv_logit = np.full(n, c.conversion_bias)
    for f, card in enumerate(c.cardinalities):
      L = layout.max_ids[f]
      ranks = self._zipf_ranks(rng, n, card, (n, L))
      if L == 1:
        lengths = np.ones(n, np.int64)
      else:
        lengths = rng.integers(c.min_bag, L + 1, n)
      valid = np.arange(L)[None, :] < lengths[:, None]
      identity = (ranks + shift[:, None]).astype(np.uint64)
      cols = layout.columns(f)
      ids[:, cols] = np.where(valid, hashing.feature_ids(f, identity), np.uint64(0))
      mask[:, cols] = valid
      denom = np.maximum(lengths, 1)[:, None]
      if self._weighted[f]:
        w = _hash_normal(identity, self._salts[f]) * c.id_weight_scale
        w *= (1.0 + ranks / c.rare_rank) ** (-c.rare_power)
        effect = (w * valid).sum(1) / denom[:, 0]
        logit += effect
        id_effects += effect
        if parts is not None:
          parts[f] = (ranks, effect)
      if c.conversion and self._converting[f]:
        v = _hash_normal(identity, self._salts[f] + 0x3C6EF372) * c.conversion_id_weight_scale
        v *= (1.0 + ranks / c.rare_rank) ** (-c.rare_power)
        conv_logit += (v * valid).sum(1) / denom[:, 0]
      if any(f in p for p in self.pairs):
        z = np.stack([_hash_normal(identity, self._salts[f] + 17 * (k + 1))
                      for k in range(c.latent_dim)], -1)
        z *= ((1.0 + ranks / c.rare_rank) ** (-c.rare_power))[..., None]
        latent[f] = (z * valid[..., None]).sum(1) / denom
    for f, g in self.pairs:
      pair = c.pair_scale * (latent[f] * latent[g]).sum(-1) / math.sqrt(c.latent_dim)
      logit += pair
      if parts is not None:
        parts[(f, g)] = pair
    if parts is not None:
      parts["logit"] = logit

    prob = 1.0 / (1.0 + np.exp(-logit))
    labels = (rng.random(n) < prob).astype(np.float32)
    if c.conversion:
      q = 1.0 / (1.0 + np.exp(-(conv_logit + c.conversion_shared * id_effects)))
      conv_rng = np.random.default_rng([c.seed, 2, block])
      conv = labels * (conv_rng.random(n) < q)
      labels = np.stack([labels, conv.astype(np.float32)], axis=1)
      prob = np.stack([prob, prob * q], axis=1)
      if parts is not None:
        parts["conversion_given_click"] = q
    return Batch(dense.astype(np.float32), ids, mask, labels), prob.astype(np.float32)

  def _cached_block(self, block: int) -> tuple[Batch, np.ndarray]:
    with self._cache_lock:
      hit = self._cache.get(block)
      if hit is not None:
        self._cache.move_to_end(block)
        return hit
    made = self._block(block)     # outside the lock: two threads may make two blocks at once
    with self._cache_lock:
      self._cache[block] = made
      self._cache.move_to_end(block)
      while len(self._cache) > self._CACHED_BLOCKS:
        self._cache.popitem(last=False)
    return made

  # ---- public API -------------------------------------------------------------------------------

  def examples(self, start: int, stop: int, with_prob: bool = False):
    """Examples [start, stop) of the stream as one Batch (and the teacher's probabilities)."""
    if not 0 <= start <= stop:
      raise ValueError(f"bad example range [{start}, {stop})")
    bs = self.config.block_size
    parts, probs = [], []
    for blk in range(start // bs, (stop + bs - 1) // bs):
      b, p = self._cached_block(blk)
      lo, hi = max(start - blk * bs, 0), min(stop - blk * bs, bs)
      parts.append(b.slice(lo, hi))
      probs.append(p[lo:hi])
    if not parts:
      b, p = self._cached_block(0)
      parts, probs = [b.slice(0, 0)], [p[:0]]
    batch = Batch.concat(parts)   # a copy even of one part: the cached block stays as made
    return (batch, np.concatenate(probs)) if with_prob else batch

  def batches(self, batch_size: int, start: int = 0, stop: int | None = None,
              with_prob: bool = False) -> Iterator:
    """Consecutive batches from example ``start``; the last partial batch is dropped."""
    pos = start
    while stop is None or pos + batch_size <= stop:
      yield self.examples(pos, pos + batch_size, with_prob)
      pos += batch_size

  def teacher_probability(self, start: int, stop: int) -> np.ndarray:
    """P(label = 1 | example) for [start, stop): [N], or [N, 2] (click, conversion)."""
    return self.examples(start, stop, with_prob=True)[1]


_SMALL_CARDINALITIES = (500, 100, 200000, 50000, 300, 24, 8000, 600, 3, 20000, 4000, 100000,
                        3000, 27, 10000, 60000, 10, 5000, 2000, 4, 80000, 18, 15, 30000, 100,
                        40000)


def small_config(seed: int = 0, scale: float = 1.0, **overrides) -> SyntheticConfig:
  """A laptop-sized stream: a few large features (10^4..2x10^5), the rest small. ``scale``
  shrinks every vocabulary (for tests)."""
  cards = tuple(max(3, int(c * scale)) for c in _SMALL_CARDINALITIES)
  return SyntheticConfig(seed=seed, cardinalities=cards, **overrides)
