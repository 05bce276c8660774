"""The engine's wire options: dedup on/off and bf16/fp16/int8 rows in its all-to-alls, against
the fp32 deduplicated exchange (itself tested against numpy in test_sharded_embedding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.comm.accounting import collective_bytes
from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec

LR = 0.5


def _setup(shape, opt="sgd", **kw):
  mesh = make_mesh(shape)
  o = SparseOptimizer(opt, learning_rate=LR)
  kinds = ["row_wise", "table_wise", None, "row_wise"]   # None: small, replicated by the planner
  tables = [TableSpec(f"t{i}", rows=[300, 200, 40, 500][i], dim=16, optimizer=o, sharding=k)
            for i, k in enumerate(kinds)]
  features = [FeatureSpec(f"f{i}", f"t{i}", "sum", [1, 3, 2, 4][i]) for i in range(4)]
  return ShardedEmbedding(tables, features, mesh, batch_size=64, **kw)


def _batch(emb, seed=0, batch=64):
  rng = np.random.default_rng(seed)
  cols = emb.layout.num_columns
  ids = np.minimum(rng.zipf(1.2, (batch, cols)), 2000).astype(np.uint64)  # many repeats
  mask = rng.random((batch, cols)) < 0.8
  return ids.view(np.uint32).reshape(batch, cols, 2), mask


def _step(emb):
  def f(state, ids, mask, g):
    feats, vjp, _ = jax.vjp(lambda st: emb.lookup(st, ids, mask, 1), state, has_aux=True)
    return feats, vjp(g)[0]
  return jax.jit(f)


def _grads(emb, batch, seed=1):
  # Positive gradients: a sender's partial sum of a row never exceeds the row's total.
  rng = np.random.default_rng(seed)
  return [rng.uniform(0.5, 1.0, (batch, d)).astype(np.float32) for d in emb.feature_dims]


_REF = {}


def _reference(shape):
  """The fp32, deduplicated run of ``_setup(shape)`` (compiled once per module)."""
  if shape not in _REF:
    emb = _setup(shape)
    _REF[shape] = (emb,) + _run(emb)
  return _REF[shape]


def _run(emb, seed=0):
  ids, mask = _batch(emb, seed)
  state = emb.init(7)
  feats, new = _step(emb)(state, ids, mask, _grads(emb, 64))
  before, _ = emb.to_dense(state)
  after, _ = emb.to_dense(new)
  return ([np.asarray(f) for f in feats], {t: after[t] - before[t] for t in after},
          before)


@pytest.mark.parametrize("shape,opt", [((8,), "rowwise_adagrad"), ((2, 4), "sgd")])
def test_dedup_off_sends_every_lookup_with_the_same_result(shape, opt):
  on = _setup(shape, opt)
  off = _setup(shape, opt, dedup=False)
  f_on, d_on, _ = _reference(shape)[1:] if opt == "sgd" else _run(on)
  f_off, d_off, _ = _run(off)
  for a, b in zip(f_on, f_off):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for t in d_on:
    np.testing.assert_allclose(d_off[t], d_on[t], rtol=1e-5, atol=1e-6)
    assert np.abs(d_on[t]).max() > 0
  # Without dedup, buckets must hold every lookup: capacity grows past the distinct rows.
  si = next(i for i, s in enumerate(on.stacks) if not s.replicated)
  assert off.capacity(off.stacks[si], 8) >= on.capacity(on.stacks[si], 8)


REL = {"bf16": 2**-8, "fp16": 2**-11, "int8": 1 / 254 * (1 + 2**-7)}  # half a step, relative


@pytest.mark.parametrize("shape,p", [((8,), "int8"), ((2, 4), "int8"), ((2, 4), "bf16"),
                                     ((8,), "fp16")])
def test_quantised_gradient_exchange_is_within_the_row_scale(shape, p):
  _, f_32, d32, _ = _reference(shape)
  f_q, dq, _ = _run(_setup(shape, precision=p))
  for a, b in zip(f_q, f_32):  # the forward is untouched
    np.testing.assert_array_equal(a, b)
  worst = 0.0
  for t in d32:
    # SGD: delta = -lr * sum over senders of their row sums, each sent at precision p;
    # each sender's row max is <= the row's total max (positive gradients), 8 senders.
    err = np.abs(dq[t] - d32[t]).max(1)
    bound = 8 * REL[p] * np.abs(d32[t]).max(1) * (1 + 1e-4) + 1e-7
    assert (err <= bound).all(), (p, t, (err / bound).max())
    worst = max(worst, err.max())
  assert worst > 0, p  # really quantised


def test_int8_forward_rows_within_the_row_scale():
  ref, f32, _, table = _reference((2, 4))
  fq, _, _ = _run(_setup((2, 4), forward_precision="int8"))
  for fi, f in enumerate(ref.features):
    if ref.plan[f.table].kind == "data_parallel":
      np.testing.assert_array_equal(fq[fi], f32[fi])     # gathered locally, no wire
      continue
    # A pooled bag of up to max_ids rows, each off by at most half its row's scale.
    step = np.abs(table[f.table]).max() / 254 * (1 + 2**-7)
    err = np.abs(fq[fi] - f32[fi]).max()
    assert 0 < err <= f.max_ids * step, (f.name, err, step)


def test_int8_exchange_cuts_all_to_all_bytes():
  def a2a_bytes(**kw):
    emb = _setup((2, 4), **kw)
    ids, mask = _batch(emb)
    state = emb.init(7)
    args = (state, ids, mask, _grads(emb, 64))
    c = _step(emb).lower(*args).compile()
    return collective_bytes(c, emb.mesh)["by_kind"], c(*args)
  b32, _ = a2a_bytes()
  b8, out8 = a2a_bytes(precision="int8", forward_precision="int8")
  b8c, out8c = a2a_bytes(precision="int8", forward_precision="int8", compact_ids=True)
  # uint16 IDs (every slab here has < 65536 rows): 2 B less per row, the same result.
  assert b8c["all-to-all"] == pytest.approx(b32["all-to-all"] * 38 / 132, rel=1e-6)
  assert b8c["all-gather"] == pytest.approx(b32["all-gather"] * (2 + 18) / (4 + 64), rel=1e-6)
  for a, b in zip(jax.tree.leaves(out8), jax.tree.leaves(out8c)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Per exchanged row: int32 ID + 2 x 16 fp32 values (128+4 B) vs + 2 x (16 + 2) int8 (36+4 B).
  assert b8["all-to-all"] == pytest.approx(b32["all-to-all"] * 40 / 132, rel=1e-6)
  # The replicated table's gradient all_gather: int32 rows + 16 values, fp32 vs int8.
  assert b8["all-gather"] == pytest.approx(b32["all-gather"] * (4 + 18) / (4 + 64), rel=1e-6)
  with pytest.raises(ValueError, match="embedding precision='int4'"):
    _setup((8,), precision="int4")
