"""The synthetic stream: determinism, random access, heavy tails, drift, bags, planted truth."""

import threading

import numpy as np
import pytest

from jaxrec.data import hashing
from jaxrec.data.synthetic import SyntheticConfig, SyntheticCriteo, small_config
from jaxrec.train.metrics import auc


def test_deterministic_and_random_access():
  g1 = SyntheticCriteo(small_config(seed=3))
  g2 = SyntheticCriteo(small_config(seed=3))
  a = g1.examples(5000, 9000)                   # crosses a block boundary (4096)
  b = g2.examples(5000, 9000)
  for f in ("dense", "ids", "mask", "labels"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  # Any sub-range regenerates exactly; batches() is the same stream.
  sub = g1.examples(6000, 6100)
  np.testing.assert_array_equal(sub.ids, a.ids[1000:1100])
  it = g1.batches(1000, start=5000)
  np.testing.assert_array_equal(next(it).labels, a.labels[:1000])
  np.testing.assert_array_equal(next(it).ids, a.ids[1000:2000])
  c = SyntheticCriteo(small_config(seed=4)).examples(5000, 9000)
  assert (c.ids != a.ids).mean() > 0.5


def _fresh(config, start, stop):
  """Examples [start, stop) straight from the block generator, no cache involved."""
  g = SyntheticCriteo(config)
  bs = config.block_size
  blocks = [g._block(k) for k in range(start // bs, (stop - 1) // bs + 1)]
  whole = {f: np.concatenate([getattr(b, f) for b, _ in blocks])
           for f in ("dense", "ids", "mask", "labels")}
  whole["prob"] = np.concatenate([p for _, p in blocks])
  off = start // bs * bs
  return {f: x[start - off:stop - off] for f, x in whole.items()}


def test_block_cache_gives_what_the_generator_makes_and_callers_cannot_spoil_it():
  config = small_config(seed=5, scale=0.1, max_ids=(3,) + (1,) * 25, drift=1e-3)
  g = SyntheticCriteo(config)
  # Batches smaller than a block, straddling blocks, revisited out of order, beyond the cache.
  ranges = [(0, 1000), (1000, 2000), (3900, 4300), (100, 200), (20000, 20100), (0, 4096),
            (9000, 17000), (4095, 4097), (500, 500)]
  for start, stop in ranges:
    got, prob = g.examples(start, stop, with_prob=True)
    want = _fresh(config, start, stop)
    for f in ("dense", "ids", "mask", "labels"):
      np.testing.assert_array_equal(getattr(got, f), want[f], err_msg=f"{f} [{start}, {stop})")
    np.testing.assert_array_equal(prob, want["prob"])
    # Whatever a caller does to its batch stays in its batch.
    got.labels[:] = -1.0
    got.ids[:] = 7
    got.dense[:] = np.nan
    prob[:] = 2.0
  again = g.examples(0, 1000)
  np.testing.assert_array_equal(again.ids, _fresh(config, 0, 1000)["ids"])
  assert len(g._cache) <= g._CACHED_BLOCKS


def test_threads_reading_the_stream_at_once_get_the_serial_answer():
  config = small_config(seed=6, scale=0.1)
  g = SyntheticCriteo(config)
  starts = [i * 700 for i in range(40)]
  out, errors = {}, []

  def read(offset):
    try:
      for st in starts[offset::4]:
        out[st] = g.examples(st, st + 700).ids
    except BaseException as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[0]
  serial = _fresh(config, 0, starts[-1] + 700)["ids"]
  for st in starts:
    np.testing.assert_array_equal(out[st], serial[st:st + 700], err_msg=f"start {st}")


def test_shapes_ids_are_64_bit_hashes_and_dense_heavy_tailed():
  g = SyntheticCriteo(SyntheticConfig(seed=0))       # Criteo-Kaggle cardinalities
  b = g.examples(0, 20000)
  assert b.dense.shape == (20000, 13) and b.ids.shape == (20000, 26) and b.mask.all()
  assert b.ids.dtype == np.uint64 and b.ids.max() > np.uint64(2**62)   # not 0..V-1
  # Feature 9 (card 3) has exactly 3 IDs; feature 3 (card 10^7) many.
  assert len(np.unique(b.ids[:, 8])) == 3
  assert len(np.unique(b.ids[:, 2])) > 3000
  # Zipf: the top ID of a large feature is far more frequent than the median one.
  _, counts = np.unique(b.ids[:, 2], return_counts=True)
  assert counts.max() > 50 * np.median(counts)
  counts_raw = np.expm1(b.dense)
  assert (counts_raw >= 0).all()
  assert np.percentile(counts_raw, 99.9) > 20 * np.median(counts_raw[counts_raw > 0])


def test_ids_match_the_documented_hashing():
  cfg = SyntheticConfig(seed=0, cardinalities=(1,), weighted_features=1, num_pairs=0)
  b = SyntheticCriteo(cfg).examples(0, 10)
  np.testing.assert_array_equal(b.ids[:, 0], hashing.feature_ids(0, np.zeros(10, np.uint64)))


def test_multi_hot_bags_and_empty_bags():
  cfg = small_config(seed=1, max_ids=(5,) + (1,) * 25, min_bag=0)
  g = SyntheticCriteo(cfg)
  b = g.examples(0, 5000)
  assert b.ids.shape == (5000, 30)
  lengths = b.mask[:, :5].sum(1)
  assert set(np.unique(lengths)) == {0, 1, 2, 3, 4, 5}
  assert (b.ids[:, :5][~b.mask[:, :5]] == 0).all()
  # Valid slots are prefixes.
  assert (np.diff(b.mask[:, :5].astype(int), axis=1) <= 0).all()


def test_drift_brings_new_ids():
  still = SyntheticCriteo(small_config(seed=2))
  moving = SyntheticCriteo(small_config(seed=2, drift=0.01))
  def new_share(g):
    early = set(g.examples(0, 20000).ids[:, 2].tolist())
    late = g.examples(200000, 220000).ids[:, 2]
    return np.mean([x not in early for x in late.tolist()])
  assert new_share(moving) > new_share(still) + 0.2


def test_planted_truth():
  g = SyntheticCriteo(small_config(seed=0))
  b, p = g.examples(0, 100000, with_prob=True)
  assert ((p > 0) & (p < 1)).all()
  # Labels are Bernoulli(p): calibration in deciles.
  q = np.quantile(p, np.linspace(0, 1, 11))
  for lo, hi in zip(q[:-1], q[1:]):
    sel = (p >= lo) & (p < hi)
    assert abs(b.labels[sel].mean() - p[sel].mean()) < 0.02
  bayes = auc(b.labels, p)
  assert 0.75 < bayes < 0.9
  # The Bayes predictor is better than any single feature's effect or the dense part alone.
  assert auc(b.labels, b.dense @ np.ones(13)) < bayes - 0.1


def test_bad_config_errors():
  with pytest.raises(ValueError, match="max_ids"):
    SyntheticConfig(cardinalities=(3, 4), max_ids=(1,))
  with pytest.raises(ValueError, match="cardinalities"):
    SyntheticConfig(cardinalities=(0,))


def test_conversion_label_keeps_the_click_stream_and_is_calibrated():
  base = SyntheticCriteo(small_config(seed=0))
  both = SyntheticCriteo(small_config(seed=0, conversion=True))
  assert base.config.num_tasks == 1 and both.config.num_tasks == 2
  a, pa = base.examples(3000, 123000, with_prob=True)
  b, pb = both.examples(3000, 123000, with_prob=True)
  assert b.labels.shape == (120000, 2) and pb.shape == (120000, 2)
  # The click stream is bit-identical with the second label on.
  for f in ("dense", "ids", "mask"):
    np.testing.assert_array_equal(getattr(b, f), getattr(a, f))
  np.testing.assert_array_equal(b.labels[:, 0], a.labels)
  np.testing.assert_array_equal(pb[:, 0], pa)
  click, conv = b.labels[:, 0], b.labels[:, 1]
  assert (conv <= click).all() and 0.02 < conv.mean() < 0.15      # only clicks convert
  q = pb[:, 1] / pb[:, 0]                                         # P(conversion | click, x)
  assert ((q > 0) & (q < 1)).all() and q.std() > 0.1
  # Conversion labels are Bernoulli(P(click) * q): calibration in deciles, over all examples
  # and, as Bernoulli(q), among the clicks.
  for y, p in ((conv, pb[:, 1]), (conv[click == 1], q[click == 1])):
    edges = np.quantile(p, np.linspace(0, 1, 11))
    for lo, hi in zip(edges[:-1], edges[1:]):
      sel = (p >= lo) & (p < hi)
      assert abs(y[sel].mean() - p[sel].mean()) < 0.025
  # The conversion teacher has effects of its own: ranking by P(click) alone is worse.
  bayes = auc(conv, pb[:, 1])
  assert 0.8 < bayes < 0.97 and bayes > auc(conv, pb[:, 0]) + 0.01
  # Random access holds for both labels.
  np.testing.assert_array_equal(both.examples(4000, 4200).labels, b.labels[1000:1200])


def test_conversion_config_errors():
  with pytest.raises(ValueError, match="conversion_features"):
    SyntheticConfig(cardinalities=(3, 4), conversion_features=-1)
