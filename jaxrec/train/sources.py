"""Where a training run's examples come from: ``config.data.source``.

``"synthetic"``: the generator. Training reads examples [0, train_examples); evaluation the
  ``eval_examples`` after them (or from ``eval_start``); the teacher gives the Bayes AUC.

``"store"``: a feature store at ``data.store_path`` read through the StorePipeline (Grain
  threads, block shuffle with ``data.shuffle`` / ``shuffle_seed`` / ``window_blocks``, this
  process's slice of every batch). ``train_examples`` 0 means one pass over the store. The
  pipeline's state (store version, order settings, next batch) is saved in the checkpoint's
  data position, so a resumed run reads exactly the batches an uninterrupted one would, and a
  resume against other settings or another store version is refused.
  Evaluation reads a second store, ``data.eval_store_path``, in store order (its first
  ``eval_examples`` rows; 0: all, in whole eval batches). A held-out store rather than a row
  range of the training store because that is how click models are judged (train on days
  0..k, test on day k+1: ingest the later day into its own store, ``--start=`` for synthetic
  data), and because the training order shuffles whole blocks of the snapshot, so a range
  would have to be carved out of the block plan. A store ingested from the generator holds
  its teacher's probability (extra column ``teacher_prob``), so the Bayes AUC is still
  reported; for Criteo data it is None. Tables are sized from ``data.preset``'s vocabularies
  when it names one with the store's number of sparse features, else ``embedding.max_rows``.

``"criteo"``: Criteo TSV files, ``data.train_files`` and ``data.eval_files`` (comma-separated
  paths or globs, gzip allowed), read in order by CriteoReader; training wraps around at the
  end of the files; resume re-reads and drops the rows already trained on.

Every source yields host batches of the global batch size on one process. In multi-process
runs the loop passes ``rows``, this process's rows of each global batch: the generator makes
only those examples, the store's pipeline reads this process's own slice of the snapshot (its
``batch_size / process_count`` rows), Criteo files are read whole and sliced.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import numpy as np

from jaxrec.data import criteo
from jaxrec.data.batch import Batch, SparseLayout
from jaxrec.distributed import data as dist_data

SOURCES = ("synthetic", "store", "criteo")
TEACHER_COLUMN = "teacher_prob"


def slice_rows(b: Batch, rows: slice | None) -> Batch:
  """The examples ``rows`` of a host batch (all of them for None)."""
  if rows is None:
    return b
  return dataclasses.replace(b, **{f.name: getattr(b, f.name)[rows]
                                   for f in dataclasses.fields(b)
                                   if isinstance(getattr(b, f.name), np.ndarray)})


class TrainData:
  """The examples of one run. ``pos`` counts examples consumed (``step * batch_size``)."""

  name: str
  layout: SparseLayout
  cardinalities: tuple[int, ...] | None
  train_examples: int

  def example(self, batch_size: int) -> Batch:
    """A batch with the shapes training takes (for compiling the step)."""
    raise NotImplementedError

  def train_batches(self, start: int, stop: int, rows: slice | None = None
                    ) -> Iterator[Batch]:
    """Host batches covering examples [start, stop) of the training order (``rows``: this
    process's rows of each, None: all)."""
    raise NotImplementedError

  def position(self, pos: int) -> dict:
    """The checkpoint's data position after ``pos`` examples."""
    return {"example": int(pos)}

  def resume_from(self, data_position: dict | None):
    """Checks a restored data position against this source (before train_batches)."""

  def eval_batches(self, batch_size: int, rows: slice | None = None) -> Iterator[Batch]:
    raise NotImplementedError

  def eval_teacher(self, n: int) -> np.ndarray | None:
    """The teacher's probabilities of the first ``n`` evaluation examples, or None."""
    return None


class SyntheticData(TrainData):

  def __init__(self, d):
    from jaxrec.train import builders
    self.name = "synthetic"
    self.stream = builders.synthetic_stream(d)
    self.layout = self.stream.layout
    self.cardinalities = self.stream.config.cardinalities
    self.train_examples = int(d.train_examples)
    self._batch = int(d.batch_size)
    self._eval_start = int(d.get("eval_start") or d.train_examples)
    self._eval_n = int(d.eval_examples)

  def example(self, batch_size):
    return self.stream.examples(0, batch_size)

  def train_batches(self, start, stop, rows=None):
    if rows is None:
      return self.stream.batches(self._batch, start, stop)
    return dist_data.process_batches(self.stream.examples, self._batch, start, stop, rows)

  def eval_batches(self, batch_size, rows=None):
    n = self._eval_n // batch_size * batch_size
    if rows is None:
      return self.stream.batches(batch_size, self._eval_start, self._eval_start + n)
    return dist_data.process_batches(self.stream.examples, batch_size, self._eval_start,
                                     self._eval_start + n, rows)

  def eval_teacher(self, n):
    return self.stream.teacher_probability(self._eval_start, self._eval_start + n)


def _preset_cardinalities(d, num_features: int) -> tuple[int, ...] | None:
  if not d.get("preset"):
    return None
  from jaxrec.train import builders
  cards = builders.synthetic_stream(d).config.cardinalities
  return tuple(cards) if len(cards) == num_features else None


class StoreData(TrainData):

  def __init__(self, d):
    import jax
    from jaxrec.data.store import FeatureStore
    if not d.get("store_path"):
      raise ValueError("config.data.source='store' needs config.data.store_path (make one with "
                       "`python -m jaxrec.data.ingest --store=...`)")
    if not d.get("eval_store_path"):
      raise ValueError("config.data.source='store' needs config.data.eval_store_path: a second "
                       "store of held-out examples (e.g. the next day)")
    version = d.get("store_version")
    self.snapshot = FeatureStore(d.store_path).open(None if version is None else int(version))
    self.eval_snapshot = FeatureStore(d.eval_store_path).open()
    schema = self.snapshot.schema
    self.name = f"store {d.store_path} (version {self.snapshot.version})"
    for what, snap in (("eval_store_path", self.eval_snapshot), ("store_path", self.snapshot)):
      if snap.schema.num_dense != int(d.num_dense):
        raise ValueError(f"config.data.{what}={snap.store.path!r} has {snap.schema.num_dense} "
                         f"dense features but config.data.num_dense={d.num_dense}")
    # Extra columns may differ (a teacher in one store only); the model inputs may not.
    other = dataclasses.replace(self.eval_snapshot.schema, extra_names=schema.extra_names)
    diff = schema.difference(other)
    if diff:
      raise ValueError(f"config.data.eval_store_path={d.eval_store_path!r} does not have the "
                       f"training store's features: {diff}")
    self.layout = schema.layout
    self.cardinalities = _preset_cardinalities(d, self.layout.num_features)
    self._batch = int(d.batch_size)
    self._process_count = jax.process_count()
    self._process_index = jax.process_index()
    if self._batch % self._process_count:
      raise ValueError(f"config.data.batch_size={self._batch} does not split evenly over "
                       f"{self._process_count} processes")
    self._local_batch = self._batch // self._process_count
    self._order = dict(shuffle=bool(d.get("shuffle", True)), seed=int(d.get("shuffle_seed", 0)),
                       window_blocks=int(d.get("window_blocks", 8)))
    self._threads = int(d.get("read_threads", 2))
    epoch = self.snapshot.num_rows // self._process_count // self._local_batch * self._batch
    self.train_examples = int(d.train_examples) or epoch
    self._eval_n = int(d.eval_examples)
    self._eval_rows(int(d.eval_batch_size))  # fail now, not after training
    self._saved: dict | None = None

  def _pipeline(self):
    from jaxrec.data.pipeline import StorePipeline
    return StorePipeline(self.snapshot, self._local_batch, process_index=self._process_index,
                         process_count=self._process_count, read_threads=self._threads,
                         **self._order)

  def example(self, batch_size):
    return self.snapshot.read(0, min(batch_size, self.snapshot.num_rows))

  def position(self, pos):
    state = dict(self._pipeline_config, next_index=int(pos) // self._batch)
    return {"example": int(pos), "store": state}

  @property
  def _pipeline_config(self) -> dict:
    return {"store_version": self.snapshot.version, "batch_size": self._local_batch,
            "shuffle": self._order["shuffle"], "seed": self._order["seed"],
            "window_blocks": self._order["window_blocks"],
            "process_index": self._process_index, "process_count": self._process_count,
            "drop_remainder": True}

  def resume_from(self, data_position):
    self._saved = (data_position or {}).get("store")

  def train_batches(self, start, stop, rows=None):
    del rows  # the pipeline already reads this process's own slice of the snapshot
    pipe = self._pipeline()
    # Step k reads batch k of the pipeline: the example count is the pipeline's position.
    pipe.set_state(dict(self._saved or {}, next_index=start // self._batch))
    return itertools.islice(pipe, (stop - start) // self._batch)

  def eval_batches(self, batch_size, rows=None):
    n = self._eval_rows(batch_size)
    it = itertools.islice(self.eval_snapshot.iter_batches(batch_size, drop_remainder=True),
                          n // batch_size)
    return (slice_rows(b, rows) for b in it)

  def _eval_rows(self, batch_size: int) -> int:
    rows = self.eval_snapshot.num_rows
    n = min(self._eval_n, rows) if self._eval_n else rows
    if n < batch_size:
      raise ValueError(f"eval store {self.eval_snapshot.store.path!r} gives {n} examples: less "
                       f"than one eval batch ({batch_size})")
    return n // batch_size * batch_size

  def eval_teacher(self, n):
    if TEACHER_COLUMN not in self.eval_snapshot.schema.extra_names:
      return None
    return self.eval_snapshot.read_extra(TEACHER_COLUMN, 0, n)


class CriteoData(TrainData):

  def __init__(self, d):
    from jaxrec.data.ingest import expand_inputs
    for k in ("train_files", "eval_files"):
      if not d.get(k):
        raise ValueError(f"config.data.source='criteo' needs config.data.{k} (comma-separated "
                         "Criteo TSV paths or globs)")
    self.train_files = expand_inputs(d.train_files)
    self.eval_files = expand_inputs(d.eval_files)
    self.name = f"criteo files {','.join(self.train_files)}"
    self.layout = criteo.CRITEO_LAYOUT
    self.cardinalities = _preset_cardinalities(d, self.layout.num_features)
    self._batch = int(d.batch_size)
    self.train_examples = int(d.train_examples)
    if self.train_examples < self._batch:
      raise ValueError("config.data.source='criteo' needs config.data.train_examples (the files "
                       "are streamed; their length is not known in advance)")
    self._eval_n = int(d.eval_examples)
    self._bad_rows = d.get("bad_rows", "error")

  def _reader(self, files, batch_size):
    return criteo.CriteoReader(files, batch_size, bad_rows=self._bad_rows, drop_remainder=True)

  def example(self, batch_size):
    return next(iter(self._reader(self.train_files, batch_size)))

  def train_batches(self, start, stop, rows=None):
    def passes():
      while True:
        got = False
        for b in self._reader(self.train_files, self._batch):
          got = True
          yield b
        if not got:
          raise ValueError(f"Criteo files {self.train_files} hold less than one batch "
                           f"({self._batch} rows)")
    skip = start // self._batch
    it = itertools.islice(passes(), skip, skip + (stop - start) // self._batch)
    return (slice_rows(b, rows) for b in it)

  def eval_batches(self, batch_size, rows=None):
    it = iter(self._reader(self.eval_files, batch_size))
    it = itertools.islice(it, self._eval_n // batch_size) if self._eval_n else it
    return (slice_rows(b, rows) for b in it)


def open_data(config) -> TrainData:
  d = config.data
  kinds = {"synthetic": SyntheticData, "store": StoreData, "criteo": CriteoData}
  if d.source not in kinds:
    raise ValueError(f"config.data.source={d.source!r}; expected one of {SOURCES}")
  return kinds[d.source](d)
