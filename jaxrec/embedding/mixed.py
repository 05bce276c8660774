"""Static and dynamic tables in one model: each feature's table decides its engine.

Small vocabularies are cheapest as fixed tables (hashed or index) through the sharded engine
(``ShardedEmbedding``: stacked, planned, one custom_vjp lookup); large or open ones as device
hash tables (``DynamicEmbedding``). ``MixedEmbedding`` holds one of each over the same mesh,
splits the batch's sparse columns between them, and puts the features back in model order.

A train step (``step.make_dynamic_train_step``) runs the dynamic forward (inserts, evictions)
first, then differentiates the loss w.r.t. the dense parameters, the dynamic features and the
static state, with the static lookup inside the loss, so its custom_vjp returns the updated
static tables as their "gradient" exactly as in the all-static step; the dynamic features'
gradient goes to ``update``.

State: ``{"static": EmbeddingState, "dynamic": {table: HashTableState, ...}}``; checkpoints
use ``layouts.MixedEmbeddingLayout`` (each part keeps its own layout).
"""

from __future__ import annotations

import types
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.data.batch import Batch, SparseLayout
from jaxrec.embedding.dynamic import DynamicEmbedding
from jaxrec.embedding.engine import MeshEngine
from jaxrec.embedding.sharded import ShardedEmbedding
from jaxrec.embedding.specs import FeatureSpec, TableSpec, validate


def _columns(x, cols: np.ndarray):
  """x[:, cols] for static columns (a slice when they are contiguous)."""
  if len(cols) and np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))):
    return x[:, int(cols[0]):int(cols[0]) + len(cols)]
  return jnp.take(x, jnp.asarray(cols), axis=1) if isinstance(x, jax.Array) else x[:, cols]


