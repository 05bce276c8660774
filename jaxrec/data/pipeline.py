"""The training input pipeline over a feature store: Grain, block shuffling, exact resume.

Example order. An epoch is a permutation of the store's rows built so that it can be read a
block (one compressed chunk of every column, ``chunk_rows`` rows) at a time:

  1. the blocks are put in a random order (seeded by ``(seed, epoch)``);
  2. consecutive runs of ``window_blocks`` blocks form windows, and the rows inside each window
     are permuted (seeded by ``(seed, epoch, window)``);
  3. the epoch order is the concatenation of the windows; process ``p`` of ``P`` takes the
     contiguous slice ``[p * N // P, (p + 1) * N // P)`` of it and cuts it into batches.

So every example appears exactly once per epoch across processes, each process decodes only
the windows its slice touches (its own, plus at most one it shares at each end), and a batch
mixes rows from ``window_blocks`` blocks far apart in the store. ``window_blocks >=
len(blocks)`` gives a uniform shuffle of the whole store; ``shuffle=False`` reads in store order.

Grain. Batch ``j`` of a process is a pure function of ``j`` (:class:`StoreBatches` is a
``grain.MapDataset``), so Grain's threaded prefetching reads batches ahead in parallel and its
iterator state, ``{"next_index": j}``, is an exact position. :class:`StorePipeline` keeps the
index of the next batch handed to the *consumer*, so batches prefetched but not trained on are
produced again after a restore, and nothing is skipped or repeated.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
import threading
from typing import Callable, Iterator

import grain
import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.data.prefetch import Prefetcher
from jaxrec.data.store import StoreSnapshot, take

# Fields of the pipeline state that must match on restore (the position means nothing else).
_STATE_KEYS = ("store_version", "batch_size", "shuffle", "seed", "window_blocks",
               "process_index", "process_count", "drop_remainder")


class _EpochPlan:
  """The block order and window boundaries of one epoch."""

  def __init__(self, snapshot: StoreSnapshot, epoch: int, shuffle: bool, seed: int,
               window_blocks: int):
    nb = len(snapshot.blocks)
    order = (np.random.default_rng([seed, 0x5EED, epoch]).permutation(nb) if shuffle
             else np.arange(nb))
    sizes = np.array([snapshot.blocks[b].rows for b in order], np.int64)
    self.order = order
    self.windows = [order[i:i + window_blocks] for i in range(0, nb, window_blocks)]
    rows = np.array([sizes[i:i + window_blocks].sum() for i in range(0, nb, window_blocks)],
                    np.int64)
    self.window_start = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)


class StoreBatches(grain.MapDataset):
  """Batch ``j`` of one process's share of a store snapshot, as a pure function of ``j``.

  Element ``j`` is batch ``j % batches_per_epoch`` of epoch ``j // batches_per_epoch``. With
  ``drop_remainder`` every process has ``(N // P) // batch_size`` batches an epoch (equal step
  counts on every host); without it the last batch of a process's slice may be smaller, so
  every example is produced (evaluation, or checking coverage).
  """

  def __init__(self, snapshot: StoreSnapshot, batch_size: int, *, shuffle: bool = True,
               seed: int = 0, window_blocks: int = 8, process_index: int = 0,
               process_count: int = 1, num_epochs: int | None = None,
               drop_remainder: bool = True, cached_windows: int = 3):
    super().__init__()
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window_blocks < 1:
      raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    self.snapshot = snapshot
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.seed = seed
    self.window_blocks = window_blocks
    self.process_index = process_index
    self.process_count = process_count
    self.num_epochs = num_epochs
    self.drop_remainder = drop_remainder
    n = snapshot.num_rows
    self.lo = process_index * n // process_count
    self.hi = (process_index + 1) * n // process_count
    if drop_remainder:
      self.batches_per_epoch = (n // process_count) // batch_size
    else:
      self.batches_per_epoch = -(-(self.hi - self.lo) // batch_size)
    if self.batches_per_epoch < 1:
      raise ValueError(f"store version {snapshot.version} has {n} rows: less than one batch of "
                       f"{batch_size} for each of {process_count} process(es)")
    self._plans: collections.OrderedDict = collections.OrderedDict()
    self._windows: collections.OrderedDict = collections.OrderedDict()
    self._perms: collections.OrderedDict = collections.OrderedDict()
    self._cached_windows = cached_windows
    self._lock = threading.Lock()

  def __len__(self) -> int:
    if self.num_epochs is None:
      return sys.maxsize
    return self.num_epochs * self.batches_per_epoch

  def __str__(self) -> str:
    return (f"StoreBatches(version={self.snapshot.version}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, process={self.process_index}/{self.process_count})")

  # ---- order ----

  def _plan(self, epoch: int) -> _EpochPlan:
    with self._lock:
      plan = self._plans.get(epoch)
      if plan is None:
        plan = _EpochPlan(self.snapshot, epoch, self.shuffle, self.seed, self.window_blocks)
        self._plans[epoch] = plan
        while len(self._plans) > 2:
          self._plans.popitem(last=False)
      return plan

  def _window_perm(self, epoch: int, w: int, rows: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(rows)
    key = (epoch, w)
    with self._lock:  # every batch of a window needs it: make it once
      perm = self._perms.get(key)
      if perm is not None:
        self._perms.move_to_end(key)
        return perm
    perm = np.random.default_rng([self.seed, 0x3A11, epoch, w]).permutation(rows)
    with self._lock:
      self._perms[key] = perm
      while len(self._perms) > 2 * self._cached_windows:
        self._perms.popitem(last=False)
    return perm

  def _positions(self, j: int) -> tuple[int, np.ndarray]:
    """(epoch, epoch-order positions of batch j)."""
    if j < 0 or (self.num_epochs is not None and j >= len(self)):
      raise IndexError(f"batch {j} is outside [0, {len(self)})")
    epoch, k = divmod(j, self.batches_per_epoch)
    start = self.lo + k * self.batch_size
    return epoch, np.arange(start, min(start + self.batch_size, self.hi), dtype=np.int64)

  def _by_window(self, j: int):
    """Yields (epoch, window, rows within the window) for the rows of batch j, in order."""
    epoch, q = self._positions(j)
    plan = self._plan(epoch)
    w = np.searchsorted(plan.window_start, q, "right") - 1
    for wi in np.unique(w):
      sel = w == wi
      rows = int(plan.window_start[wi + 1] - plan.window_start[wi])
      yield epoch, int(wi), self._window_perm(epoch, int(wi), rows)[q[sel] - plan.window_start[wi]]

  def row_ids(self, j: int) -> np.ndarray:
    """Global store row of each example of batch ``j``, in batch order."""
    out = []
    for epoch, w, local in self._by_window(j):
      blocks = self._plan(epoch).windows[w]
      sizes = np.array([self.snapshot.blocks[b].rows for b in blocks], np.int64)
      starts = np.concatenate([[0], np.cumsum(sizes)])
      k = np.searchsorted(starts, local, "right") - 1
      row0 = np.array([self.snapshot.blocks[b].row0 for b in blocks], np.int64)
      out.append(row0[k] + local - starts[k])
    return np.concatenate(out)

  # ---- data ----

  def _window(self, epoch: int, w: int) -> Batch:
    """The decoded rows of a window (in block order), read once and shared between threads."""
    key = (epoch, w)
    with self._lock:
      fut = self._windows.get(key)
      owner = fut is None
      if owner:
        fut = concurrent.futures.Future()
        self._windows[key] = fut
        while len(self._windows) > self._cached_windows:
          self._windows.popitem(last=False)
      else:
        self._windows.move_to_end(key)
    if owner:
      try:
        parts = self.snapshot.read_blocks(self._plan(epoch).windows[w].tolist())
        fut.set_result(Batch.concat(parts) if len(parts) > 1 else parts[0])
      except BaseException as e:
        with self._lock:
          self._windows.pop(key, None)
        fut.set_exception(e)
    return fut.result()

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    parts = [take(self._window(epoch, w), local) for epoch, w, local in self._by_window(j)]
    return parts[0] if len(parts) == 1 else Batch.concat(parts)


def _default_process(process_index, process_count) -> tuple[int, int]:
  if process_index is not None and process_count is not None:
    return process_index, process_count
  import jax  # only when the caller leaves it to us: the reader itself needs no JAX
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


class StorePipeline:
  """Host batches from a store snapshot, read ahead by Grain threads, with an exact position.

  Args:
    snapshot: the store version to read (``FeatureStore(path).open()``); pinned for the run.
    batch_size: examples per batch on this process.
    shuffle, seed, window_blocks: the example order (module docstring).
    process_index, process_count: this process's share; default ``jax.process_index()`` and
      ``jax.process_count()``.
    num_epochs: None repeats forever.
    drop_remainder: equal, full batches on every process (training); False yields every
      example, the last batch of a slice possibly smaller.
    transform: applied to each host Batch in the reading threads (e.g. an entity-feature join).
    read_threads, prefetch_batches: Grain ``ReadOptions``.
  """

  def __init__(self, snapshot: StoreSnapshot, batch_size: int, *, shuffle: bool = True,
               seed: int = 0, window_blocks: int = 8, process_index: int | None = None,
               process_count: int | None = None, num_epochs: int | None = None,
               drop_remainder: bool = True, transform: Callable[[Batch], Batch] | None = None,
               read_threads: int = 2, prefetch_batches: int = 4):
    process_index, process_count = _default_process(process_index, process_count)
    self.dataset = StoreBatches(snapshot, batch_size, shuffle=shuffle, seed=seed,
                                window_blocks=window_blocks, process_index=process_index,
                                process_count=process_count, num_epochs=num_epochs,
                                drop_remainder=drop_remainder,
                                cached_windows=max(3, read_threads + 2))
    ds = self.dataset.map(transform) if transform is not None else self.dataset
    self._iter = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=prefetch_batches)).__iter__()
    self._next = 0
    self._config = {"store_version": snapshot.version, "batch_size": batch_size,
                    "shuffle": shuffle, "seed": seed, "window_blocks": window_blocks,
                    "process_index": process_index, "process_count": process_count,
                    "drop_remainder": drop_remainder}

  @property
  def batches_per_epoch(self) -> int:
    return self.dataset.batches_per_epoch

  def __iter__(self) -> StorePipeline:
    return self

  def __next__(self) -> Batch:
    batch = next(self._iter)
    self._next += 1
    return batch

  def get_state(self) -> dict:
    """A small JSON-able dict: the index of the next batch and what it is an index into."""
    return dict(self._config, next_index=self._next, epoch=self._next // self.batches_per_epoch)

  def set_state(self, state: dict):
    """Resumes at ``state["next_index"]``; the rest of ``state`` must match this pipeline."""
    for k in _STATE_KEYS:
      if k in state and state[k] != self._config[k]:
        raise ValueError(f"pipeline state was saved with {k}={state[k]!r} but this pipeline has "
                         f"{k}={self._config[k]!r}; open store version {state.get('store_version')}"
                         " with the same settings to resume exactly")
    self._iter.set_state({"next_index": int(state["next_index"])})
    self._next = int(state["next_index"])

  def device_batches(self, to_device: Callable, depth: int = 2) -> DeviceIterator:
    """Batches put on devices ``depth`` ahead in a background thread (input overlaps compute).

    ``to_device`` maps a host Batch to device arrays, e.g. ``lambda b: jax.device_put(
    builders.device_batch(b), sharding)`` or, on several hosts,
    ``jax.make_array_from_process_local_data``.
    """
    return DeviceIterator(self, to_device, depth)


class DeviceIterator:
  """Device batches from a :class:`StorePipeline`; ``get_state`` counts consumed batches only."""

  def __init__(self, pipeline: StorePipeline, to_device: Callable, depth: int = 2):
    self.pipeline = pipeline
    self._consumed = pipeline.get_state()["next_index"]
    self._prefetch = Prefetcher(pipeline, to_device, depth=depth)

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    item = next(self._prefetch)
    self._consumed += 1
    return item

  def get_state(self) -> dict:
    state = self.pipeline.get_state()
    state["next_index"] = self._consumed
    state["epoch"] = self._consumed // self.pipeline.batches_per_epoch
    return state

  def close(self):
    self._prefetch.close()
