"""Per-process data: each process makes only its slice of the global batch; results gathered.

With one process these reduce to ``jax.device_put`` and ``np.asarray``, so the single-process
path is unchanged.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding


def is_main_process() -> bool:
  """Only process 0 prints progress and writes metrics and summaries."""
  return jax.process_index() == 0


def process_rows(sharding: Sharding, global_size: int) -> slice:
  """The rows [lo, hi) of a global batch of ``global_size`` that this process's devices hold.

  The batch is split along axis 0 over the mesh; with the ("host", "local") mesh each process
  holds one contiguous block, which is what lets it read only its own examples.
  """
  idx = sharding.addressable_devices_indices_map((global_size,))
  spans = sorted({(s[0].start or 0, global_size if s[0].stop is None else s[0].stop)
                  for s in idx.values()})
  lo, hi = spans[0][0], spans[0][1]
  for a, b in spans[1:]:
    if a != hi:
      raise ValueError(f"process {jax.process_index()} holds rows {spans} of a batch of "
                       f"{global_size}: not one contiguous block. Order the mesh so each "
                       "process's devices are adjacent (host axis first).")
    hi = b
  return slice(lo, hi)


def to_global(local: dict, sharding: Sharding, global_size: int) -> dict:
  """Host arrays of this process's rows -> global jax.Arrays of ``global_size`` rows."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, (global_size,) + tuple(np.shape(x)[1:])), local)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) array as one numpy array on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_batches(examples, batch_size: int, start: int, stop: int, rows: slice):
  """This process's rows of consecutive global batches of ``batch_size`` in [start, stop).

  ``examples(a, b)`` returns examples [a, b) of the stream; ``rows`` comes from process_rows.
  With one process this is the plain batch iterator.
  """
  pos = start
  while pos + batch_size <= stop:
    yield examples(pos + rows.start, pos + rows.stop)
    pos += batch_size