class MixedEmbedding(MeshEngine):
  """Static tables (``rows`` set) on a ``ShardedEmbedding``, dynamic ones (``rows=None``) on a
  ``DynamicEmbedding``, over one mesh. Surface: that of ``DynamicEmbedding`` (``forward_train``
  returns the dynamic features, ``update`` takes their gradient) plus ``static_lookup``, which
  the train step calls inside its loss to get every feature in model order.

  Args: as both engines; ``planner`` keywords go to the static one's planner.
  """

  is_dynamic = True   # the step takes the dynamic path (forward_train / update)
  is_mixed = True

  def __init__(self, tables: Sequence[TableSpec], features: Sequence[FeatureSpec], mesh, *,
               batch_size: int = 1, capacity_factor: float | None = None,
               group_tables: bool = False, **planner):
    tables, features = list(tables), list(features)
    validate(tables, features)
    self.mesh = mesh
    self.axes = tuple(mesh.axis_names)
    self.num_devices = int(mesh.size)
    by_name = {t.name: t for t in tables}
    used = {f.table for f in features}
    self.table_specs = {t.name: t for t in tables if t.name in used}
    self.features = tuple(features)
    self.layout = SparseLayout(tuple(f.name for f in features),
                               tuple(f.max_ids for f in features))
    is_dyn = [by_name[f.table].dynamic is not None for f in features]
    if all(is_dyn) or not any(is_dyn):
      kind = "dynamic" if all(is_dyn) else "static"
      raise ValueError(f"MixedEmbedding: every feature reads a {kind} table; use "
                       f"{'DynamicEmbedding' if all(is_dyn) else 'ShardedEmbedding'}")
    off = self.layout.offsets
    cols = lambda sel: np.asarray([c for fi, f in enumerate(features) if sel[fi]
                                   for c in range(off[fi], off[fi + 1])], np.int64)
    self.dynamic_features = np.nonzero(is_dyn)[0]
    self.static_features = np.nonzero(~np.asarray(is_dyn))[0]
    self.dynamic_cols = cols(is_dyn)
    self.static_cols = cols([not d for d in is_dyn])
    pick = lambda idx: [features[i] for i in idx]
    self.static = ShardedEmbedding(
        [t for t in tables if t.dynamic is None], pick(self.static_features), mesh,
        batch_size=batch_size, capacity_factor=capacity_factor, **planner)
    self.dynamic = DynamicEmbedding(
        [t for t in tables if t.dynamic is not None], pick(self.dynamic_features), mesh,
        capacity_factor=capacity_factor, group_tables=group_tables)
    self.specs = self.dynamic.specs
    self.groups = self.dynamic.groups
    self.feature_dims = tuple(self.table_specs[f.table].dim for f in features)
    self.dim = self.feature_dims[0] if len(set(self.feature_dims)) == 1 else None
    self.plan = types.SimpleNamespace(describe=lambda: (
        "static tables:\n" + self.static.plan.describe() + "\ndynamic tables:\n"
        + self.dynamic.plan.describe()))

  # ---- state ---------------------------------------------------------------------------------

  def state_specs(self) -> dict:
    return {"static": self.static.state_specs(), "dynamic": self.dynamic.state_specs()}

  def state_shardings(self) -> dict:
    return {"static": self.static.state_shardings(), "dynamic": self.dynamic.state_shardings()}

  def init(self, seed: int | jax.Array = 0) -> dict:
    return {"static": self.static.init(seed), "dynamic": self.dynamic.init(seed)}

  def check_batch(self, batch: Batch) -> Batch:
    """The static engine's host checks (``ids="index"`` tables), on its columns."""
    view = types.SimpleNamespace(ids=_columns(np.asarray(batch.ids), self.static_cols),
                                 mask=_columns(np.asarray(batch.mask), self.static_cols))
    self.static.check_batch(view)
    return batch

  def _split(self, x):
    return _columns(x, self.static_cols), _columns(x, self.dynamic_cols)

  def _merge(self, static_feats, dynamic_feats) -> list:
    out = [None] * len(self.features)
    for i, f in zip(self.static_features, static_feats):
      out[i] = f
    for i, f in zip(self.dynamic_features, dynamic_feats):
      out[i] = f
    return out

  # ---- the step's calls ----------------------------------------------------------------------

  def forward_train(self, state: dict, ids, mask, step):
    """(new state, dynamic features, residuals, dynamic stats); the static part is unchanged
    until the step's gradient updates it (``static_lookup``)."""
    _, d_ids = self._split(ids)
    _, d_mask = self._split(mask)
    dyn, feats, res, stats = self.dynamic.forward_train(state["dynamic"], d_ids, d_mask, step)
    return {"static": state["static"], "dynamic": dyn}, feats, res, stats

  def static_lookup(self, static_state, dynamic_feats, ids, mask, step):
    """(every feature in model order, static stats [overflow, invalid_ids]): the static
    lookup is ``ShardedEmbedding.lookup``, a custom_vjp whose gradient w.r.t.
    ``static_state`` is the updated static state."""
    s_ids, _ = self._split(ids)
    s_mask, _ = self._split(mask)
    feats, stats = self.static.lookup(static_state, s_ids, s_mask, step)
    return self._merge(feats, dynamic_feats), stats

  def update(self, state: dict, residuals, g_feats, step) -> dict:
    """Applies the dynamic features' gradient (``g_feats``: dynamic features only)."""
    return {"static": state["static"],
            "dynamic": self.dynamic.update(state["dynamic"], residuals, g_feats, step)}

  def forward(self, state: dict, ids, mask):
    """(features, None, stats): the read-only lookup of both engines (eval)."""
    s_ids, d_ids = self._split(ids)
    s_mask, d_mask = self._split(mask)
    s_feats, _, s_stats = self.static.forward(state["static"], s_ids, s_mask)
    d_feats, _, d_stats = self.dynamic.forward(state["dynamic"], d_ids, d_mask)
    return self._merge(s_feats, d_feats), None, {**d_stats, "static/overflow": s_stats[0],
                                                 "static/invalid_ids": s_stats[1]}

  def export(self, state: dict) -> dict:
    """Dynamic tables as ``DynamicEmbedding.export``; static ones as {"values", "slots"}
    dense arrays (``ShardedEmbedding.to_dense``)."""
    out = self.dynamic.export(state["dynamic"])
    tables, slots = self.static.to_dense(state["static"])
    for n in tables:
      out[n] = {"values": np.asarray(tables[n]), "slots": jax.device_get(slots.get(n, {}))}
    return out
