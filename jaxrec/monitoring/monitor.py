"""The training loop's monitor: gathers the step's monitor values, writes records, and acts on
gradient anomalies.

The loop makes three calls: ``timed(batches)`` (times the wait for input), ``after_step`` (every
step; returns the anomaly action) and ``close``. What it costs the step:

- nothing syncs per step. The step's anomaly and counter scalars (and the AUC histogram) are
  kept as device arrays and fetched together every ``check_every_steps`` steps, on log steps,
  before a checkpoint save (no version may hold a bad step) and at the last step; anomalies are
  then found step by step in order, so the action names the first bad step. Between checks
  training runs on for up to ``check_every_steps - 1`` steps after a bad one; those are thrown
  away by "rollback" and change nothing for "stop".
- on log steps: the rest of the log step's metrics, its batch's IDs (hot-row share) and the
  memory stats are read.

Log records (every ``log_every`` steps, JSONL and TensorBoard, tag = key):

  loss                 mean over the steps since the previous record
  train_auc            streaming AUC of the training predictions over those steps, from
                       [2, bins] logit histograms (within ``tie_bound`` of the exact AUC)
  samples_per_s        over the window's wall time
  time/step_ms         wall time per step, split into time/input_wait_ms (in the input
                       iterator's next()), time/device_wait_ms (blocked on device results at
                       checks and log steps: the device time the host could not overlap) and
                       time/host_ms (the rest: dispatch, Python, monitors)
  grad_norm/<group>, grad_norm/embedding, dense_grad_norm: the log step's values
  nonfinite            NaN/Inf values in loss/logits/gradients, summed over the window
  anomalies            anomalous steps in the window
  embedding_overflow, invalid_ids, dynamic/{admitted,rejected,evicted,insert_failures}:
                       summed over the window (all tables)
  dynamic/<table>/...  the log step's per-table stats (size, load_factor, ...)
  hot_row_share        the log step's batch, see ``hot_rows.hot_row_share``
  collective_bytes_per_step  from the compiled step (None: jaxrec.comm.accounting absent)
  memory/...           see ``memory.memory_in_use`` (memory/source says which kind)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from jaxrec.checkpoint.guard import Action, AnomalyGuard, GuardOptions
from jaxrec.monitoring import auc as auc_lib
from jaxrec.monitoring.hot_rows import hot_row_share
from jaxrec.monitoring.memory import memory_in_use
from jaxrec.monitoring.step_metrics import StepMonitors
from jaxrec.monitoring.writers import JsonlWriter, TensorBoardWriter, Writers

ACTIONS = ("log", "stop", "rollback")
# Per-step counters summed over a log window (absent ones are skipped).
_WINDOW_SUMS = ("nonfinite", "embedding_overflow", "invalid_ids", "dynamic/admitted",
                "dynamic/rejected", "dynamic/evicted", "dynamic/insert_failures")


class AnomalyStop(FloatingPointError):
  """Training stopped on a gradient anomaly (``config.monitor.anomaly_action="stop"``)."""


@dataclasses.dataclass(frozen=True)
class MonitorOptions:
  """config.monitor, checked.

  anomaly_action: "log" (record it, train on), "stop" (raise ``AnomalyStop`` naming the step
    and metric) or "rollback" (restore the newest snapshot before the bad step and skip the
    data up to it; needs checkpoints).
  spike_factor: a loss or gradient norm above this x its running mean is an anomaly (0: only
    NaN/Inf), after ``spike_warmup_steps`` healthy steps.
  check_every_steps: how often the anomaly scalars are fetched (see the module docstring).
  """

  log_every_steps: int = 200
  tensorboard: bool = True
  anomaly_action: str = "rollback"
  spike_factor: float = 10.0
  spike_warmup_steps: int = 100
  max_rollbacks: int = 5
  check_every_steps: int = 10
  streaming_auc_bins: int = 1024
  hot_row_fraction: float = 0.01

  def __post_init__(self):
    if self.anomaly_action not in ACTIONS:
      raise ValueError(f"config.monitor.anomaly_action={self.anomaly_action!r}; expected one "
                       f"of {list(ACTIONS)}")
    for name in ("log_every_steps", "check_every_steps", "streaming_auc_bins"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"config.monitor.{name}={getattr(self, name)} must be >= 1")
    if not 0 < self.hot_row_fraction <= 1:
      raise ValueError(f"config.monitor.hot_row_fraction={self.hot_row_fraction} must be in "
                       "(0, 1]")

  @classmethod
  def from_config(cls, config) -> "MonitorOptions":
    """From ``config.monitor`` (absent fields keep their defaults) and ``log_every_steps``."""
    m = dict(config.get("monitor") or {})
    known = {f.name for f in dataclasses.fields(cls)} - {"log_every_steps"}
    unknown = sorted(set(m) - known)
    if unknown:
      raise ValueError(f"config.monitor has unknown fields {unknown}; known: {sorted(known)}")
    return cls(log_every_steps=int(config.get("log_every_steps", 200)), **m)

  def step_monitors(self) -> StepMonitors:
    return StepMonitors(auc_bins=int(self.streaming_auc_bins))

  def guard_options(self) -> GuardOptions:
    return GuardOptions(metrics=("loss", "dense_grad_norm", "grad_norm/embedding"),
                        spike_factor=float(self.spike_factor) or None,
                        warmup_steps=int(self.spike_warmup_steps),
                        max_rollbacks=int(self.max_rollbacks))


def collective_bytes_per_step(compiled) -> tuple[int | None, str]:
  """(bytes, source) of the compiled step's collectives, via jaxrec.comm.accounting."""
  if compiled is None:
    return None, "absent: no compiled step"
  from jaxrec.comm.accounting import collective_bytes
  return int(collective_bytes(compiled)["total"]), "jaxrec.comm.accounting"


