"""The train step with the dense all-reduce under jaxrec.comm's control: fp32 hierarchical
equals XLA's psum step, int8 with error feedback stays close, on a (2, 4) mesh."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxrec import models
from jaxrec.comm.spec import CommSpec
from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec
from jaxrec.train import builders
from jaxrec.train.comm_step import init_comm_state
from jaxrec.train.state import TrainState, place_state
from jaxrec.train.step import jit_steps

STEPS = 12


def _tables():
  opt = SparseOptimizer("rowwise_adagrad", learning_rate=0.05, initial_accumulator=0.1)
  kinds = ["row_wise", "table_wise", None, "table_row_wise"]
  tables = [TableSpec(f"t{i}", rows=400 + 100 * i, dim=8, optimizer=opt, sharding=k)
            for i, k in enumerate(kinds)]
  features = [FeatureSpec(f"f{i}", f"t{i}", "sum", 1 + i % 2) for i in range(len(tables))]
  return tables, features


def _batches(features, batch=64, seed=0):
  rng = np.random.default_rng(seed)
  cols = sum(f.max_ids for f in features)
  out = []
  for _ in range(STEPS):
    ids = np.minimum(rng.zipf(1.3, (batch, cols)), 1500).astype(np.uint64)
    mask = rng.random((batch, cols)) < 0.9
    dense = rng.normal(size=(batch, 4)).astype(np.float32)
    labels = (rng.random(batch) < 1 / (1 + np.exp(-dense[:, 0] - 0.3 * (ids[:, 0] % 3 == 0)))
              ).astype(np.float32)
    out.append({"dense": dense, "ids": ids.view(np.uint32).reshape(batch, cols, 2),
                "mask": mask, "labels": labels})
  return out


def _train(comm, shape=(2, 4)):
  mesh = make_mesh(shape)
  tables, features = _tables()
  emb = ShardedEmbedding(tables, features, mesh, batch_size=64)
  model = models.build_model("dlrm", num_dense=4, num_sparse=len(features), embedding_dim=8,
                             bottom_mlp=(16, 8), top_mlp=(16, 1), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = builders.dense_optimizer(ml_collections.ConfigDict(
      {"name": "adam", "learning_rate": 3e-3, "warmup_steps": 3}), 100)
  spec = comm or CommSpec()
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), emb.init(1),
                     init_comm_state(params, emb, spec))
  state = place_state(state, emb)
  train, _ = jit_steps(graphdef, emb, tx, state, comm=comm)
  losses = []
  for b in _batches(features):
    state, m = train(state, b)
    losses.append(float(m["loss"]))
  flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])
  tabs, _ = emb.to_dense(state.emb)
  return np.asarray(losses), flat, tabs, state


@pytest.fixture(scope="module")
def plain():
  return _train(None)


def test_hierarchical_fp32_step_equals_psum_step(plain):
  losses, params, tabs, state = _train(CommSpec(dense_allreduce="hierarchical"))
  assert state.comm is None
  assert plain[0][-1] < plain[0][0]  # it learns
  np.testing.assert_allclose(losses, plain[0], rtol=1e-5)
  np.testing.assert_allclose(params, plain[1], rtol=1e-4, atol=1e-6)
  for t in tabs:
    np.testing.assert_allclose(tabs[t], plain[2][t], rtol=1e-4, atol=1e-6)


def test_int8_step_with_error_feedback_stays_close(plain):
  spec = CommSpec(dense_allreduce="hierarchical", dense_precision="int8", block_size=64,
                  embedding_precision="int8")
  losses, params, _, state = _train(spec)
  res = np.asarray(state.comm["dense_residual"])
  assert res.shape[0] == 8 and res.shape[1] % (8 * 64) == 0
  assert np.abs(res).max() > 0                     # the residual is carried
  np.testing.assert_allclose(losses, plain[0], rtol=2e-3)
  # Adam normalises each step, so int8 noise moves parameters by about lr per step at worst.
  assert np.abs(params - plain[1]).max() < STEPS * 3e-3
  assert np.abs(params - plain[1]).max() > 0


def test_comm_spec_validates_config():
  assert CommSpec.from_config(None) == CommSpec()
  assert CommSpec.from_config({"dense_precision": "bf16"}).error_feedback
  with pytest.raises(ValueError, match="config.comm has unknown fields"):
    CommSpec.from_config({"dense_precison": "int8"})
  with pytest.raises(ValueError, match="dense_precision='fp16'"):
    CommSpec(dense_precision="fp16")
  with pytest.raises(ValueError, match="dense_allreduce='ring'"):
    CommSpec(dense_allreduce="ring")
