"""Dynamic tables (a hash table per shard) in the engine and the train step: 8 devices follow
1 exactly, IDs without a row read zeros and are never updated, stats reach the metrics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxrec import models
from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding.dynamic import DynamicEmbedding
from jaxrec.embedding.specs import DynamicSpec, FeatureSpec, SparseOptimizer, TableSpec
from jaxrec.train import builders
from jaxrec.train.state import TrainState, place_state
from jaxrec.train.step import jit_steps

BATCH = 32
TABLES = [TableSpec("t", None, 8, optimizer=SparseOptimizer("rowwise_adagrad", 0.1),
                    init_scale=0.1,
                    dynamic=DynamicSpec(capacity=512, min_count=2, steps_to_live=2,
                                        evict_every_steps=2))]
FEATURES = [FeatureSpec("bag", "t", "sum", 3), FeatureSpec("seq", "t", "none", 2)]
COLS = 5


@functools.cache
def _engine(shape: tuple[int, ...]):
  emb = DynamicEmbedding(TABLES, FEATURES, make_mesh(shape))
  return emb, jax.jit(emb.forward_train), jax.jit(emb.update)


def _ids(raw: np.ndarray, emb) -> jax.Array:
  """uint64 [B, C] -> sharded uint32 (lo, hi) pairs; IDs spread over all 64 bits."""
  ids = (raw.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
  return jax.device_put(ids.view(np.uint32).reshape(*raw.shape, 2), emb.batch_sharding)


def _key(raw: int) -> np.uint64:
  return np.uint64((int(raw) + 1) * 0x9E3779B97F4A7C15 % 2**64)


def _grads(feats):
  return [0.5 * f + 0.1 * (i + 1) for i, f in enumerate(feats)]


def _run(shape: tuple[int, ...], steps: int = 5, seed: int = 0):
  emb, fwd, upd = _engine(shape)
  rng = np.random.default_rng(seed)
  state = emb.init()
  feats_seen, stats_seen = [], []
  for step in range(1, steps + 1):
    raw = rng.integers(0, 40 + 10 * step, (BATCH, COLS))
    mask = jax.device_put(rng.random((BATCH, COLS)) < 0.8, emb.batch_sharding)
    state, feats, res, stats = fwd(state, _ids(raw, emb), mask, step)
    state = upd(state, res, _grads(feats), step)
    feats_seen.append([np.asarray(f) for f in feats])
    stats_seen.append(jax.device_get(stats))
  return emb.export(state), feats_seen, stats_seen


@pytest.mark.parametrize("shape", [(8,), pytest.param((2, 4), marks=pytest.mark.slow)])
def test_eight_shards_follow_one_exactly(shape):
  one, feats1, stats1 = _run((1,))
  eight, feats8, stats8 = _run(shape)
  for a, b in zip(feats1, feats8):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  e1, e8 = one["t"], eight["t"]
  assert len(e1["keys"]) > 0
  np.testing.assert_array_equal(e1["keys"], e8["keys"])
  np.testing.assert_array_equal(e1["values"], e8["values"])
  np.testing.assert_array_equal(e1["slots"]["acc"], e8["slots"]["acc"])
  np.testing.assert_array_equal(e1["frequency"], e8["frequency"])
  np.testing.assert_array_equal(e1["last_seen"], e8["last_seen"])
  for s1, s8 in zip(stats1, stats8):
    for k in ("t/size", "t/admitted", "t/not_admitted", "t/evicted", "t/hits", "t/lookups"):
      assert int(s1[k]) == int(s8[k]), k
  assert sum(int(s["t/evicted"]) for s in stats1) > 0      # age eviction ran
  assert sum(int(s["t/not_admitted"]) for s in stats1) > 0  # admission filtered


def test_ids_without_a_row_read_zeros_and_are_not_updated():
  emb, fwd, upd = _engine((8,))
  state = emb.init()
  mask = jax.device_put(np.ones((BATCH, COLS), bool), emb.batch_sharding)
  first = np.arange(BATCH * COLS).reshape(BATCH, COLS)            # all new, seen once
  state, feats, res, stats = fwd(state, _ids(first, emb), mask, 1)
  for f in feats:
    assert not np.asarray(f).any()                                # zeros, not a hash init
  assert int(stats["t/not_admitted"]) == BATCH * COLS and int(stats["t/size"]) == 0
  state = upd(state, res, _grads(feats), 1)
  assert len(emb.export(state)["t"]["keys"]) == 0                 # nothing was written

  # Step 2: the first half of the IDs come back (second sighting: admitted), the rest are new.
  second = first.copy()
  second[BATCH // 2:] += 10_000
  state, feats, res, stats = fwd(state, _ids(second, emb), mask, 2)
  seq = np.asarray(feats[1])                                       # [B, 2, dim], per ID
  assert np.abs(seq[:BATCH // 2]).min(axis=-1).all()               # admitted: hash-initialised
  assert not seq[BATCH // 2:].any()                                # new: zeros
  assert int(stats["t/admitted"]) == BATCH // 2 * COLS
  state = upd(state, res, _grads(feats), 2)
  e = emb.export(state)["t"]
  assert set(e["keys"].tolist()) == {int(_key(k)) for k in first[:BATCH // 2].ravel()}
  assert (e["slots"]["acc"] > 0).all()                             # every held row trained


def _dlrm(mesh, tables, features):
  emb = DynamicEmbedding(tables, features, mesh)
  model = models.build_model("dlrm", num_dense=4, num_sparse=len(features),
                             embedding_dim=tables[0].dim, bottom_mlp=(16, tables[0].dim),
                             top_mlp=(16, 1), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = builders.dense_optimizer(
      ml_collections.ConfigDict({"name": "adam", "learning_rate": 3e-3, "warmup_steps": 5}), 100)
  state = place_state(TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                                 emb.init(1)), emb)
  train, evaluate = jit_steps(graphdef, emb, tx, state)
  return emb, state, train, evaluate


def test_train_step_reports_table_stats():
  tables = [TableSpec("u", None, 8, init_scale=0.1,
                      dynamic=DynamicSpec(capacity=256, min_count=2))]
  features = [FeatureSpec("f0", "u"), FeatureSpec("f1", "u")]
  emb, state, train, evaluate = _dlrm(make_mesh((1,)), tables, features)
  rng = np.random.default_rng(1)
  seen: dict[int, int] = {}
  for step in range(1, 5):
    raw = rng.integers(0, 30, (BATCH, 2))
    for k in raw.ravel():
      seen[int(k)] = seen.get(int(k), 0) + 1
    dense = rng.normal(size=(BATCH, 4)).astype(np.float32)
    batch = {"dense": dense, "ids": _ids(raw, emb), "mask": np.ones((BATCH, 2), bool),
             "labels": (dense[:, 0] > 0).astype(np.float32)}
    state, m = train(state, batch)
  for k in ("size", "load_factor", "admitted", "not_admitted", "rejected", "evicted",
            "probe_mean", "insert_failures", "overflow"):
    assert f"dynamic/u/{k}" in m, k
  held = emb.export(state.emb)["u"]["keys"]
  # Admission threshold 2: exactly the IDs seen at least twice hold a row.
  assert int(m["dynamic/u/size"]) == len(held) == sum(c >= 2 for c in seen.values())
  assert int(m["dynamic/size"]) == len(held)
  assert float(m["dynamic/u/load_factor"]) == pytest.approx(len(held) / 256)
  assert int(m["dynamic/u/rejected"]) == 0 and int(m["dynamic/u/insert_failures"]) == 0
  assert float(m["dynamic/u/probe_mean"]) >= 1.0
  assert np.isfinite(float(m["loss"]))
  preds = np.asarray(evaluate(state, batch))
  assert preds.shape == (BATCH,) and np.isfinite(preds).all()
