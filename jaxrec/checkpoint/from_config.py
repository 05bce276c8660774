"""The freshly initialised train state of an experiment config, for restores driven by the CLI.

Mirrors how ``jaxrec.train.loop.train_and_evaluate`` builds its state (builders +
``loop.init_state`` + ``place_state``), so ``python -m jaxrec.checkpoint warm_start`` can read a
snapshot into exactly the state a run of the new config would start from.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import ml_collections


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """``path/to/config.py[:variant]`` and ``a.b=value`` overrides (Python literals, else
  strings), as ``experiments/train.py --config=... --config.a.b=value`` would give."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  mod_spec = importlib.util.spec_from_file_location("_jaxrec_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config(variant) if variant else mod.get_config()
  for o in overrides:
    key, eq, raw = o.partition("=")
    if not eq:
      raise ValueError(f"config override {o!r}: expected key=value")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    config.update_from_flattened_dict({key: value})
  return config


@dataclasses.dataclass
class Run:
  """What a config's run starts from."""

  state: Any
  layouts: dict
  emb: Any
  graphdef: Any
  tx: Any
  stream: Any   # the synthetic stream; for other sources their jaxrec.train.sources.TrainData


def build(config) -> Run:
  """The initial (placed) TrainState of ``config``, with its checkpoint layouts."""
  from jaxrec.checkpoint.layouts import layout_for
  from jaxrec.distributed.mesh import make_mesh
  from jaxrec.train import builders, loop, sources
  from jaxrec.train.state import place_state

  d = config.data
  data = sources.open_data(config)
  stream, cards = getattr(data, "stream", data), data.cardinalities
  steps = max(1, int(data.train_examples // d.batch_size))
  mesh_cfg = config.get("mesh") or {}
  mesh = make_mesh(mesh_cfg.get("shape"), mesh_cfg.get("axis_names"))
  emb = builders.embedding_plan(data.layout, cards, config.embedding,
                                config.model.embedding_dim, mesh=mesh, batch_size=d.batch_size)
  model = builders.build_model(config.model, d.num_dense, data.layout.num_features,
                               config.seed)
  tx = builders.dense_optimizer(config.optimizer, steps)
  graphdef, state = loop.init_state(config, emb, model, tx)
  state = place_state(state, emb)
  return Run(state, {"emb": layout_for(emb)}, emb, graphdef, tx, stream)
