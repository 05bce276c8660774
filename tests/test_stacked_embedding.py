"""The per-shard sparse update and the 1-device engine against references written the obvious
way (the multi-device engine is tested in test_sharded_embedding.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec
from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.embedding.stacked import sparse_update

import reference


def _dense_reference(opt, table, slots, rows, grads, valid, step):
  """Dense gradient [rows, dim], then the optimizer on touched rows only."""
  dense_g = np.zeros_like(table)
  np.add.at(dense_g, rows[valid], grads[valid])
  touched = np.unique(rows[valid])
  new_t = table.copy()
  new_s = {k: v.copy() for k, v in slots.items()}
  w, s = optimizers.apply_rows(opt, jnp.asarray(table[touched]),
                               {k: jnp.asarray(v[touched]) for k, v in slots.items()},
                               jnp.asarray(dense_g[touched]), step)
  new_t[touched] = np.asarray(w)
  for k in new_s:
    new_s[k][touched] = np.asarray(s[k])
  return new_t, new_s


def _rowwise_adagrad_by_hand(table, acc, rows, grads, valid, lr, eps):
  table, acc = table.astype(np.float64), acc.astype(np.float64)
  g = {}
  for r, gr, v in zip(rows, grads, valid):
    if v:
      g[r] = g.get(r, 0) + gr.astype(np.float64)
  for r, gr in g.items():
    acc[r] += np.mean(gr * gr)
    table[r] -= lr * gr / (np.sqrt(acc[r]) + eps)
  return table, acc


@pytest.mark.parametrize("name", ["sgd", "rowwise_adagrad", "adagrad", "adam", "ftrl"])
def test_sparse_update_matches_dense_reference(name):
  rng = np.random.default_rng(0)
  rows_n, dim, n = 50, 8, 400
  opt = SparseOptimizer(name=name, learning_rate=0.1, initial_accumulator=0.1, l1=0.01, l2=0.01)
  table = rng.normal(size=(rows_n, dim)).astype(np.float32)
  slots = {k: np.asarray(v) + 0.0 for k, v in optimizers.init_slots(opt, rows_n, dim).items()}
  rows = rng.integers(0, 20, n).astype(np.int32)      # 20 of 50 rows touched, many duplicates
  grads = rng.normal(size=(n, dim)).astype(np.float32)
  valid = rng.random(n) < 0.8
  for step in (1, 2, 3):
    ref_t, ref_s = _dense_reference(opt, table, slots, rows, grads, valid, step)
    t, s = jax.jit(sparse_update, static_argnums=0)(opt, jnp.asarray(table), slots,
                                                    jnp.asarray(rows), jnp.asarray(grads),
                                                    jnp.asarray(valid), step)
    np.testing.assert_allclose(np.asarray(t), ref_t, rtol=1e-6, atol=1e-6)
    for k in ref_s:
      np.testing.assert_allclose(np.asarray(s[k]), ref_s[k], rtol=1e-6, atol=1e-6)
    untouched = np.setdiff1d(np.arange(rows_n), rows[valid])
    np.testing.assert_array_equal(np.asarray(t)[untouched], table[untouched])
    table, slots = np.asarray(t), {k: np.asarray(v) for k, v in s.items()}
    grads = rng.normal(size=(n, dim)).astype(np.float32)


def test_rowwise_adagrad_matches_hand_loop():
  rng = np.random.default_rng(1)
  opt = SparseOptimizer(name="rowwise_adagrad", learning_rate=0.05, initial_accumulator=0.0)
  table = rng.normal(size=(30, 4)).astype(np.float32)
  acc = np.zeros(30, np.float32)
  rows = np.array([3, 3, 7, 3, 29, 0, 7], np.int32)
  grads = rng.normal(size=(7, 4)).astype(np.float32)
  valid = np.array([True, True, True, False, True, True, True])
  t, s = sparse_update(opt, jnp.asarray(table), {"acc": jnp.asarray(acc)}, jnp.asarray(rows),
                       jnp.asarray(grads), jnp.asarray(valid), 1)
  ref_t, ref_acc = _rowwise_adagrad_by_hand(table, acc, rows, grads, valid, 0.05, 1e-8)
  np.testing.assert_allclose(np.asarray(t), ref_t, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s["acc"]), ref_acc, rtol=1e-6, atol=1e-7)


def test_lookup_and_pooling_match_take():
  """The engine on a 1-device mesh (the single-device path): pooled bags equal numpy takes of
  the same rows; features sharing a table read the same rows."""
  rng = np.random.default_rng(2)
  tables = [TableSpec("a", 100, 4), TableSpec("b", 37, 4)]
  feats = [FeatureSpec("f0", "a", "sum", 3), FeatureSpec("f1", "b", "mean", 2),
           FeatureSpec("f2", "a", "sum", 1)]                       # f0 and f2 share table a
  emb = ShardedEmbedding(tables, feats, make_mesh((1,)))
  assert len(emb.stacks) == 1 and emb.stacks[0].replicated        # one stack, one gather
  state = emb.init(0)
  b = 16
  ids = rng.integers(0, 2**63, (b, 6), dtype=np.uint64)
  ids[:, 5] = ids[:, 0]                                            # f2 repeats f0's first ID
  mask = rng.random((b, 6)) < 0.7
  mask[:, 0] = mask[:, 5] = True
  mask[0, :3] = False                                              # an empty bag
  u32 = ids.view(np.uint32).reshape(b, 6, 2)
  pooled, _, _ = emb.forward(state, jnp.asarray(u32), jnp.asarray(mask))
  dense, _ = emb.to_dense(state)
  np.testing.assert_array_equal(np.asarray(pooled[0][0]), 0.0)
  np.testing.assert_allclose(pooled[2][1:], dense["a"][_rows(ids[1:, 5], "a", 100)], rtol=1e-6)
  # Each bag is a sum / mean of rows of its own table.
  e0 = dense["a"][_rows(ids[:, :3], "a", 100)] * mask[:, :3, None]
  np.testing.assert_allclose(pooled[0], e0.sum(1), rtol=1e-5, atol=1e-6)
  e1 = dense["b"][_rows(ids[:, 3:5], "b", 37)] * mask[:, 3:5, None]
  count = np.maximum(mask[:, 3:5].sum(1, keepdims=True), 1)
  np.testing.assert_allclose(pooled[1], e1.sum(1) / count, rtol=1e-5, atol=1e-6)


def _rows(ids, table, rows):
  """hash32(id) % rows with the documented hash (murmur3 fmix32 of lo ^ fmix32(hi ^ salt))."""
  return reference.hashed_rows(ids, table, rows)


@pytest.mark.parametrize("dim", [4, 8, 12, 16, 64])
def test_take_rows_is_row_indexing_with_zero_fill(dim):
  from jaxrec.embedding.routing import take_rows
  rng = np.random.default_rng(dim)
  table = rng.normal(size=(30, dim)).astype(np.float32)
  idx = rng.integers(0, 33, (7, 5)).astype(np.int32)   # 30..32 are out of range
  want = np.where((idx < 30)[..., None], table[np.minimum(idx, 29)], 0)
  np.testing.assert_array_equal(take_rows(jnp.asarray(table), jnp.asarray(idx)), want)
