"""Snapshots of a training run: consistent, crash-safe, incremental, reshardable.

  ckpt = Checkpointer(checkpoint_dir(workdir), SnapshotOptions(save_every_steps=1000),
                      layouts={"emb": layout_for(emb)})
  restored = ckpt.restore_or_init(state)            # resume (or start fresh)
  ckpt.save(step, state, data_position={"example": n})   # async; policy decides
  ckpt.wait_until_finished()

CLI: ``python -m jaxrec.checkpoint list|rollback|prune|verify|warm_start`` (see __main__.py).
Names are imported on first use, so the CLI's file-only commands start without jax.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Action": "guard", "AnomalyGuard": "guard", "GuardOptions": "guard",
    "HashShardsLayout": "layouts", "Layout": "layouts", "LayoutMismatchError": "layouts",
    "StackedEmbeddingLayout": "layouts", "DynamicEmbeddingLayout": "layouts",
    "layout_for": "layouts",
    "Checkpointer": "manager", "Restored": "manager", "SaveInfo": "manager",
    "SnapshotOptions": "manager",
    "CorruptCheckpointError": "manifest",
    "NoCheckpointError": "versions", "Version": "versions", "checkpoint_dir": "versions",
    "list_versions": "versions", "prune": "versions", "rollback": "versions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"jaxrec.checkpoint.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'jaxrec.checkpoint' has no attribute {name!r}")
