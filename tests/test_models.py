"""The model zoo: every model's forward/backward on 1 and 8 devices, bf16 against fp32, DCNv2
and DeepFM against plain numpy references, MMoE's gates, and the configs that name them."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec import models
from jaxrec.train import builders, metrics

B, NUM_DENSE, NUM_SPARSE, D = 16, 5, 4, 8

# name, model options, tasks: small versions of every model and structure.
CASES = {
    "dlrm": ("dlrm", {}, 1),
    "dcnv2_stacked": ("dcnv2", {"num_cross_layers": 2}, 1),
    "dcnv2_parallel_low_rank": ("dcnv2", {"structure": "parallel", "low_rank": 4}, 1),
    "deepfm": ("deepfm", {}, 1),
    "wide_deep": ("wide_deep", {}, 1),
    "mmoe": ("mmoe", {"num_experts": 3, "expert_mlp": (16, 8)}, 2),
}


@functools.lru_cache(maxsize=None)   # eager init is slow on CPU; callers only split the module
def _build(case, seed=0, compute_dtype=None):
  name, options, tasks = CASES[case]
  top = (16, 1) if name == "mmoe" else (16, tasks)
  return models.build_model(name, num_dense=NUM_DENSE, num_sparse=NUM_SPARSE, embedding_dim=D,
                            bottom_mlp=(16, D), top_mlp=top, rngs=nnx.Rngs(seed),
                            compute_dtype=compute_dtype, **options)


def _inputs(tasks, seed=0, b=B):
  # numpy, not jax.random: eager jax ops each compile, which is most of a CPU test's time.
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(b, NUM_DENSE)).astype(np.float32)
  sparse = (0.3 * rng.normal(size=(b, NUM_SPARSE, D))).astype(np.float32)  # pooled embeddings
  labels = (rng.random((b, tasks)) < 0.3).astype(np.float32)
  return dense, sparse, labels


def _loss(graphdef, params, dense, sparse, labels):
  logits = nnx.merge(graphdef, params)(dense, sparse)
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def _loss_and_grads(graphdef, params, dense, sparse, labels):
  return jax.value_and_grad(_loss, argnums=(1, 3))(graphdef, params, dense, sparse, labels)


def _outputs_and_grads(graphdef, params, dense, sparse, labels):
  return nnx.merge(graphdef, params)(dense, sparse), jax.grad(_loss, 1)(graphdef, params, dense,
                                                                        sparse, labels)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_on_1_and_8_devices(case):
  tasks = CASES[case][2]
  graphdef, params = nnx.split(_build(case), nnx.Param)
  dense, sparse, labels = _inputs(tasks, b=64)
  out = jax.eval_shape(lambda p: nnx.merge(graphdef, p)(dense, sparse), params)
  assert out.shape == (64, tasks) and out.dtype == jnp.float32
  # One device.
  loss, (g, g_sparse) = jax.jit(_loss_and_grads, static_argnums=0)(graphdef, params, dense,
                                                                   sparse, labels)
  assert np.isfinite(float(loss))
  g, g_sparse = jax.device_get((g, g_sparse))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
  # Every parameter gets a gradient (nothing is disconnected), and so do the embeddings.
  dead = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(g)
          if not np.any(x != 0)]
  assert not dead, f"{case}: parameters with zero gradient: {dead}"
  assert g_sparse.shape == sparse.shape and np.any(g_sparse != 0)
  # The batch split over 8 devices, parameters replicated: the same loss and gradients.
  mesh = jax.make_mesh((8,), ("data",))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = jax.jit(_loss_and_grads, static_argnums=0, in_shardings=(rep, data, data, data),
                 out_shardings=(rep, (rep, data)))
  args = (jax.device_put(params, rep), *jax.device_put((dense, sparse, labels), data))
  assert len(args[2].sharding.device_set) == 8
  loss8, (g8, g_sparse8) = step(graphdef, *args)
  np.testing.assert_allclose(float(loss8), float(loss), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_sparse8, g_sparse, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_compute_is_close_to_fp32(case):
  tasks = CASES[case][2]
  dense, sparse, labels = _inputs(tasks)
  (gd32, p32), (gd16, p16) = (nnx.split(_build(case), nnx.Param),
                              nnx.split(_build(case, compute_dtype=jnp.bfloat16), nnx.Param))
  for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):   # same fp32 parameters
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  f = jax.jit(_outputs_and_grads, static_argnums=0)
  (y32, g32), (y16, g16) = f(gd32, p32, dense, sparse, labels), f(gd16, p16, dense, sparse, labels)
  assert y16.dtype == jnp.float32
  y32, g32, y16, g16 = jax.device_get((y32, g32, y16, g16))
  np.testing.assert_allclose(y16, y32, atol=3e-2 * np.abs(y32).max())
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    assert b.dtype == np.float32
    assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(a) + 1e-6


# Plain numpy references, written from the papers' formulas on the models' fixed weights.

def _jit_forward(m, dense, sparse):
  graphdef, state = nnx.split(m)
  return jax.jit(lambda s, d, e: nnx.merge(graphdef, s)(d, e))(state, dense, sparse)


def _np(x):
  return np.asarray(x, np.float64)


def _mlp_np(mlp, x, final_activation=True):
  n = len(mlp.layers)
  for i, layer in enumerate(mlp.layers):
    x = x @ _np(layer.kernel.get_value()) + _np(layer.bias.get_value())
    if i < n - 1 or final_activation:
      x = np.maximum(x, 0.0)
  return x


def _dcnv2_reference(m, dense, sparse, structure, low_rank):
  x0 = np.concatenate([_mlp_np(m.bottom, dense), sparse.reshape(len(sparse), -1)], axis=1)
  out = []
  for n in range(len(x0)):                       # one example at a time, column vectors
    c0 = x0[n][:, None]
    c = c0
    for l in range(len(m.cross.biases)):
      if low_rank:
        # W = U V^T with U, V [d, r]; the model keeps V as v and U^T as u.
        w = _np(m.cross.u[l].get_value()).T @ _np(m.cross.v[l].get_value()).T
      else:
        w = _np(m.cross.kernels[l].get_value()).T
      c = c0 * (w @ c + _np(m.cross.biases[l].get_value())[:, None]) + c
    out.append(c[:, 0])
  cross = np.stack(out)
  if structure == "stacked":
    h = _mlp_np(m.deep, cross)
  else:
    h = np.concatenate([cross, _mlp_np(m.deep, x0)], axis=1)
  return h @ _np(m.final.kernel.get_value()) + _np(m.final.bias.get_value())


@pytest.mark.parametrize("structure,low_rank", [("stacked", None), ("parallel", None),
                                                ("stacked", 5), ("parallel", 3)])
def test_dcnv2_matches_numpy_reference(structure, low_rank):
  m = models.build_model("dcnv2", num_dense=NUM_DENSE, num_sparse=NUM_SPARSE, embedding_dim=D,
                         bottom_mlp=(16, D), top_mlp=(12, 6, 1), rngs=nnx.Rngs(3),
                         num_cross_layers=3, structure=structure, low_rank=low_rank)
  # Non-zero biases, so the reference checks where they enter.
  rng = np.random.default_rng(7)
  for b in m.cross.biases:
    b.set_value(jnp.asarray(0.1 * rng.normal(size=b.get_value().shape), jnp.float32))
  dense, sparse, _ = _inputs(1, seed=1)
  want = _dcnv2_reference(m, _np(dense), _np(sparse), structure, low_rank)
  np.testing.assert_allclose(_jit_forward(m, dense, sparse), want, rtol=1e-4, atol=1e-4)
  if low_rank:
    assert not hasattr(m.cross, "kernels") and m.cross.v[0].get_value().shape == (5 * D, low_rank)


def test_deepfm_matches_numpy_reference():
  m = models.build_model("deepfm", num_dense=NUM_DENSE, num_sparse=NUM_SPARSE, embedding_dim=D,
                         bottom_mlp=(16, D), top_mlp=(12, 1), rngs=nnx.Rngs(4))
  dense, sparse, _ = _inputs(1, seed=2)
  dn, sp = _np(dense), _np(sparse)
  fields = np.concatenate([_mlp_np(m.bottom, dn)[:, None, :], sp], axis=1)   # [B, F+1, D]
  n = fields.shape[1]
  # FM pairwise term, the O(n^2) way: sum over i < j of <v_i, v_j>.
  fm = np.zeros(len(dn))
  for i in range(n):
    for j in range(i + 1, n):
      fm += (fields[:, i] * fields[:, j]).sum(-1)
  w = _np(m.field_linear.kernel.get_value())[:, :, 0]                       # [F+1, D]
  first = (dn @ _np(m.dense_linear.kernel.get_value())[:, 0] + _np(m.dense_linear.bias.get_value())
           + sum((fields[:, f] * w[f]).sum(-1) for f in range(n)))
  deep = _mlp_np(m.deep, fields.reshape(len(dn), -1), final_activation=False)[:, 0]
  np.testing.assert_allclose(_jit_forward(m, dense, sparse)[:, 0], first + fm + deep, rtol=1e-4, atol=1e-4)


def test_mmoe_two_heads_and_softmax_gates():
  m = _build("mmoe")
  dense, sparse, _ = _inputs(2)
  graphdef, params = nnx.split(m, nnx.Param)
  gates, out = jax.jit(lambda p: (nnx.merge(graphdef, p).gate_weights(dense, sparse),
                                  nnx.merge(graphdef, p)(dense, sparse)))(params)
  assert gates.shape == (B, 2, 3)
  assert bool((gates > 0).all())
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-5)
  assert out.shape == (B, 2) and not np.allclose(out[:, 0], out[:, 1])
  # Task 1's loss trains task 1's gate and tower and the shared experts, not task 0's.
  g = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(dense, sparse)[:, 1].sum()))(params)
  norm = lambda t: float(optax.tree.norm(t))
  assert norm(g["gates"][0]) == 0 and norm(g["towers"][0]) == 0
  assert norm(g["gates"][1]) > 0 and norm(g["towers"][1]) > 0 and norm(g["experts"]) > 0


@pytest.mark.parametrize("name,kw,match", [
    ("dcnv2", {"bottom_mlp": (16, 7)}, "DCNv2: the bottom MLP"),
    ("dcnv2", {"structure": "sideways"}, "DCNv2: structure='sideways'"),
    ("dcnv2", {"low_rank": 999}, "CrossNetwork: low_rank"),
    ("deepfm", {"top_mlp": (16, 2)}, "DeepFM: the top MLP"),
    ("wide_deep", {"bottom_mlp": (16, 3)}, "WideDeep: the bottom MLP"),
    ("mmoe", {"top_mlp": (16, 2)}, "MMoE: each task tower"),
    ("nope", {}, "unknown model 'nope'"),
])
def test_config_errors_name_the_model(name, kw, match):
  args = dict(num_dense=NUM_DENSE, num_sparse=NUM_SPARSE, embedding_dim=D, bottom_mlp=(16, D),
              top_mlp=(16, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    models.build_model(name, **{**args, **kw})


@pytest.mark.parametrize("config", ["dlrm_synthetic", "dcnv2_synthetic", "deepfm_synthetic",
                                    "wide_deep_synthetic", "mmoe_synthetic"])
def test_configs_build_their_model(config):
  c = importlib.import_module(f"experiments.configs.{config}").get_config("test")
  c.model.compute_dtype = "bfloat16"
  # Abstract: shapes and dtypes only, no parameter initialisation or compute.
  m = nnx.eval_shape(lambda: builders.build_model(c.model, c.data.num_dense, 26, seed=0))
  graphdef, state = nnx.split(m)
  tasks = c.model.get("options", {}).get("num_tasks", 1)
  out = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.ones((2, c.data.num_dense)),
                                                        jnp.zeros((2, 26, c.model.embedding_dim))),
                       state)
  assert out.shape == (2, tasks) and out.dtype == jnp.float32
  assert type(m).__name__.lower().startswith(c.model.name.split("_")[0])


# Every registry model through the real train step: tables sharded over 8 devices or dynamic,
# bf16 compute, fp32 tables and optimizer state. Three small features of a synthetic stream
# with both labels, so MMoE fits click and conversion.
ENGINE_CARDS = (300, 40, 7)
ENGINE_BATCH, ENGINE_STEPS = 64, 10


def _engine_run(name, engine, devices):
  from experiments.configs import dlrm_dynamic
  from jaxrec.data.synthetic import SyntheticConfig, SyntheticCriteo
  from jaxrec.distributed.mesh import make_mesh
  from jaxrec.train.loop import init_state
  from jaxrec.train.state import place_state
  from jaxrec.train.step import jit_steps
  c = importlib.import_module(f"experiments.configs.{name}_synthetic").get_config("tiny")
  c.model.compute_dtype = "bfloat16"
  if engine == "sharded":
    # Nothing replicated: the 300-ID table (300 KiB) goes row-wise, the others table-wise.
    c.embedding.replicate_below_kib = 0.0
    c.embedding.memory_budget_mib = 0.5
  else:                               # as experiments/configs/dlrm_dynamic.py, smaller
    c.embedding.dynamic = True
    c.embedding.dynamic_table = dlrm_dynamic.get_config("tiny").embedding.dynamic_table
    c.embedding.dynamic_table.max_capacity = 1024
  stream = SyntheticCriteo(SyntheticConfig(seed=0, cardinalities=ENGINE_CARDS, num_pairs=1,
                                           conversion=True, conversion_features=2))
  emb = builders.embedding_plan(stream.layout, ENGINE_CARDS, c.embedding, c.model.embedding_dim,
                                mesh=make_mesh((devices,)), batch_size=ENGINE_BATCH)
  model = builders.build_model(c.model, c.data.num_dense, len(ENGINE_CARDS), c.seed)
  tx = builders.dense_optimizer(ml_collections.ConfigDict(
      {"name": "adam", "learning_rate": 3e-3, "warmup_steps": 1}), ENGINE_STEPS)
  graphdef, state = init_state(c, emb, model, tx)
  state = place_state(state, emb)
  train, _ = jit_steps(graphdef, emb, tx, state,
                       task_weights=tuple(c.model.get("task_weights") or ()) or None)
  batches = [builders.device_batch(emb.check_batch(stream.examples(i * ENGINE_BATCH,
                                                                   (i + 1) * ENGINE_BATCH)))
             for i in range(2)]
  start = jax.device_get(state.params)
  losses = []
  for s in range(ENGINE_STEPS):        # two batches in turn, so a loss can be compared
    state, m = train(state, batches[s % 2])
    losses.append(float(m["loss"]))
  return emb, start, state, np.asarray(losses)


# Two full-step compiles each (dynamic ones are slow to compile): the default suite keeps DLRM
# and two-task MMoE on sharded tables; `-m slow` runs every model on both engines.
_FAST_ENGINE_CASES = {("dlrm", "sharded"), ("mmoe", "sharded")}


@pytest.mark.parametrize("name,engine", [
    pytest.param(n, e, marks=() if (n, e) in _FAST_ENGINE_CASES else pytest.mark.slow)
    for n in sorted(models.MODELS) for e in ("sharded", "dynamic")])
def test_every_model_trains_on_sharded_and_dynamic_tables_in_bf16(name, engine):
  emb1, _, _, losses1 = _engine_run(name, engine, 1)
  emb8, start, state, losses8 = _engine_run(name, engine, 8)
  assert np.isfinite(losses8).all(), losses8
  # The same two batches cost less after a few steps.
  assert losses8[-2] < losses8[0] and losses8[-1] < losses8[1], losses8
  # 8 devices compute the 1-device step: the same first two losses; later the bf16 rounding
  # of differently split matmuls compounds through the updates (DCNv2: 0.2% by step 9).
  np.testing.assert_allclose(losses8[:2], losses1[:2], rtol=1e-4)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-2)
  # Mixed precision keeps every table, parameter and optimizer slot in fp32.
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state, state.emb))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  if engine == "sharded":               # the tables really are split over the 8 devices
    tables = [x for x in jax.tree.leaves(state.emb) if x.ndim == 2 and x.shape[0] >= 8]
    assert any(not x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
               for x in tables)
  else:
    assert type(emb8).__name__ == "DynamicEmbedding"
  if name == "mmoe":                    # both towers train: the conversion label reached its head
    moved = lambda t: max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                          zip(jax.tree.leaves(start["towers"][t]),
                              jax.tree.leaves(jax.device_get(state.params)["towers"][t])))
    assert moved(0) > 0 and moved(1) > 0


def test_mmoe_run_fits_and_reports_click_and_conversion():
  """The loop end to end on a stream with both labels: the conversion head learns, and its
  Bayes AUC is the teacher's, recomputed here from the stream."""
  from experiments.configs import mmoe_synthetic
  from jaxrec.data.synthetic import SyntheticConfig, SyntheticCriteo
  from jaxrec.train.loop import train_and_evaluate
  c = mmoe_synthetic.get_config("tiny")
  cards = (300, 100, 30, 5)
  c.data.preset = "kaggle"                 # the preset that takes its vocabularies from here
  c.data.synthetic.cardinalities = cards
  c.data.synthetic.num_pairs = 1
  n = 512 * 80                             # 80 steps
  c.data.batch_size, c.data.train_examples = 512, n
  c.data.eval_start, c.data.eval_examples, c.data.eval_batch_size = n, 16384, 4096
  c.mesh.shape = (1,)
  c.model.embedding_dim, c.model.bottom_mlp, c.model.top_mlp = 8, (16, 8), (16, 1)
  c.model.options.expert_mlp = (32, 16)
  c.optimizer.learning_rate, c.embedding.learning_rate = 1e-2, 0.1
  s = train_and_evaluate(c)
  synth = {k: v for k, v in c.data.synthetic.items() if k != "cardinalities"}
  stream = SyntheticCriteo(SyntheticConfig(seed=c.data.seed, cardinalities=cards, **synth))
  b, p = stream.examples(n, n + 16384, with_prob=True)
  assert s["bayes_auc"] == metrics.auc(b.labels[:, 0], p[:, 0])
  assert s["bayes_auc_conversion"] == metrics.auc(b.labels[:, 1], p[:, 1])
  for k in ("", "_conversion"):
    assert s[f"bayes_auc{k}"] > s[f"test_auc{k}"] > 0.68, s   # measured 0.73 and 0.73
    assert s[f"test_logloss{k}"] < s[f"constant_logloss{k}"], s


