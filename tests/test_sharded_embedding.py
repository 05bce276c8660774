"""The sharded engine against a single-device dense reference written the obvious way.

Reference: numpy hashing of IDs to rows, ``jnp.take`` + masked pooling, the dense gradient of
a linear loss w.r.t. whole tables (autodiff of take), and each optimizer in numpy applied to
the touched rows. The engine runs every sharding type and optimizer on meshes (1,), (8,) and
(2, 4), on random jagged batches with duplicates, empty bags and padding.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec

import reference

MESHES = {"1": ((1,), ("data",)), "8": ((8,), ("data",)), "2x4": ((2, 4), ("host", "local"))}
OPTS = ("sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl")
TYPES = ("data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise")


def make_mesh(name):
  shape, axes = MESHES[name]
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:int(np.prod(shape))])


# ---- the reference -----------------------------------------------------------------------------

def ref_rows(table: TableSpec, ids: np.ndarray):
  """(rows, dropped) of uint64 IDs: hash32(id) % rows, or the ID itself for index tables."""
  rows = reference.hashed_rows(ids, table.name, table.rows)
  if table.ids == "hashed":
    return rows, np.zeros(ids.shape, bool)
  ok = ids < np.uint64(table.rows)
  rows = np.where(ok, np.where(ok, ids, 0).astype(np.int64), rows)
  return rows, (~ok if table.out_of_range == "error" else np.zeros(ids.shape, bool))


def ref_lookup(tables, features, dense, ids, mask):
  """Per feature, the pooled embedding (jnp.take on the dense tables); also rows/valid."""
  out, rows_valid, c = [], [], 0
  for f in features:
    t = tables[f.table]
    rows, drop = ref_rows(t, ids[:, c:c + f.max_ids])
    valid = mask[:, c:c + f.max_ids] & ~drop
    rows_valid.append((rows, valid))
    e = jnp.take(dense[f.table], jnp.asarray(rows), axis=0) * jnp.asarray(valid)[..., None]
    if f.pooling == "sum":
      e = e.sum(1)
    elif f.pooling == "mean":
      e = e.sum(1) / np.maximum(valid.sum(1), 1)[:, None]
    out.append(e)
    c += f.max_ids
  return out, rows_valid


def ref_optimizer(opt: SparseOptimizer, w, slots, g, step):
  """One step of ``opt`` on rows w [U, D] with gradient g [U, D], in float64 numpy."""
  w, g = w.astype(np.float64), g.astype(np.float64)
  s = {k: v.astype(np.float64) for k, v in slots.items()}
  lr = opt.learning_rate
  if opt.name == "sgd":
    return w - lr * g, {}
  if opt.name == "rowwise_adagrad":
    acc = s["acc"] + (g * g).mean(1)
    return w - lr * g / (np.sqrt(acc)[:, None] + opt.eps), {"acc": acc}
  if opt.name == "adagrad":
    acc = s["acc"] + g * g
    return w - lr * g / (np.sqrt(acc) + opt.eps), {"acc": acc}
  if opt.name == "adam":
    m = opt.beta1 * s["m"] + (1 - opt.beta1) * g
    v = opt.beta2 * s["v"] + (1 - opt.beta2) * g * g
    mh, vh = m / (1 - opt.beta1 ** step), v / (1 - opt.beta2 ** step)
    return w - lr * mh / (np.sqrt(vh) + opt.eps), {"m": m, "v": v}
  if opt.name == "ftrl":  # FTRL-Proximal (McMahan et al. 2013), TensorFlow's l2 convention
    p = -opt.lr_power
    n = s["n"] + g * g
    z = s["z"] + g - (n ** p - s["n"] ** p) / lr * w
    quad = n ** p / lr + 2 * opt.l2
    w = np.where(np.abs(z) > opt.l1, (np.sign(z) * opt.l1 - z) / quad, 0.0)
    return w, {"z": z, "n": n}
  raise ValueError(opt.name)


def ref_initial_slots(opt: SparseOptimizer, rows: int, dim: int):
  a = np.float32(opt.initial_accumulator)  # slots are float32
  return {"sgd": {}, "rowwise_adagrad": {"acc": np.full(rows, a)},
          "adagrad": {"acc": np.full((rows, dim), a)},
          "adam": {"m": np.zeros((rows, dim)), "v": np.zeros((rows, dim))},
          "ftrl": {"z": np.zeros((rows, dim)), "n": np.full((rows, dim), a)}}[opt.name]


def ref_step(tables, features, dense, slots, ids, mask, cts, step):
  """Pooled outputs, then the dense gradient of sum(pooled * cts) applied to touched rows."""

  def loss(d):
    pooled, _ = ref_lookup(tables, features, d, ids, mask)
    return sum(jnp.sum(p * c) for p, c in zip(pooled, cts))

  pooled, rows_valid = ref_lookup(tables, features, {k: jnp.asarray(v) for k, v in dense.items()},
                                  ids, mask)
  grads = jax.grad(loss)({k: jnp.asarray(v, jnp.float32) for k, v in dense.items()})
  touched: dict[str, list] = {k: [] for k in dense}
  for f, (rows, valid) in zip(features, rows_valid):
    touched[f.table].append(rows[valid])
  new_dense, new_slots = {}, {}
  for name, t in tables.items():
    new_dense[name] = dense[name].copy()
    new_slots[name] = {k: v.copy() for k, v in slots[name].items()}
    rows = np.unique(np.concatenate(touched[name])) if touched[name] else np.zeros(0, int)
    if not len(rows):
      continue
    g = np.asarray(grads[name])[rows]
    w, s = ref_optimizer(t.optimizer, dense[name][rows], {k: v[rows] for k, v in
                                                          slots[name].items()}, g, step)
    new_dense[name][rows] = w
    for k in s:
      new_slots[name][k][rows] = s[k]
  return [np.asarray(p) for p in pooled], new_dense, new_slots


# ---- batches -----------------------------------------------------------------------------------

def random_batch(rng, features, tables, batch, vocab=40):
  """Jagged bags (empty ones included) of IDs drawn from a small vocabulary (many duplicates);
  index tables get a few negative / too large IDs."""
  cols = sum(f.max_ids for f in features)
  ids = np.zeros((batch, cols), np.uint64)
  mask = np.zeros((batch, cols), bool)
  c = 0
  for f in features:
    t = tables[f.table]
    lengths = rng.integers(0, f.max_ids + 1, batch) if f.max_ids > 1 else (
        rng.random(batch) < 0.9).astype(int)
    vals = rng.integers(0, vocab, (batch, f.max_ids)).astype(np.uint64)
    if t.ids == "hashed":
      vals = (vals * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0xABCDEF12345)
    else:
      vals = vals % np.uint64(t.rows + 3)  # a few IDs >= rows
      vals[rng.random(vals.shape) < 0.05] = np.uint64(2**64 - 1)  # -1 as int64
    m = np.arange(f.max_ids)[None, :] < lengths[:, None]
    ids[:, c:c + f.max_ids] = np.where(m, vals, 0)
    mask[:, c:c + f.max_ids] = m
    c += f.max_ids
  return ids, mask


def u32(ids):
  return ids.view(np.uint32).reshape(*ids.shape, 2)


# ---- the tests ---------------------------------------------------------------------------------

def every_type_and_optimizer(rotation: int, same: str | None = None):
  """One table per sharding type, each with a different optimizer (rotated; or all ``same``,
  which puts the sharded ones in one stack), two features per table (a one-hot and a
  multi-hot sum/mean/none bag), and index tables with both out-of-range policies."""
  tables, features = [], []
  for i, kind in enumerate(TYPES):
    opt = SparseOptimizer(same or OPTS[(i + rotation) % len(OPTS)], learning_rate=0.05,
                          initial_accumulator=0.1, l1=0.001, l2=0.01)
    dim = 16 if kind == "column_wise" else 8
    tables.append(TableSpec(f"t_{kind}", rows=37 + 11 * i, dim=dim, optimizer=opt,
                            sharding=kind, column_shards=2 if kind == "column_wise" else None,
                            init_scale=0.5, initializer="normal" if i == 1 else "uniform"))
    features.append(FeatureSpec(f"f_{kind}", f"t_{kind}", "sum", 1))
    features.append(FeatureSpec(f"g_{kind}", f"t_{kind}", ("sum", "mean", "none")[i % 3], 3))
  opt = SparseOptimizer(same or OPTS[rotation % len(OPTS)], learning_rate=0.05,
                        initial_accumulator=0.1, l1=0.001, l2=0.01)
  tables.append(TableSpec("idx_hash", rows=23, dim=8, optimizer=opt, sharding="row_wise",
                          ids="index", out_of_range="hash"))
  tables.append(TableSpec("idx_drop", rows=19, dim=8, optimizer=opt, sharding="table_wise",
                          ids="index", out_of_range="error"))
  features.append(FeatureSpec("f_idx_hash", "idx_hash", "sum", 2))
  features.append(FeatureSpec("f_idx_drop", "idx_drop", "mean", 2))
  return tables, features


def run_against_reference(mesh_name, rotation=0, same=None, steps=3, batch=32,
                          capacity_factor=None, tables_features=None):
  tables, features = tables_features or every_type_and_optimizer(rotation, same)
  spec = {t.name: t for t in tables}
  mesh = make_mesh(mesh_name)
  emb = ShardedEmbedding(tables, features, mesh, capacity_factor=capacity_factor)
  for t in tables:  # the overrides won
    assert emb.plan[t.name].kind == t.sharding
  state = emb.init(7)
  dense, slots = emb.to_dense(state)
  dense = {k: v.astype(np.float64) for k, v in dense.items()}
  slots = {k: {kk: vv.astype(np.float64) for kk, vv in v.items()} for k, v in slots.items()}
  for name, t in spec.items():
    for k, v in ref_initial_slots(t.optimizer, t.rows, t.dim).items():
      np.testing.assert_array_equal(slots[name][k], v)

  @jax.jit
  def engine_step(state, ids, mask, cts, step):
    def loss(st):
      feats, stats = emb.lookup(st, ids, mask, step)
      return sum(jnp.sum(f * c) for f, c in zip(feats, cts)), (feats, stats)
    (_, (feats, stats)), new_state = jax.value_and_grad(loss, has_aux=True)(state)
    return new_state, feats, stats

  rng = np.random.default_rng(rotation)
  for step in range(1, steps + 1):
    ids, mask = random_batch(rng, features, spec, batch)
    mask[0] = False  # one example with every bag empty
    pooled_shape = [(batch, f.max_ids, spec[f.table].dim) if f.pooling == "none" else
                    (batch, spec[f.table].dim) for f in features]
    cts = [rng.normal(size=s).astype(np.float32) for s in pooled_shape]
    ref_pooled, dense_next, slots_next = ref_step(spec, features, dense, slots, ids, mask,
                                                  cts, step)
    state, feats, stats = engine_step(state, jax.device_put(u32(ids), emb.batch_sharding),
                                      jax.device_put(mask, emb.batch_sharding), cts, step)
    assert int(stats[0]) == 0, "bucket overflow with the default (safe) capacity"
    for f, got, want in zip(features, feats, ref_pooled):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5,
                                 err_msg=f"pooled {f.name}, step {step}, mesh {mesh_name}")
      if f.pooling != "none":
        np.testing.assert_array_equal(np.asarray(got)[0], 0.0)  # empty bags give zeros
    dense, slots = dense_next, slots_next
  got_t, got_s = emb.to_dense(state)
  for name in spec:
    np.testing.assert_allclose(got_t[name], dense[name], rtol=1e-5, atol=1e-5,
                               err_msg=f"table {name} ({spec[name].optimizer.name}), mesh "
                                       f"{mesh_name}")
    for k in slots[name]:
      np.testing.assert_allclose(got_s[name][k], slots[name][k], rtol=1e-5, atol=1e-5,
                                 err_msg=f"slot {k} of {name}, mesh {mesh_name}")
  return emb, state


# Rotation 4 puts row-wise Adagrad on the column-wise table (whose accumulator needs the whole
# row's gradient), Adam on table-row-wise and FTRL on the replicated table.
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_every_sharding_type_matches_dense_reference(mesh_name):
  run_against_reference(mesh_name, rotation=4)


@pytest.mark.parametrize("mesh_name", ["8", "2x4"])
def test_mixed_stack_matches_dense_reference(mesh_name):
  """All sharded types' pieces in one stack (one slab per device, one all_to_all)."""
  emb, _ = run_against_reference(mesh_name, same="adam")
  assert sum(not s.replicated for s in emb.stacks) == 1


