"""Turns a config into the objects a run needs: data stream, embedding plan, model, optimizer."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxrec import models
from jaxrec.data import synthetic
from jaxrec.distributed.mesh import make_mesh
from jaxrec.embedding.dynamic import DynamicEmbedding
from jaxrec.embedding.mixed import MixedEmbedding
from jaxrec.embedding.specs import DynamicSpec, FeatureSpec, SparseOptimizer, TableSpec
from jaxrec.embedding.sharded import ShardedEmbedding


def synthetic_stream(data_cfg) -> synthetic.SyntheticCriteo:
  presets = {
      "kaggle": synthetic.SyntheticConfig,
      "small": lambda **kw: synthetic.small_config(**kw),
      "test": lambda **kw: synthetic.small_config(scale=0.1, **kw),
  }
  if data_cfg.preset not in presets:
    raise ValueError(f"config.data.preset={data_cfg.preset!r}; expected one of {sorted(presets)}")
  overrides = {k: v for k, v in dict(data_cfg.get("synthetic", {}) or {}).items()
               if v is not None}
  for k in ("cardinalities", "max_ids"):
    if overrides.get(k) is not None:
      overrides[k] = tuple(overrides[k])
  fields = {f.name for f in dataclasses.fields(synthetic.SyntheticConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"config.data.synthetic has unknown fields {unknown}; known: {sorted(fields)}")
  return synthetic.SyntheticCriteo(presets[data_cfg.preset](seed=data_cfg.seed, **overrides))


def table_rows(cardinality: int | None, emb_cfg) -> int:
  """Rows of a hashed table: a few times the vocabulary (few collisions), capped."""
  if cardinality is None:
    return int(emb_cfg.max_rows)
  return int(min(emb_cfg.max_rows, max(emb_cfg.min_rows, math.ceil(cardinality * emb_cfg.rows_factor))))


def embedding_plan(layout, cardinalities, emb_cfg, dim: int, mesh=None, batch_size: int = 1,
                   comm=None) -> ShardedEmbedding:
  """Tables and features from the config, planned onto ``mesh`` (default: every device).

  emb_cfg may set ``sharding`` (one type for every table, overriding the planner),
  ``memory_budget_mib`` (per device), ``replicate_below_kib`` and ``capacity_factor``.
  ``dynamic=True`` makes every table dynamic (``dynamic_table``) and returns a
  ``DynamicEmbedding`` instead; with ``dynamic_min_vocab``, features with a smaller vocabulary
  keep their static table and a model with both kinds gets a ``MixedEmbedding``. ``dedup``
  (default True) and ``comm`` (a ``jaxrec.comm.spec.CommSpec``: wire precision of the row
  exchanges) go to the static engine.
  """
  opt = SparseOptimizer(name=emb_cfg.optimizer, learning_rate=emb_cfg.learning_rate,
                        initial_accumulator=emb_cfg.get("initial_accumulator", 0.0),
                        eps=emb_cfg.get("eps", 1e-8))
  tables, features = [], []
  for f, name in enumerate(layout.names):
    card = cardinalities[f] if cardinalities is not None else None
    tables.append(TableSpec(name=f"t_{name}", rows=table_rows(card, emb_cfg), dim=dim,
                            optimizer=opt, init_scale=emb_cfg.get("init_scale", None),
                            sharding=emb_cfg.get("sharding", None) or None))
    features.append(FeatureSpec(name=name, table=f"t_{name}", pooling=emb_cfg.pooling,
                                max_ids=layout.max_ids[f]))
  if mesh is None:
    mesh = make_mesh()
  planner = {}
  if emb_cfg.get("memory_budget_mib"):
    planner["memory_budget"] = int(emb_cfg.memory_budget_mib * 2**20)
  if emb_cfg.get("replicate_below_kib") is not None:
    planner["replicate_below"] = int(emb_cfg.replicate_below_kib * 1024)
  if comm is not None:
    planner.update(precision=comm.embedding_precision,
                   forward_precision=comm.embedding_forward_precision,
                   compact_ids=comm.compact_ids)
  planner["dedup"] = emb_cfg.get("dedup", True)
  if emb_cfg.get("dynamic", False):
    # Vocabularies below dynamic_min_vocab keep their static hashed table (unknown: dynamic).
    min_vocab = int(emb_cfg.get("dynamic_min_vocab", 0) or 0)
    cards = cardinalities if cardinalities is not None else [None] * len(tables)
    tables = [t if card is not None and card < min_vocab else
              dynamic_table(t, card, emb_cfg, mesh.size) for t, card in zip(tables, cards)]
    if all(t.dynamic is None for t in tables):
      return ShardedEmbedding(tables, features, mesh, batch_size=batch_size,
                              capacity_factor=emb_cfg.get("capacity_factor", None), **planner)
    if comm is not None and {comm.embedding_precision,
                             comm.embedding_forward_precision} != {"fp32"}:
      raise ValueError("config.comm.embedding_precision / embedding_forward_precision: "
                       "compressed rows are wired for static tables only (embedding.dynamic)")
    if all(t.dynamic is not None for t in tables):
      return DynamicEmbedding(tables, features, mesh, batch_size=batch_size,
                              capacity_factor=emb_cfg.get("capacity_factor", None),
                              group_tables=bool(emb_cfg.get("dynamic_group_tables", False)))
    return MixedEmbedding(tables, features, mesh, batch_size=batch_size,
                          capacity_factor=emb_cfg.get("capacity_factor", None),
                          group_tables=bool(emb_cfg.get("dynamic_group_tables", False)),
                          **planner)
  return ShardedEmbedding(tables, features, mesh, batch_size=batch_size,
                          capacity_factor=emb_cfg.get("capacity_factor", None), **planner)


def dynamic_table(static: TableSpec, cardinality: int | None, emb_cfg, shards: int
                  ) -> TableSpec:
  """The dynamic twin of a static hashed table, from ``emb_cfg.dynamic_table``.

  Capacity: ``capacity_factor`` x the feature's vocabulary (the popular head the stream draws
  from at any time), clipped to [min_capacity, max_capacity]; each shard's share is rounded
  up to a power of two. Rows start at the static table's scale, so the two runs compare.
  """
  d = emb_cfg.get("dynamic_table", None) or ml_collections.ConfigDict()
  vocab = cardinality if cardinality is not None else int(d.get("max_capacity", 1 << 18))
  cap = int(np.clip(math.ceil(vocab * d.get("capacity_factor", 1.0)),
                    d.get("min_capacity", 64), d.get("max_capacity", 1 << 18)))
  cap = max(cap, 8 * shards)
  known = {"capacity_factor", "min_capacity", "max_capacity", "min_count", "admit_probability",
           "steps_to_live", "min_frequency", "min_l2_norm", "max_load_factor",
           "evict_every_steps", "evict_above_load_factor", "on_full", "max_probes",
           "sketch_width", "default_row"}
  unknown = sorted(set(d.keys()) - known)
  if unknown:
    raise ValueError(f"config.embedding.dynamic_table has unknown fields {unknown}; "
                     f"known: {sorted(known)}")
  fields = {k: d[k] for k in known - {"capacity_factor", "min_capacity", "max_capacity"}
            if d.get(k) is not None}
  return dataclasses.replace(static, rows=None, init_scale=static.scale,
                             dynamic=DynamicSpec(capacity=cap, **fields))


def dense_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  warmup = int(opt_cfg.warmup_steps)
  lr = opt_cfg.learning_rate
  if opt_cfg.get("decay", "constant") == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total_steps, warmup + 1),
                                                  end_value=lr * 0.05)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [max(warmup, 1)])
  name = opt_cfg.name
  if name == "adam":
    return optax.adam(schedule)
  if name == "adagrad":
    return optax.adagrad(schedule, initial_accumulator_value=opt_cfg.get("initial_accumulator", 0.1))
  if name == "sgd":
    return optax.sgd(schedule)
  raise ValueError(f"config.optimizer.name={name!r}; expected adam, adagrad or sgd")


def compute_dtype(name: str | None):
  if name in (None, "", "float32"):
    return None
  if name == "bfloat16":
    return jnp.bfloat16
  raise ValueError(f"config.model.compute_dtype={name!r}; expected float32 or bfloat16")


def build_model(model_cfg, num_dense: int, num_sparse: int, seed: int) -> nnx.Module:
  # Model-specific settings (cross layers, experts, ...) pass through from config.model.options.
  options = {k: tuple(v) if isinstance(v, list) else v
             for k, v in dict(model_cfg.get("options") or {}).items()}
  return models.build_model(
      model_cfg.name, num_dense=num_dense, num_sparse=num_sparse,
      embedding_dim=model_cfg.embedding_dim, bottom_mlp=tuple(model_cfg.bottom_mlp),
      top_mlp=tuple(model_cfg.top_mlp), rngs=nnx.Rngs(seed),
      compute_dtype=compute_dtype(model_cfg.get("compute_dtype")), **options)


def device_batch(batch) -> dict:
  """Host Batch -> dict of arrays the step takes (IDs as uint32 pairs)."""
  return {"dense": batch.dense, "ids": batch.ids_as_u32_pairs(), "mask": batch.mask,
          "labels": batch.labels}
