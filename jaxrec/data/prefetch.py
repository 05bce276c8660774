"""Background prefetching: host batches are made and put on devices while the step runs."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

_END = object()


class Prefetcher:
  """Runs ``transform(item)`` for each item of ``source`` in a thread, ``depth`` ahead.

  Exceptions raised by the source or the transform are re-raised in the consumer, so a bad row
  in a reader stops training with the reader's own error.
  """

  def __init__(self, source: Iterable, transform: Callable = lambda x: x, depth: int = 3):
    self._q: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(iter(source), transform),
                                    daemon=True, name="jaxrec-prefetch")
    self._thread.start()

  def _run(self, it: Iterator, transform: Callable):
    try:
      for item in it:
        if self._stop.is_set():
          return
        self._put(transform(item))
      self._put(_END)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      self._put(e)

  def _put(self, item):
    while not self._stop.is_set():
      try:
        self._q.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    item = self._q.get()
    if item is _END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