@pytest.mark.parametrize("mesh_name", ["1", "8"])
def test_wide_replicated_tables_match_dense_reference(mesh_name):
  """Data-parallel tables of widths that take the tiled row gather (16, 64), one that does not
  (12), with SGD (on one device: a scatter-add per occurrence, no dedup) and row-wise Adagrad."""
  tables, features = [], []
  for name, dim, opt in [("s16", 16, "sgd"), ("s64", 64, "sgd"), ("s12", 12, "sgd"),
                         ("a64", 64, "rowwise_adagrad")]:
    tables.append(TableSpec(name, rows=29, dim=dim, sharding="data_parallel", init_scale=0.5,
                            optimizer=SparseOptimizer(opt, learning_rate=0.05,
                                                      initial_accumulator=0.1)))
    features.append(FeatureSpec(f"f_{name}", name, "sum", 1))
    features.append(FeatureSpec(f"g_{name}", name, "mean" if dim == 64 else "sum", 4))
  emb, _ = run_against_reference(mesh_name, tables_features=(tables, features))
  direct = {s.name for s in emb.stacks if emb._scatter_occurrences(s)}
  assert bool(direct) == (mesh_name == "1")


@pytest.mark.slow
@pytest.mark.parametrize("rotation", [0, 1, 2, 3])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_every_optimizer_under_every_type(mesh_name, rotation):
  run_against_reference(mesh_name, rotation=rotation)


