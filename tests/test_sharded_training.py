"""The engine inside the DLRM train step: 8 devices follow 1, big tables are sharded, and the
compiled step holds no [rows, dim] temporary."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxrec import models
from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec
from jaxrec.train import builders
from jaxrec.train.state import TrainState, place_state
from jaxrec.train.step import jit_steps


def _dlrm_setup(mesh, tables, features, batch, seed=0):
  emb = ShardedEmbedding(tables, features, mesh, batch_size=batch)
  model = models.build_model("dlrm", num_dense=4, num_sparse=len(features),
                             embedding_dim=tables[0].dim, bottom_mlp=(16, tables[0].dim),
                             top_mlp=(16, 1), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = builders.dense_optimizer(
      ml_collections.ConfigDict({"name": "adam", "learning_rate": 3e-3, "warmup_steps": 5}), 100)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), emb.init(seed + 1))
  state = place_state(state, emb)
  train, evaluate = jit_steps(graphdef, emb, tx, state)
  return emb, state, train, evaluate


def _batches(features, tables, batch, steps, seed=0):
  rng = np.random.default_rng(seed)
  spec = {t.name: t for t in tables}
  out = []
  for _ in range(steps):
    cols = sum(f.max_ids for f in features)
    ids = np.zeros((batch, cols), np.uint64)
    mask = np.zeros((batch, cols), bool)
    c = 0
    for f in features:
      r = np.minimum(rng.zipf(1.3, (batch, f.max_ids)), 3 * spec[f.table].rows).astype(np.uint64)
      m = np.arange(f.max_ids)[None] < rng.integers(0, f.max_ids + 1, batch)[:, None] \
          if f.max_ids > 1 else np.ones((batch, 1), bool)
      ids[:, c:c + f.max_ids] = np.where(m, r * np.uint64(0x9E3779B97F4A7C15), 0)
      mask[:, c:c + f.max_ids] = m
      c += f.max_ids
    dense = rng.normal(size=(batch, 4)).astype(np.float32)
    labels = (rng.random(batch) < 1 / (1 + np.exp(-dense[:, 0]))).astype(np.float32)
    out.append({"dense": dense, "ids": ids.view(np.uint32).reshape(batch, cols, 2),
                "mask": mask, "labels": labels})
  return out


def _loss_curve(mesh, tables, features, batches):
  emb, state, train, _ = _dlrm_setup(mesh, tables, features, len(batches[0]["labels"]))
  losses = []
  for b in batches:
    state, m = train(state, b)
    losses.append(float(m["loss"]))
    assert int(m["embedding_overflow"]) == 0
  return np.asarray(losses), emb, state


def test_dlrm_on_8_devices_follows_1_device():
  opt = SparseOptimizer("rowwise_adagrad", learning_rate=0.05, initial_accumulator=0.1)
  kinds = ["row_wise", "table_wise", "column_wise", None, "table_row_wise", "row_wise"]
  tables = [TableSpec(f"t{i}", rows=500 + 100 * i, dim=8, optimizer=opt, sharding=k,
                      column_shards=2 if k == "column_wise" else None)
            for i, k in enumerate(kinds)]
  features = [FeatureSpec(f"f{i}", f"t{i}", "sum", 1 if i % 2 == 0 else 3)
              for i in range(len(tables))]
  batches = _batches(features, tables, batch=64, steps=50)
  one, emb1, _ = _loss_curve(make_mesh((1,)), tables, features, batches)
  eight, emb8, _ = _loss_curve(make_mesh((8,)), tables, features, batches)
  assert emb8.plan["t3"].kind == "data_parallel"  # small table, planner's choice
  assert one[-1] < one[0] - 0.01                   # it learns
  np.testing.assert_allclose(eight, one, rtol=1e-4)


@pytest.mark.parametrize("shape", [(8,), (2, 4)])
def test_big_tables_are_sharded_and_step_has_no_dense_temporary(shape):
  mesh = make_mesh(shape)
  opt = SparseOptimizer("adam", learning_rate=0.01)
  big = [TableSpec(f"big{i}", rows=1 << 16, dim=16, optimizer=opt) for i in range(3)]
  small = [TableSpec(f"small{i}", rows=50, dim=16, optimizer=opt) for i in range(2)]
  tables = big + small
  features = [FeatureSpec(f"f_{t.name}", t.name, "sum", 2) for t in tables]
  emb, state, train, _ = _dlrm_setup(mesh, tables, features, batch=64)
  kinds = {t.name: emb.plan[t.name].kind for t in tables}
  assert all(kinds[t.name] in ("row_wise", "table_row_wise") for t in big), kinds
  assert all(kinds[t.name] == "data_parallel" for t in small), kinds
  # Each big table really is split: its rows spread over >= 4 devices, and each device's
  # array holds only its slab (a [1, rows, dim] block of the [devices, rows, dim] stack).
  for s in emb.stacks:
    for p in s.pieces:
      if p.table.name.startswith("big"):
        assert p.n >= 4 and p.rows_per_shard == -(-(1 << 16) // p.n), (p.table.name, p.devices)
        arr = state.emb.tables[s.name]
        assert not arr.sharding.is_fully_replicated
        assert {sh.data.shape for sh in arr.addressable_shards} == {(1, s.rows, s.dim)}
        assert len({sh.device for sh in arr.addressable_shards}) == mesh.size
        assert s.rows < 3 * (1 << 16) // 2  # a slab is far below the three big tables
  b = _batches(features, tables, 64, 1)[0]
  compiled = train.lower(state, b).compile()
  mem = compiled.memory_analysis()
  # Temporaries smaller than one device's share of one big table: a dense gradient, or a copy
  # of a table or of an Adam slot (no in-place update), would each be at least that.
  share = (1 << 16) * 16 * 4 // mesh.size
  assert mem.temp_size_in_bytes < share, (mem.temp_size_in_bytes, share)
  state, m = train(state, b)
  assert np.isfinite(float(m["loss"]))