@pytest.mark.slow   # one to two minutes each on a 2-core CPU
@pytest.mark.parametrize("config", ["dcnv2_synthetic", "deepfm_synthetic", "wide_deep_synthetic",
                                    "mmoe_synthetic"])
def test_learns_the_planted_task(config):
  """The `:test` miniature (800k examples, 781 steps): a regression guard, not the acceptance
  bar. Measured margin ratios (auc - 0.5) / (bayes - 0.5): DCNv2 0.951, DeepFM 0.915,
  Wide&Deep 0.948, MMoE (click head, trained alone) 0.952, DLRM 0.946; 0.97 needs longer runs
  (at 5M examples, evaluated on the next 200k: DCNv2 0.978, DeepFM 0.970, MMoE with both
  heads 0.978 click / 0.982 conversion). MMoE's two-head figures at 800k are not measured; its
  conversion bound is loose."""
  from jaxrec.train.loop import train_and_evaluate
  s = train_and_evaluate(importlib.import_module(f"experiments.configs.{config}").get_config("test"))
  ratio = (s["test_auc"] - 0.5) / (s["bayes_auc"] - 0.5)
  assert ratio > 0.88, (config, ratio, s)
  assert s["test_logloss"] < s["constant_logloss"] - 0.05, s
  if config == "mmoe_synthetic":
    conversion = (s["test_auc_conversion"] - 0.5) / (s["bayes_auc_conversion"] - 0.5)
    assert conversion > 0.8, (conversion, s)