def _simple(mesh_name, capacity_factor=None, **table_kw):
  tables = [TableSpec("rw", rows=200, dim=8, sharding="row_wise",
                      optimizer=SparseOptimizer("adam", learning_rate=0.1), **table_kw),
            TableSpec("tw", rows=50, dim=8, sharding="table_wise",
                      optimizer=SparseOptimizer("adam", learning_rate=0.1))]
  features = [FeatureSpec("a", "rw", "sum", 4), FeatureSpec("b", "tw", "mean", 2)]
  return ShardedEmbedding(tables, features, make_mesh(mesh_name),
                          capacity_factor=capacity_factor), {t.name: t for t in tables}


def _grad_step(emb, state, ids, mask, step=1):
  def loss(st):
    feats, stats = emb.lookup(st, ids, mask, step)
    return sum(jnp.sum(f) for f in feats), stats
  (_, stats), new = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return new, stats


def test_padding_never_updates_a_row():
  emb, spec = _simple("8")
  state = emb.init(0)
  before_t, before_s = emb.to_dense(state)
  ids, _ = random_batch(np.random.default_rng(0), emb.features, spec, 16)
  new, stats = _grad_step(emb, state, u32(ids), np.zeros(ids.shape, bool))
  after_t, after_s = emb.to_dense(new)
  for k in before_t:
    np.testing.assert_array_equal(after_t[k], before_t[k])
    for s in before_s[k]:
      np.testing.assert_array_equal(after_s[k][s], before_s[k][s])


