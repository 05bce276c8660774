"""Dynamic tables batched into one program per group of same-shaped tables, and the trainable
default row: the grouped program gives what one program per table gives, exactly; the default
row reads and trains like a plain numpy row-wise Adagrad row fed by the lookups without a
row (held keys taken from ``export``, not from the engine's internals)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding.dynamic import DynamicEmbedding
from jaxrec.embedding.specs import DynamicSpec, FeatureSpec, SparseOptimizer, TableSpec

BATCH = 32
OPT = SparseOptimizer("rowwise_adagrad", 0.1)


def _dyn(cap, **kw):
  return DynamicSpec(capacity=cap, min_count=2, steps_to_live=2, evict_every_steps=2, **kw)


# a, b share a shape (one group, different init scales, age and load-factor eviction); c
# has another capacity (its own program); e, f admit by a coin (per-table rng seeds).
TABLES = [TableSpec("a", None, 8, optimizer=OPT, init_scale=0.1,
                    dynamic=_dyn(128, max_load_factor=0.5)),
          TableSpec("b", None, 8, optimizer=OPT, init_scale=0.3,
                    dynamic=_dyn(128, max_load_factor=0.5)),
          TableSpec("c", None, 8, optimizer=OPT, dynamic=_dyn(256)),
          TableSpec("e", None, 8, optimizer=OPT, dynamic=DynamicSpec(64, admit_probability=0.5)),
          TableSpec("f", None, 8, optimizer=OPT, dynamic=DynamicSpec(64, admit_probability=0.5))]
FEATURES = [FeatureSpec("fa", "a", "sum", 2), FeatureSpec("fb", "b", "mean", 2),
            FeatureSpec("fc", "c", "none", 1), FeatureSpec("fe", "e"), FeatureSpec("ff", "f")]


def _ids(raw: np.ndarray, emb) -> jax.Array:
  ids = (raw.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
  return jax.device_put(ids.view(np.uint32).reshape(*raw.shape, 2), emb.batch_sharding)


@functools.cache
def _jitted(emb):
  return jax.jit(emb.forward_train), jax.jit(emb.update)


@functools.cache
def _engine(tables: tuple, shape: tuple[int, ...], group: bool = True):
  features = FEATURES if tables == tuple(TABLES) else DEF_FEATURES
  return DynamicEmbedding(list(tables), features, make_mesh(shape), group_tables=group)


def _run(emb, steps: int, vocab=lambda s: 30 + 10 * s, seed: int = 0, held: bool = True):
  fwd, upd = _jitted(emb)
  rng = np.random.default_rng(seed)
  state = emb.init()
  seen = []
  for step in range(1, steps + 1):
    raw = rng.integers(0, vocab(step), (BATCH, emb.layout.num_columns))
    mask = rng.random(raw.shape) < 0.8
    state, feats, res, stats = fwd(state, _ids(raw, emb),
                                   jax.device_put(mask, emb.batch_sharding), step)
    g = [0.5 * f + 0.1 * (i + 1) for i, f in enumerate(feats)]
    seen.append({"raw": raw, "mask": mask, "feats": [np.asarray(f) for f in feats],
                 "grads": [np.asarray(x) for x in g], "stats": jax.device_get(stats),
                 # after the inserts, before the update
                 "held": emb.export(state) if held else None})
    state = upd(state, res, g, step)
  return emb.export(state), seen


def test_groups_are_formed_by_shape():
  emb = DynamicEmbedding(TABLES, FEATURES, make_mesh((1,)), group_tables=True)
  assert sorted(map(sorted, emb.groups.values())) == [["a", "b"], ["c"], ["e", "f"]]
  alone = DynamicEmbedding(TABLES, FEATURES, make_mesh((1,)))
  assert sorted(map(tuple, alone.groups.values())) == [(n,) for n in "abcef"]


@pytest.mark.slow  # grouping is opt-in; 9 engine programs on 8 devices: ~1 min of CPU
@pytest.mark.parametrize("shape", [(8,)])
def test_grouped_tables_equal_one_program_per_table(shape):
  grouped, s_g = _run(_engine(tuple(TABLES), shape), 4, held=False)
  alone, s_a = _run(_engine(tuple(TABLES), shape, False), 4, held=False)
  for a, b in zip(s_g, s_a):
    for x, y in zip(a["feats"], b["feats"]):
      np.testing.assert_array_equal(x, y)
    assert a["stats"].keys() == b["stats"].keys()
    for k in a["stats"]:
      np.testing.assert_array_equal(a["stats"][k], b["stats"][k], err_msg=k)
  for t in "abcef":
    assert len(grouped[t]["keys"]) > 0, t
    for k in ("keys", "values", "frequency", "last_seen"):
      np.testing.assert_array_equal(grouped[t][k], alone[t][k], err_msg=f"{t}/{k}")
    np.testing.assert_array_equal(grouped[t]["slots"]["acc"], alone[t]["slots"]["acc"])
  # The per-table traced inputs really differ: init scales and admission coins.
  assert np.abs(grouped["a"]["values"]).max() < np.abs(grouped["b"]["values"]).max()
  totals = lambda t, k: sum(int(s["stats"][f"{t}/{k}"]) for s in s_g)
  assert totals("a", "evicted") > 0 and totals("b", "evicted") > 0
  assert totals("e", "not_admitted") > 0 and totals("e", "admitted") > 0
  assert totals("e", "admitted") != totals("f", "admitted") or not np.array_equal(
      grouped["e"]["keys"], grouped["f"]["keys"])


# ---- trainable default row -----------------------------------------------------------------

def _def_tables(default_row="trainable"):
  return [TableSpec("u", None, 4, optimizer=OPT, init_scale=0.1,
                    dynamic=DynamicSpec(capacity=512, min_count=2, default_row=default_row))]


DEF_TABLES = _def_tables()
DEF_FEATURES = [FeatureSpec("bag", "u", "sum", 3), FeatureSpec("seq", "u", "none", 2)]


def _key(raw) -> np.ndarray:
  return (np.asarray(raw, np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)


def _reference_default(seen, dim: int, lr: float, eps: float = 1e-8):
  """Numpy: feats and the default row over the steps, where the occurrences without a row are
  those whose key ``export`` does not hold after the step's inserts."""
  w, acc = np.zeros(dim, np.float32), np.float32(0.0)
  for s in seen:
    held = dict(zip(s["held"]["u"]["keys"].tolist(), s["held"]["u"]["values"]))
    keys = _key(s["raw"])
    has = np.array([[int(k) in held for k in row] for row in keys])
    occ = np.stack([np.stack([held[int(k)] if int(k) in held else w for k in row])
                    for row in keys])                              # [B, 5, dim]
    occ = occ * s["mask"][..., None]
    np.testing.assert_allclose(s["feats"][0], occ[:, :3].sum(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s["feats"][1], occ[:, 3:], rtol=1e-6, atol=1e-7)
    g_occ = np.concatenate([np.repeat(s["grads"][0][:, None], 3, 1), s["grads"][1]], 1)
    miss = s["mask"] & ~has
    if miss.any():
      g = (g_occ * miss[..., None]).sum((0, 1)).astype(np.float32)
      acc = np.float32(acc + np.mean(g * g))
      w = (w - lr * g / (np.sqrt(acc) + eps)).astype(np.float32)
  return w, acc


def test_trainable_default_row_against_numpy():
  shape = (1,)
  final, seen = _run(_engine(tuple(DEF_TABLES), shape), 4, vocab=lambda s: 60 + 20 * s)
  w, acc = _reference_default(seen, 4, OPT.learning_rate)
  got = final["u"]["default"]
  assert np.abs(got["values"]).max() > 0                  # it trained
  np.testing.assert_allclose(got["values"], w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["slots"]["acc"], acc, rtol=1e-5)
  # Reading the default row gives no ID a row: the held keys are, step by step, those of
  # the same stream with a zero default row.
  assert sum(int(s["stats"]["u/not_admitted"]) for s in seen) > 0
  _, zeros = _run(_engine(tuple(_def_tables("zeros")), shape), 4,
                  vocab=lambda s: 60 + 20 * s)
  for a, b in zip(seen, zeros):
    np.testing.assert_array_equal(a["held"]["u"]["keys"], b["held"]["u"]["keys"])
    assert "default" not in b["held"]["u"]


@pytest.mark.slow  # two more engines (1 and 8 devices): ~40 s of CPU
def test_default_row_in_eval_and_mesh_invariant():
  one, s1 = _run(_engine(tuple(DEF_TABLES), (1,)), 3, held=False)
  eight, s8 = _run(_engine(tuple(DEF_TABLES), (8,)), 3, held=False)
  np.testing.assert_array_equal(one["u"]["keys"], eight["u"]["keys"])
  # The default row's gradient is a psum over devices: equal up to summation order.
  np.testing.assert_allclose(one["u"]["default"]["values"], eight["u"]["default"]["values"],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(one["u"]["values"], eight["u"]["values"], rtol=1e-5, atol=1e-7)
  # Eval: an unknown ID reads the trained default row.
  emb = _engine(tuple(DEF_TABLES), (1,))
  state = emb.init()
  fwd, upd = _jitted(emb)
  raw = np.arange(BATCH * 5).reshape(BATCH, 5)
  mask = jax.device_put(np.ones((BATCH, 5), bool), emb.batch_sharding)
  state, feats, res, _ = fwd(state, _ids(raw, emb), mask, 1)   # all new: all read default
  for f in feats:
    assert not np.asarray(f).any()                             # the default starts at zero
  state = upd(state, res, [np.ones_like(f) for f in feats], 1)
  w = np.asarray(state["@default"]["u"]["values"])
  assert (w < 0).all()                                         # one Adagrad step down
  feats, _, _ = jax.jit(emb.forward)(state, _ids(raw + 10_000, emb), mask)
  np.testing.assert_allclose(np.asarray(feats[1]), np.broadcast_to(w, (BATCH, 2, 4)))
  np.testing.assert_allclose(np.asarray(feats[0]), np.broadcast_to(3 * w, (BATCH, 4)),
                             rtol=1e-6)