class Monitor:
  """See the module docstring.

  Args:
    options: MonitorOptions.
    workdir: where metrics.jsonl and tensorboard/ go (None: printed lines only).
    total_steps, batch_size: for samples/s and the ETA.
    compiled: the compiled train step (collective bytes, memory analysis).
    column_tables: [num_columns] table index per ID column (hot-row share).
    checkpointer: the run's Checkpointer, or None; "rollback" needs one.
    say: prints a progress line.
  """

  def __init__(self, options: MonitorOptions, *, workdir: str | None, total_steps: int,
               batch_size: int, compiled=None, column_tables=None, checkpointer=None,
               say: Callable[[str], None] = print):
    self.options = o = options
    self.total_steps = int(total_steps)
    self.batch_size = int(batch_size)
    self.compiled = compiled
    self.column_tables = None if column_tables is None else np.asarray(column_tables)
    self._say = say
    self.action = o.anomaly_action
    if self.action == "rollback" and checkpointer is None:
      say("monitor: anomaly_action 'rollback' needs checkpoints (a --workdir and "
          "config.checkpoint.enabled); stopping on an anomaly instead")
      self.action = "stop"
    self.guard = AnomalyGuard(checkpointer if self.action == "rollback" else None,
                              o.guard_options())
    writers = []
    if workdir and jax.process_index() == 0:
      writers.append(JsonlWriter(workdir))
      if o.tensorboard:
        writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
    self.writers = Writers(writers)
    self.collective_bytes, self.collective_source = collective_bytes_per_step(compiled)
    self.anomalies: list[dict] = []
    self.last_record: dict = {}
    self._pending: list[tuple[int, dict, dict]] = []  # (step, data position, device scalars)
    self._reset_window(step=None)

  # ---- the loop's calls ----------------------------------------------------------------------

  def timed(self, batches: Iterable) -> Iterator:
    """``batches``, timing how long each ``next()`` waits (the input part of the step)."""
    it = iter(batches)
    while True:
      t = time.perf_counter()
      try:
        b = next(it)
      except StopIteration:
        return
      self._input_wait += time.perf_counter() - t
      yield b

  def after_step(self, step: int, metrics: dict, batch: dict | None, data_position,
                 *, save_due: bool = False, last: bool = False) -> Action:
    """Call after every step with its (device) metrics and batch and the data position after
    it. ``save_due``: a snapshot of this step is about to be saved (checks first). ``last``:
    the run's final step. Returns the anomaly action ("continue" or "rollback"; "stop" raises).
    """
    if self._window_start is None:
      self._window_start = step - 1
    keep = {k: v for k, v in metrics.items()
            if k in ("loss", "dense_grad_norm", "auc_hist") or k in _WINDOW_SUMS
            or k.startswith("grad_norm/")}
    self._pending.append((step, data_position, keep))
    log_due = step % self.options.log_every_steps == 0 or last
    if not (log_due or save_due or last or step % self.options.check_every_steps == 0):
      return Action("continue")
    action = self._check()
    if action.kind == "rollback":
      self._reset_window(step=None)
      return action
    if log_due:
      self._log(step, metrics, batch)
    return Action("continue")

  def event(self, step: int, message: str, **fields):
    """A one-off record (rollbacks, warnings) in the JSONL log and as TensorBoard text."""
    self.writers.write(step, event=message, **fields)

  def summary(self) -> dict:
    """The fields the run's final summary gains."""
    mem = memory_in_use(compiled=self.compiled)
    return {"peak_memory_bytes": mem["memory/peak_bytes"],
            "peak_memory_source": mem["memory/source"],
            "step_memory_bytes": mem["memory/step_footprint_bytes"],
            "collective_bytes_per_step": self.collective_bytes,
            "anomalous_steps": sum(a["steps"] for a in self.anomalies)}

  def write(self, step: int, **record):
    self.writers.write(step, **record)

  def close(self):
    self.writers.close()

  # ---- inside ----------------------------------------------------------------------------------

  def _reset_window(self, step):
    self._t_last = time.perf_counter()
    self._window_start = step
    self._input_wait = self._device_wait = 0.0
    self._losses: list[float] = []
    self._sums: dict[str, float] = {}
    self._hist = None
    self._window_anomalies = 0
    self._pending.clear()

  def _check(self) -> Action:
    """Fetches the pending steps' scalars and looks for the first anomaly among them."""
    t = time.perf_counter()
    fetched = jax.device_get([v for _, _, v in self._pending])
    self._device_wait += time.perf_counter() - t
    pending, self._pending = self._pending, []
    first, n = None, 0
    for (step, position, _), vals in zip(pending, fetched):
      self._losses.append(float(vals["loss"]))
      for k in _WINDOW_SUMS:
        if k in vals:
          self._sums[k] = self._sums.get(k, 0.0) + float(vals[k])
      if "auc_hist" in vals:
        h = np.asarray(vals["auc_hist"], np.int64)
        self._hist = h if self._hist is None else self._hist + h
      reason = self.guard.check(step, vals)
      if reason is None and float(vals.get("nonfinite", 0)) > 0:
        reason = f"step {step}: {int(vals['nonfinite'])} non-finite loss/gradient values"
      if reason is None:
        continue
      n += 1
      if first is None:
        first = (step, position, reason)
      if self.action == "rollback":
        break                        # the steps after it are discarded anyway
    if first is None:
      return Action("continue")
    step, position, reason = first
    self._window_anomalies += n
    self.anomalies.append({"step": step, "reason": reason, "steps": n})
    self.event(step, "anomaly", reason=reason, action=self.action, anomalous_steps=n,
               checked_through_step=pending[-1][0])
    if self.action == "log":
      if self._window_anomalies == n:          # one printed line per log window at most
        self._say(f"monitor: anomaly at {reason} (action 'log': training goes on; "
                  f"{n} anomalous steps in this check)")
      return Action("continue")
    if self.action == "stop":
      self.writers.close()
      raise AnomalyStop(f"training stopped at {reason} (config.monitor.anomaly_action='stop')")
    act = self.guard.decide(reason, step, position)
    if act.kind == "abort":
      self.writers.close()
      raise AnomalyStop(f"training stopped: {act.reason}")
    return act

  def _log(self, step: int, metrics: dict, batch: dict | None):
    t = time.perf_counter()
    latest = jax.device_get({k: v for k, v in metrics.items() if k != "auc_hist"})
    now = time.perf_counter()
    self._device_wait += now - t
    n = max(step - (self._window_start or 0), 1)
    wall = max(now - self._t_last, 1e-9)
    wait_in, wait_dev = self._input_wait, self._device_wait
    rec: dict = {}
    for k, v in latest.items():
      if np.ndim(v) == 0:
        rec[k] = float(v)
    rec.update(self._sums)
    rec["loss"] = float(np.mean(self._losses)) if self._losses else float("nan")
    rec["anomalies"] = self._window_anomalies
    if self._hist is not None:
      rec["train_auc"] = auc_lib.binned_auc(self._hist)
    rec["samples_per_s"] = n * self.batch_size / wall
    rec["time/step_ms"] = 1e3 * wall / n
    rec["time/input_wait_ms"] = 1e3 * wait_in / n
    rec["time/device_wait_ms"] = 1e3 * wait_dev / n
    rec["time/host_ms"] = 1e3 * max(wall - wait_in - wait_dev, 0.0) / n
    rec["time/input_wait_frac"] = wait_in / wall
    if batch is not None and self.column_tables is not None and all(
        getattr(batch[k], "is_fully_addressable", True) for k in ("ids", "mask")):
      rec["hot_row_share"] = hot_row_share(np.asarray(batch["ids"]), np.asarray(batch["mask"]),
                                           self.column_tables, self.options.hot_row_fraction)
    rec["collective_bytes_per_step"] = self.collective_bytes
    rec.update(memory_in_use(compiled=self.compiled))
    self.writers.write(step, **rec)
    self.last_record = rec
    eta = (self.total_steps - step) * self.batch_size / max(rec["samples_per_s"], 1e-9)
    auc = f"  train AUC {rec['train_auc']:.4f}" if "train_auc" in rec else ""
    self._say(f"step {step:>6,}/{self.total_steps:,}  loss {rec['loss']:.4f}{auc}  "
              f"{rec['samples_per_s']:>9,.0f} samples/s  (input wait "
              f"{100 * rec['time/input_wait_frac']:.0f}%)  ETA {_fmt_time(eta)}")
    self._reset_window(step)


def _fmt_time(s: float) -> str:
  s = int(max(s, 0)) if math.isfinite(s) else 0
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