def test_init_is_the_same_on_every_mesh_and_plan():
  dense = [_simple(m)[0] for m in ("1", "8", "2x4")]
  dense[0] = ShardedEmbedding(list(dense[0].table_specs.values()), dense[0].features,
                              make_mesh("1"))   # planner's choice: data-parallel
  got = [e.to_dense(e.init(3))[0] for e in dense]
  for g in got[1:]:
    for k in g:
      np.testing.assert_array_equal(g[k], got[0][k])
  assert np.abs(got[0]["rw"]).max() <= 1 / np.sqrt(200) and np.std(got[0]["rw"]) > 0.02


def test_out_of_range_ids_error_names_the_feature():
  emb, spec = _simple("1", ids="index", out_of_range="error")
  from jaxrec.data.batch import Batch
  ids = np.zeros((4, 6), np.uint64)
  mask = np.ones((4, 6), bool)
  ids[2, 1] = np.uint64(2**64 - 5)  # -5 as int64
  batch = Batch(np.zeros((4, 1), np.float32), ids, mask, np.zeros(4, np.float32))
  with pytest.raises(ValueError, match=r"feature 'a' \(table 'rw'.*ID -5 at example 2"):
    emb.check_batch(batch)
  ids[2, 1] = np.uint64(199)
  assert emb.check_batch(batch) is batch
  # In the step, an out-of-range ID is padding: counted, zero embedding, no update.
  ids[2, 1] = np.uint64(200)
  state = emb.init(0)
  new, stats = _grad_step(emb, state, jnp.asarray(u32(ids)), jnp.asarray(mask))
  assert [int(x) for x in stats] == [0, 1]
  feats, _, _ = emb.forward(state, jnp.asarray(u32(ids)), jnp.asarray(mask))
  t, _ = emb.to_dense(state)
  np.testing.assert_allclose(np.asarray(feats[0])[2], t["rw"][[0, 0, 0]].sum(0), rtol=1e-6)


