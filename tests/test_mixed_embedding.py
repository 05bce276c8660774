"""Static and dynamic tables in one model (MixedEmbedding): the train step equals the two
engines composed by hand (static lookup + update, dynamic forward_train + update, one dense
loss), the config option picks the engines by vocabulary, and snapshots restore exactly and
onto another mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import dlrm_dynamic
from jaxrec import models
from jaxrec.checkpoint import Checkpointer, SnapshotOptions, layout_for
from jaxrec.checkpoint import from_config
from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding.dynamic import DynamicEmbedding
from jaxrec.embedding.mixed import MixedEmbedding
from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.embedding.specs import DynamicSpec, FeatureSpec, SparseOptimizer, TableSpec
from jaxrec.train import builders
from jaxrec.train.state import TrainState, place_state
from jaxrec.train.step import _forward, jit_steps

B, DIM = 32, 8
OPT = SparseOptimizer("rowwise_adagrad", 0.1)
TABLES = [TableSpec("s_hash", 50, DIM, optimizer=OPT),
          TableSpec("d1", None, DIM, optimizer=OPT, init_scale=0.1,
                    dynamic=DynamicSpec(capacity=256)),
          TableSpec("s_idx", 10, DIM, optimizer=OPT, ids="index"),
          TableSpec("d2", None, DIM, optimizer=OPT, init_scale=0.1,
                    dynamic=DynamicSpec(capacity=256, min_count=2))]
# Interleaved, so features must come back in model order.
FEATURES = [FeatureSpec("f0", "s_hash", "sum", 2), FeatureSpec("f1", "d1", "sum", 2),
            FeatureSpec("f2", "s_idx", "sum", 1), FeatureSpec("f3", "d2", "mean", 2)]
STATIC_COLS, DYNAMIC_COLS = [0, 1, 4], [2, 3, 5, 6]


def _batch(rng):
  raw = rng.integers(0, 40, (B, 7)).astype(np.uint64)
  raw[:, 4] %= 10                                        # index table: in range
  ids = raw.view(np.uint32).reshape(B, 7, 2)
  mask = rng.random((B, 7)) < 0.9
  dense = rng.normal(size=(B, 4)).astype(np.float32)
  return {"dense": dense, "ids": ids, "mask": mask,
          "labels": (dense[:, 0] > 0).astype(np.float32)}


def _model():
  model = models.build_model("dlrm", num_dense=4, num_sparse=4, embedding_dim=DIM,
                             bottom_mlp=(16, DIM), top_mlp=(16, 1), rngs=nnx.Rngs(0))
  return nnx.split(model, nnx.Param)


@pytest.mark.parametrize("shape", [(8,)])
def test_mixed_step_equals_the_two_engines_composed(shape):
  mesh = make_mesh(shape)
  emb = MixedEmbedding(TABLES, FEATURES, mesh, batch_size=B)
  assert list(emb.static.table_specs) == ["s_hash", "s_idx"]
  assert list(emb.dynamic.table_specs) == ["d1", "d2"]
  graphdef, params = _model()
  tx = optax.adam(1e-2)
  ref_params = jax.tree.map(jnp.copy, params)   # the step donates its state
  state = place_state(TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                                 emb.init(3)), emb)
  train, evaluate = jit_steps(graphdef, emb, tx, state)

  # The reference: the two engines on their own, composed by hand.
  stat = ShardedEmbedding([TABLES[0], TABLES[2]], [FEATURES[0], FEATURES[2]], mesh,
                          batch_size=B)
  dyn = DynamicEmbedding([TABLES[1], TABLES[3]], [FEATURES[1], FEATURES[3]], mesh)
  ref = {"params": ref_params, "opt": tx.init(ref_params), "s": stat.init(3),
         "d": dyn.init(3)}

  @jax.jit
  def ref_step(ref, batch, step):
    s_ids, d_ids = batch["ids"][:, STATIC_COLS], batch["ids"][:, DYNAMIC_COLS]
    s_mask, d_mask = batch["mask"][:, STATIC_COLS], batch["mask"][:, DYNAMIC_COLS]
    d_state, d_feats, d_res, _ = dyn.forward_train(ref["d"], d_ids, d_mask, step)
    s_feats, s_res, _ = stat.forward(ref["s"], s_ids, s_mask)

    def loss(params, s_feats, d_feats):
      feats = [s_feats[0], d_feats[0], s_feats[1], d_feats[1]]
      logits = _forward(graphdef, params, feats, batch["dense"])
      return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean()

    l, (gp, gs, gd) = jax.value_and_grad(loss, argnums=(0, 1, 2))(ref["params"], s_feats,
                                                                  d_feats)
    updates, opt = tx.update(gp, ref["opt"], ref["params"])
    return {"params": optax.apply_updates(ref["params"], updates), "opt": opt,
            "s": stat.update(ref["s"], s_res, gs, step),
            "d": dyn.update(d_state, d_res, gd, step)}, l

  rng = np.random.default_rng(0)
  for step in range(1, 5):
    batch = jax.device_put(_batch(rng), emb.batch_sharding)
    state, m = train(state, batch)
    ref, loss = ref_step(ref, batch, step)
    np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5)
  assert int(m["dynamic/size"]) > 0 and int(m["invalid_ids"]) == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-4, atol=1e-6),
               state.params, ref["params"])
  got, want_s = emb.export(state.emb), stat.to_dense(ref["s"])
  want_d = dyn.export(ref["d"])
  for n in ("s_hash", "s_idx"):
    np.testing.assert_allclose(got[n]["values"], want_s[0][n], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[n]["slots"]["acc"], want_s[1][n]["acc"], rtol=1e-4,
                               atol=1e-7)
    assert np.abs(got[n]["values"] - stat.to_dense(stat.init(3))[0][n]).max() > 0  # trained
  for n in ("d1", "d2"):
    np.testing.assert_array_equal(got[n]["keys"], want_d[n]["keys"])
    np.testing.assert_allclose(got[n]["values"], want_d[n]["values"], rtol=1e-4, atol=1e-6)
  # Eval reads both engines: the same predictions as the reference's features.
  preds = np.asarray(evaluate(state, batch))
  assert preds.shape == (B,) and np.isfinite(preds).all()


def _mixed_config(devices: int):
  c = dlrm_dynamic.get_config("tiny")
  c.data.preset = "kaggle"
  c.data.synthetic = ml_collections.ConfigDict({"cardinalities": (40, 3000, 20, 1000),
                                                "weighted_features": 4, "num_pairs": 1,
                                                "drift": 0.002})
  c.data.batch_size = 64
  c.data.train_examples = 64 * 10
  c.model.embedding_dim = 8
  c.model.bottom_mlp = (16, 8)
  c.model.top_mlp = (16, 1)
  c.embedding.max_rows = 512
  c.embedding.dynamic_min_vocab = 500
  c.embedding.dynamic_table.min_count = 2    # first sightings read the default row
  c.embedding.dynamic_table.default_row = "trainable"
  c.optimizer.warmup_steps = 2
  c.mesh = ml_collections.ConfigDict({"shape": (devices,)})
  return c


@pytest.mark.slow  # three builds of a mixed model on 8 and 4 devices: ~50 s of CPU
def test_mixed_model_from_config_checkpoints_and_reshards(tmp_path):
  run = from_config.build(_mixed_config(8))
  emb = run.emb
  assert isinstance(emb, MixedEmbedding)
  assert sorted(emb.dynamic.table_specs) == ["t_C2", "t_C4"]   # vocab >= 500
  assert sorted(emb.static.table_specs) == ["t_C1", "t_C3"]
  train, _ = jit_steps(run.graphdef, emb, run.tx, run.state)
  state = run.state
  for i in range(4):
    batch = builders.device_batch(emb.check_batch(run.stream.examples(i * 64, (i + 1) * 64)))
    state, m = train(state, jax.device_put(batch, emb.batch_sharding))
  assert int(m["dynamic/size"]) > 0
  ck = Checkpointer(str(tmp_path), SnapshotOptions(save_every_steps=1, min_row_group_bytes=1024),
                    layouts={"emb": layout_for(emb)})
  ck.save(4, state, force=True)
  ck.wait_until_finished()
  want = emb.export(state.emb)
  assert np.abs(want["t_C2"]["default"]["values"]).max() > 0      # the default row trained

  # Same mesh: every leaf back bit for bit.
  fresh = from_config.build(_mixed_config(8))
  r = Checkpointer(str(tmp_path), layouts={"emb": layout_for(fresh.emb)},
                   read_only=True).restore(fresh.state)
  for a, b in zip(jax.tree.leaves(jax.device_get(r.state.emb)),
                  jax.tree.leaves(jax.device_get(state.emb))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Four devices: hash keys re-routed, static stacks re-laid, default rows carried over.
  run4 = from_config.build(_mixed_config(4))
  r4 = Checkpointer(str(tmp_path), layouts={"emb": layout_for(run4.emb)},
                    read_only=True).restore(run4.state)
  assert any("re-routed from 8 to 4 shards" in line for line in r4.report), r4.report
  got = run4.emb.export(r4.state.emb)
  for n in want:
    np.testing.assert_array_equal(got[n]["values"], want[n]["values"], err_msg=n)
    for k in want[n]["slots"]:
      np.testing.assert_array_equal(got[n]["slots"][k], want[n]["slots"][k], err_msg=n)
    if "keys" in want[n]:
      np.testing.assert_array_equal(got[n]["keys"], want[n]["keys"], err_msg=n)
    if "default" in want[n]:
      np.testing.assert_array_equal(got[n]["default"]["values"], want[n]["default"]["values"])
