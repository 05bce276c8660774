"""Automatic rollback when training goes bad: NaN/Inf or a spike in the loss or gradient norm.

``observe`` takes one step's metrics and the data position *after* its batch; the loop saves a
version only when the answer is "continue" (so no saved version holds a bad step). The training
loop's monitor (jaxrec.monitoring) calls ``check`` on steps fetched in batches and ``decide`` on
the first bad one, always checking before a save. On an anomaly the answer is "rollback": restore the newest version older
than the bad step and resume the data at the position after the bad batch, skipping the window
between the two (a bad data hour costs that window and the steps since the version, not the
run). ``recover`` carries it out and records the skipped window in the metadata of every later
version.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from absl import logging

from jaxrec.checkpoint.manager import Checkpointer, Restored


@dataclasses.dataclass(frozen=True)
class GuardOptions:
  """metrics: which metrics to watch (absent ones are ignored).
  spike_factor: a value above ``spike_factor`` x its running mean is a spike (None: NaN/Inf
    only). The running mean is an EMA over healthy steps, after ``warmup_steps`` of them.
  max_rollbacks: give up (action "abort") after this many rollbacks in one run.
  """

  metrics: tuple[str, ...] = ("loss", "dense_grad_norm")
  spike_factor: float | None = 10.0
  warmup_steps: int = 100
  ema_decay: float = 0.98
  max_rollbacks: int = 5


@dataclasses.dataclass(frozen=True)
class Action:
  """What the loop should do after a step.

  kind: "continue", "rollback" (restore version ``step``, resume data at ``data_position``) or
    "abort" (no version to go back to, or too many rollbacks: raise ``reason``).
  """

  kind: str
  reason: str = ""
  step: int | None = None
  data_position: Any = None
  skipped_from: Any = None

  @property
  def ok(self) -> bool:
    return self.kind == "continue"


class AnomalyGuard:
  """Watches step metrics; decides and performs rollbacks through ``checkpointer``.

  ``checkpointer`` may be None for detection only (``check``): then every anomaly ``decide``s
  to abort."""

  def __init__(self, checkpointer: Checkpointer | None, options: GuardOptions | None = None):
    self.ckpt = checkpointer
    self.options = options or GuardOptions()
    self._ema: dict[str, float] = {}
    self._seen = 0
    self.rollbacks: list[dict] = []

  def observe(self, step: int, metrics: Mapping[str, Any], data_position: Any) -> Action:
    """Checks one step's metrics (this syncs on them). ``data_position``: where the data
    continues after this step's batch."""
    reason = self.check(step, metrics)
    return Action("continue") if reason is None else self.decide(reason, step, data_position)

  def check(self, step: int, metrics: Mapping[str, Any]) -> str | None:
    """What is wrong with one step's metrics ("step N: loss became nan"), or None; healthy
    steps update the running means. Steps must come in order."""
    o = self.options
    vals = {k: float(metrics[k]) for k in o.metrics if k in metrics}
    bad = [f"{k} became {v}" for k, v in vals.items() if not math.isfinite(v)]
    if not bad and o.spike_factor is not None and self._seen >= o.warmup_steps:
      bad = [f"{k} spiked to {v:.4g} (> {o.spike_factor:g} x running mean {self._ema[k]:.4g})"
             for k, v in vals.items() if k in self._ema and v > o.spike_factor * self._ema[k]]
    if not bad:
      for k, v in vals.items():
        self._ema[k] = v if k not in self._ema else o.ema_decay * self._ema[k] + (
            1 - o.ema_decay) * v
      self._seen += 1
      return None
    return f"step {step}: " + "; ".join(bad)

  def decide(self, reason: str, step: int, data_position: Any) -> Action:
    """The action for an anomaly at ``step``: roll back to the newest version before it, or
    abort when there is none (or no checkpointer, or too many rollbacks)."""
    o = self.options
    if len(self.rollbacks) >= o.max_rollbacks:
      return Action("abort", f"{reason}; {len(self.rollbacks)} rollbacks already, giving up")
    if self.ckpt is None:
      return Action("abort", f"{reason}; no checkpoints to roll back to")
    self.ckpt.wait_until_finished()  # a version still being written counts
    v = self.ckpt.latest(before=step)
    if v is None:
      return Action("abort", f"{reason}; no checkpoint version before step {step} to roll "
                             "back to (save one at step 0)")
    return Action("rollback", reason, v.step, data_position, v.data_position)

  def recover(self, action: Action, target) -> Restored:
    """Rolls back to ``action.step`` (newer versions set aside, not deleted), restores it into
    ``target``'s structure and returns it with the data position moved past the bad window."""
    if action.kind != "rollback":
      raise ValueError(f"recover needs a rollback action, got {action.kind!r}: {action.reason}")
    self.ckpt.rollback(to=action.step)
    restored = self.ckpt.restore(target, step=action.step)
    event = {"reason": action.reason, "restored_step": action.step,
             "skipped_from": action.skipped_from, "skipped_to": action.data_position}
    self.rollbacks.append(event)
    self.ckpt.extra_metadata["rollbacks"] = list(self.rollbacks)
    msg = (f"{action.reason}: rolled back to version {action.step} and skipped the data from "
           f"{action.skipped_from} to {action.data_position}")
    logging.warning(msg)
    restored.report.append(msg)
    restored.data_position = action.data_position
    return restored