def test_small_buckets_count_overflow_instead_of_dropping_silently():
  emb, spec = _simple("8", capacity_factor=0.25)
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 2**62, (64, 6), dtype=np.uint64)  # all distinct: many requests
  mask = np.ones(ids.shape, bool)
  state = emb.init(0)
  new, stats = _grad_step(emb, state, jax.device_put(u32(ids), emb.batch_sharding),
                          jax.device_put(mask, emb.batch_sharding))
  assert int(stats[0]) > 0
  assert all(np.isfinite(v).all() for v in emb.to_dense(new)[0].values())
  default, roomy = _simple("8")[0], _simple("8", capacity_factor=100.0)[0]
  assert [roomy.capacity(s, 8) for s in roomy.stacks] == [  # never above the safe size
      default.capacity(s, 8) for s in default.stacks]


@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad"])
def test_bfloat16_tables_round_once_per_update(opt):
  """bf16 rows: gathered and pooled exactly, updated in float32 and rounded once (so within
  one bf16 rounding of the float64 reference); slots stay float32."""
  o = SparseOptimizer(opt, learning_rate=0.05, initial_accumulator=0.1)
  tables = [TableSpec("a", 300, 16, o, dtype="bfloat16", sharding="row_wise"),
            TableSpec("b", 40, 16, o, dtype="bfloat16", sharding="data_parallel"),
            TableSpec("c", 40, 16, o, dtype="bfloat16", sharding="column_wise",
                      column_shards=2)]
  features = [FeatureSpec("fa", "a", "sum", 3), FeatureSpec("fb", "b", "mean", 2),
              FeatureSpec("fc", "c", "sum", 1)]
  spec = {t.name: t for t in tables}
  emb = ShardedEmbedding(tables, features, make_mesh("8"))
  state = emb.init(0)
  assert all(v.dtype == jnp.bfloat16 for v in state.tables.values())
  dense, slots = emb.to_dense(state)
  rng = np.random.default_rng(0)
  ids, mask = random_batch(rng, features, spec, 16)
  cts = [rng.normal(size=(16, 16)).astype(np.float32) for _ in features]
  pooled, ref_t, ref_s = ref_step(spec, features, dense, slots, ids, mask, cts, 1)
  def loss(st):
    feats, _ = emb.lookup(st, jnp.asarray(u32(ids)), jnp.asarray(mask), 1)
    return sum(jnp.sum(f * c) for f, c in zip(feats, cts)), feats
  (_, feats), new = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  for got, want in zip(feats, pooled):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  got_t, got_s = emb.to_dense(new)
  for k in spec:
    np.testing.assert_allclose(got_t[k], ref_t[k], rtol=2**-8, atol=1e-6)
    for s in ref_s[k]:
      np.testing.assert_allclose(got_s[k][s], ref_s[k][s], rtol=1e-5, atol=1e-6)
