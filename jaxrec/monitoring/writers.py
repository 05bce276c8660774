"""Where monitor records go: ``workdir/metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import math
import numbers
import os


class JsonlWriter:
  """Appends one JSON object per line to ``workdir/metrics.jsonl`` (nothing without a
  workdir)."""

  def __init__(self, workdir: str | None):
    self._f = None
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      self._f = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

  def write(self, **record):
    if self._f:
      self._f.write(json.dumps(record, default=float) + "\n")

  def close(self):
    if self._f:
      self._f.close()
      self._f = None


class TensorBoardWriter:
  """Scalars of each record as TensorBoard summaries in ``logdir`` (tensorboardX's event-file
  writer: no TensorFlow needed). The record's ``step`` is the x axis; strings become text
  summaries; None and non-finite values are skipped (TensorBoard plots NaN as a gap anyway,
  and the JSONL log keeps them)."""

  def __init__(self, logdir: str, flush_secs: int = 30):
    try:
      from tensorboardX import SummaryWriter
    except ImportError as e:
      raise ImportError("config.monitor.tensorboard=True needs the tensorboardX package "
                        "(pip install tensorboardX), or set it False") from e
    self.logdir = logdir
    self._w = SummaryWriter(logdir, flush_secs=flush_secs)

  def write(self, step: int, **record):
    for tag, v in record.items():
      if isinstance(v, bool) or v is None:
        continue
      if isinstance(v, numbers.Number):
        if math.isfinite(float(v)):
          self._w.add_scalar(tag, float(v), int(step))
      elif isinstance(v, str):
        self._w.add_text(tag, v, int(step))

  def flush(self):
    self._w.flush()

  def close(self):
    self._w.close()


class Writers:
  """Fans one record out to every writer; ``step`` is a field of the JSONL record too."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write(self, step: int, **record):
    for w in self.writers:
      if isinstance(w, JsonlWriter):
        w.write(step=step, **record)
      else:
        w.write(step, **record)

  def close(self):
    for w in self.writers:
      w.close()
