"""The training-data feature store: examples as columnar zarr3 arrays in TensorStore.

Layout under the store root (a local path, or any TensorStore kvstore URL such as
``gs://bucket/store/``)::

  HEAD                                  the current commit record (JSON, below)
  segments/<segment id>/                one committed append ("a day of data")
    _STARTED                            who wrote it and when (for garbage collection)
    labels/                             zarr3 float32 [rows] (or [rows, num_tasks])
    dense/                              zarr3 float32 [rows, num_dense]
    sparse/<feature>/values/            zarr3 uint64 [ids]     the feature's IDs, row after row
    sparse/<feature>/offsets/           zarr3 int64 [rows + 1] row r owns values[o[r]:o[r+1]]
    sparse/<feature>/block_offsets/     zarr3 int64 [blocks + 1] = offsets[::chunk_rows] + [end]
    extra/<name>/                       zarr3 float32 [rows], optional per-example columns that
                                        are not model inputs (e.g. the synthetic teacher's
                                        probability, so evaluation can report the Bayes AUC)

Every array is chunked along rows (``chunk_rows`` rows a chunk) and zstd-compressed, so a block
of ``chunk_rows`` rows is one chunk of each array: the unit of reading and of shuffling.

Atomic appends. An append writes a new segment that no reader knows about, waits until every
chunk is durable, and then commits by replacing HEAD with a compare-and-swap on its storage
generation (TensorStore's conditional write: temp file + rename on a filesystem, a generation
match on cloud buckets). HEAD lists the committed segments, each tagged with the version that
added it, so version ``v`` of the store is exactly the segments with ``version <= v`` and a
reader that read HEAD once sees one consistent version however many appends commit later. An
ingest that fails or is killed never reaches the swap: HEAD and every committed file stay
byte-for-byte as they were, and the half-written segment is an orphan that
:meth:`FeatureStore.collect_garbage` deletes. Two concurrent appenders both commit (the loser
of a swap re-reads HEAD and retries); their segments never collide (random ids).
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import threading
import time
import uuid
from collections import deque
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from jaxrec.data.batch import Batch, SparseLayout

FORMAT = "jaxrec.feature_store"
FORMAT_VERSION = 1
HEAD_KEY = "HEAD"
DEFAULT_CHUNK_ROWS = 16384
CODECS = ("zstd", "none")
BAD_ROW_POLICIES = ("error", "skip")
# Reasons a row can break the schema; keys of AppendStats.skipped_by_reason.
REASON_LABEL = "label"
REASON_DENSE = "dense"

# Arrays are created this long along rows and cut to their true length when the segment
# closes, so chunks can be written as they fill without resizing on every write.
_CAPACITY = 1 << 40
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
# Writes in flight per array before the writer waits: bounds memory while keeping disks busy.
_MAX_INFLIGHT = 4


class StoreError(Exception):
  """Base class of feature-store errors."""


class StoreNotFoundError(StoreError, FileNotFoundError):
  pass


class SchemaMismatchError(StoreError, ValueError):
  """Data (or a second schema) that does not fit the store's schema; names the feature."""


class BadRowError(StoreError, ValueError):
  """A row that breaks the schema. ``where`` names the file and line (or source and example)."""

  def __init__(self, where: str, field: str, reason: str):
    self.where, self.field, self.reason = where, field, reason
    super().__init__(f"{where}: field {field}: {reason}")


# ---- schema ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
  """Names, kinds, dtypes and max lengths of a store's columns.

  Labels are float32 (``[rows]``, or ``[rows, num_tasks]`` when num_tasks > 1), dense features
  float32, sparse features uint64 IDs with at most ``max_ids[f]`` per example. ``extra_names``
  are float32 per-example columns stored beside the examples but never fed to a model (read
  them with :meth:`StoreSnapshot.read_extra`).
  """

  dense_names: tuple[str, ...]
  sparse_names: tuple[str, ...]
  max_ids: tuple[int, ...]
  num_tasks: int = 1
  extra_names: tuple[str, ...] = ()

  def __post_init__(self):
    SparseLayout(self.sparse_names, self.max_ids)  # validates lengths, duplicates, max_ids >= 1
    names = ("label",) + self.dense_names + self.sparse_names + self.extra_names
    for n in names:
      if not _NAME_RE.fullmatch(n):
        raise ValueError(f"feature name {n!r}: use letters, digits, '_', '.' or '-' only "
                         "(names become storage paths)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f"feature names {dup} are used twice (dense, sparse, extra and 'label' "
                       "share one namespace)")
    if self.num_tasks < 1:
      raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")

  @classmethod
  def from_layout(cls, layout: SparseLayout, num_dense: int = 13,
                  dense_names: Sequence[str] | None = None, num_tasks: int = 1,
                  extra_names: Sequence[str] = ()) -> FeatureSchema:
    names = tuple(dense_names) if dense_names else tuple(f"I{i + 1}" for i in range(num_dense))
    return cls(names, tuple(layout.names), tuple(layout.max_ids), num_tasks, tuple(extra_names))

  @property
  def layout(self) -> SparseLayout:
    return SparseLayout(self.sparse_names, self.max_ids)

  @property
  def num_dense(self) -> int:
    return len(self.dense_names)

  def to_json(self) -> dict:
    label = {"name": "label", "kind": "label", "dtype": "float32",
             "shape": [] if self.num_tasks == 1 else [self.num_tasks]}
    dense = [{"name": n, "kind": "dense", "dtype": "float32"} for n in self.dense_names]
    sparse = [{"name": n, "kind": "sparse", "dtype": "uint64", "max_ids": m}
              for n, m in zip(self.sparse_names, self.max_ids)]
    extra = [{"name": n, "kind": "extra", "dtype": "float32"} for n in self.extra_names]
    return {"features": [label] + dense + sparse + extra}

  @classmethod
  def from_json(cls, d: dict) -> FeatureSchema:
    dense, sparse, max_ids, extra, num_tasks = [], [], [], [], 1
    for f in d["features"]:
      if f["kind"] == "label":
        num_tasks = int(f["shape"][0]) if f.get("shape") else 1
      elif f["kind"] == "dense":
        dense.append(f["name"])
      elif f["kind"] == "sparse":
        sparse.append(f["name"])
        max_ids.append(int(f["max_ids"]))
      elif f["kind"] == "extra":
        extra.append(f["name"])
      else:
        raise StoreError(f"schema feature {f.get('name')!r} has unknown kind {f['kind']!r}")
    return cls(tuple(dense), tuple(sparse), tuple(max_ids), num_tasks, tuple(extra))

  def difference(self, other: FeatureSchema) -> str | None:
    """The first way ``other`` differs from this schema, naming the feature; None if equal."""
    if self.num_tasks != other.num_tasks:
      return f"labels: store has {self.num_tasks} task(s), data has {other.num_tasks}"
    for kind, a, b in (("dense", self.dense_names, other.dense_names),
                       ("sparse", self.sparse_names, other.sparse_names),
                       ("extra", self.extra_names, other.extra_names)):
      for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
          return (f"{kind} feature #{i + 1}: store has {x!r}, data has {y!r} "
                  f"(store {kind} features: {list(a)})")
    for n, m, k in zip(self.sparse_names, self.max_ids, other.max_ids):
      if m != k:
        return f"sparse feature {n!r}: store allows max_ids={m}, data has max_ids={k}"
    return None


# ---- commit records ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
  """One committed append: ``rows`` examples and ``num_ids[f]`` IDs of each sparse feature."""

  id: str
  version: int
  rows: int
  num_ids: tuple[int, ...]
  source: str = ""
  committed_unix: float = 0.0

  def to_json(self) -> dict:
    return {"id": self.id, "version": self.version, "rows": self.rows,
            "num_ids": list(self.num_ids), "source": self.source,
            "committed_unix": self.committed_unix}

  @classmethod
  def from_json(cls, d: dict) -> Segment:
    return cls(d["id"], int(d["version"]), int(d["rows"]), tuple(int(x) for x in d["num_ids"]),
               d.get("source", ""), float(d.get("committed_unix", 0.0)))


@dataclasses.dataclass(frozen=True)
class Commit:
  """The content of HEAD: schema, storage parameters and the committed segments."""

  version: int
  schema: FeatureSchema
  chunk_rows: int
  codec: str
  segments: tuple[Segment, ...] = ()

  @property
  def num_rows(self) -> int:
    return sum(s.rows for s in self.segments)

  def at(self, version: int) -> Commit:
    """The store as it was right after ``version`` committed."""
    if not 0 <= version <= self.version:
      raise StoreError(f"store version {version} does not exist; committed versions are "
                       f"0..{self.version}")
    return dataclasses.replace(self, version=version,
                               segments=tuple(s for s in self.segments if s.version <= version))

  def to_json(self) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "version": self.version,
            "num_rows": self.num_rows, "schema": self.schema.to_json(),
            "storage": {"chunk_rows": self.chunk_rows, "codec": self.codec},
            "segments": [s.to_json() for s in self.segments]}

  @classmethod
  def from_json(cls, d: dict, where: str) -> Commit:
    if d.get("format") != FORMAT:
      raise StoreError(f"{where} is not a jaxrec feature store HEAD (format={d.get('format')!r})")
    if d.get("format_version") != FORMAT_VERSION:
      raise StoreError(f"{where}: format_version {d.get('format_version')} is not supported "
                       f"by this jaxrec (it reads version {FORMAT_VERSION})")
    return cls(int(d["version"]), FeatureSchema.from_json(d["schema"]),
               int(d["storage"]["chunk_rows"]), d["storage"]["codec"],
               tuple(Segment.from_json(s) for s in d["segments"]))


# ---- paths and TensorStore plumbing -----------------------------------------------------------


def _root_url(path: str) -> str:
  path = os.fspath(path)
  if "://" in path:
    return path.rstrip("/") + "/"
  return "file://" + os.path.abspath(path).rstrip("/") + "/"


def _local_dir(path: str) -> str | None:
  """The local directory behind ``path``, or None for a remote store."""
  path = os.fspath(path)
  if path.startswith("file://"):
    return path[len("file://"):].rstrip("/") or "/"
  return None if "://" in path else os.path.abspath(path)


_CONTEXT_LOCK = threading.Lock()
_CONTEXT: ts.Context | None = None


def _context() -> ts.Context:
  # One per process: chunk caching is off (readers cache decoded blocks themselves), and the
  # file driver fsyncs every write (its default), which the commit protocol relies on.
  global _CONTEXT
  with _CONTEXT_LOCK:
    if _CONTEXT is None:
      _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    return _CONTEXT


def clear_stale_lock(lock_path: str, delete: bool = False) -> bool:
  """Empties (or deletes) a TensorStore ``<key>.__lock`` file that no live writer holds.

  TensorStore's file driver writes a key by writing ``<key>.__lock`` and renaming it; it opens
  an existing lock file without truncating it, so after a writer is killed mid-write the next,
  shorter write of the same key keeps the dead writer's trailing bytes (a corrupt HEAD, or an
  OCDBT manifest that no longer opens). The driver holds an OFD write lock while writing, so a
  lock we can take belongs to a dead process. Returns True if the file was stale.
  """
  try:
    fd = os.open(lock_path, os.O_WRONLY | os.O_CLOEXEC)
  except (FileNotFoundError, NotADirectoryError):
    return False
  try:
    flock = struct.pack("@hhqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
      fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
    except OSError:
      return False  # a live writer holds it
    # A writer may have renamed this file onto its key between our open and our lock.
    try:
      on_disk = os.stat(lock_path)
    except FileNotFoundError:
      return False
    mine = os.fstat(fd)
    if (mine.st_dev, mine.st_ino) != (on_disk.st_dev, on_disk.st_ino):
      return False
    if delete:
      os.unlink(lock_path)
    elif mine.st_size:
      os.ftruncate(fd, 0)
      os.fsync(fd)
    return True
  finally:
    os.close(fd)  # also drops our lock


def _zarr_spec(url: str, dtype: str, shape: Sequence[int], chunk: Sequence[int],
               codec: str) -> dict:
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if codec == "zstd":
    codecs.append({"name": "zstd", "configuration": {"level": 3}})
  return {"driver": "zarr3", "kvstore": url,
          "metadata": {"shape": list(shape), "data_type": dtype, "codecs": codecs,
                       "chunk_grid": {"name": "regular",
                                      "configuration": {"chunk_shape": list(chunk)}},
                       "fill_value": 0}}


def _segment_arrays(schema: FeatureSchema) -> list[tuple[str, str, int]]:
  """(relative path, dtype, rank) of every array of a segment, in a fixed order."""
  out = [("labels", "float32", 1 if schema.num_tasks == 1 else 2), ("dense", "float32", 2)]
  for n in schema.sparse_names:
    out += [(f"sparse/{n}/values", "uint64", 1), (f"sparse/{n}/offsets", "int64", 1),
            (f"sparse/{n}/block_offsets", "int64", 1)]
  out += [(f"extra/{n}", "float32", 1) for n in schema.extra_names]
  return out


# ---- the store ---------------------------------------------------------------------------------


class FeatureStore:
  """A handle on a store at ``path`` (nothing is read until asked)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.url = _root_url(self.path)
    self._local = _local_dir(self.path)
    self._kv = ts.KvStore.open(self.url, context=_context()).result()

  def __repr__(self) -> str:
    return f"FeatureStore({self.path!r})"

  # ---- HEAD ----

  def _read_head(self) -> tuple[Commit | None, bytes]:
    """(commit or None if no store, storage generation of HEAD)."""
    r = self._kv.read(HEAD_KEY).result()
    if r.state != "value":
      return None, r.stamp.generation
    try:
      d = json.loads(r.value)
    except ValueError as e:
      raise StoreError(f"{self.url}{HEAD_KEY} is not valid JSON ({e}); the store is damaged")
    return Commit.from_json(d, f"{self.url}{HEAD_KEY}"), r.stamp.generation

  def exists(self) -> bool:
    return self._read_head()[0] is not None

  def head(self) -> Commit:
    commit, _ = self._read_head()
    if commit is None:
      raise StoreNotFoundError(f"no feature store at {self.path!r} (no {HEAD_KEY}); create one "
                               "with FeatureStore.create or `python -m jaxrec.data.ingest`")
    return commit

  def _swap_head(self, new: Commit, generation: bytes) -> bool:
    """Writes HEAD if it is still at ``generation``; False if someone else committed first."""
    if self._local:
      clear_stale_lock(os.path.join(self._local, HEAD_KEY + ".__lock"))
    body = json.dumps(new.to_json(), indent=1).encode()
    stamp = self._kv.write(HEAD_KEY, body, if_equal=generation).result()
    return stamp.generation != b""

  @classmethod
  def create(cls, path: str | os.PathLike, schema: FeatureSchema, *,
             chunk_rows: int = DEFAULT_CHUNK_ROWS, codec: str = "zstd",
             exist_ok: bool = False) -> FeatureStore:
    """Creates an empty store (version 0). With ``exist_ok`` an existing store with the same
    schema is fine; a different schema is an error naming the feature."""
    if chunk_rows < 1:
      raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if codec not in CODECS:
      raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    store = cls(path)
    for _ in range(100):
      head, gen = store._read_head()
      if head is not None:
        if not exist_ok:
          raise StoreError(f"a feature store already exists at {path!r} (version {head.version})")
        diff = head.schema.difference(schema)
        if diff:
          raise SchemaMismatchError(f"store {path!r} exists with another schema: {diff}")
        return store
      if store._swap_head(Commit(0, schema, chunk_rows, codec), gen):
        return store
    raise StoreError(f"could not create {path!r}: HEAD kept changing")

  def open(self, version: int | None = None) -> StoreSnapshot:
    """A read-only view of one committed version (default: the latest)."""
    head = self.head()
    return StoreSnapshot(self, head if version is None else head.at(version))

  # ---- writing ----

  def appender(self, source: str = "", bad_rows: str = "error") -> Appender:
    """An :class:`Appender` for one atomic append; use it as a context manager."""
    return Appender(self, source=source, bad_rows=bad_rows)

  def append(self, batches: Iterable[Batch], source: str = "",
             bad_rows: str = "error") -> Commit:
    """Appends every batch as one atomic commit and returns the new HEAD."""
    with self.appender(source, bad_rows) as app:
      for b in batches:
        app.write(b)
    return app.committed

  # ---- maintenance ----

  def collect_garbage(self, grace_s: float = 3600.0) -> dict:
    """Deletes segments no commit references (left by failed or killed appends) once they are
    older than ``grace_s`` (younger ones may belong to an append still running), and stale
    lock files of dead writers. Returns what was removed."""
    head = self.head()
    live = {s.id for s in head.segments}
    now = time.time()
    removed = []
    for seg_id in self._segment_ids():
      if seg_id in live:
        continue
      started = self._segment_started(seg_id)
      if started is not None and now - started < grace_s:
        continue
      self._delete_segment(seg_id)
      removed.append(seg_id)
    locks = []
    if self._local and os.path.isdir(self._local):
      for name in os.listdir(self._local):
        if name.endswith(".__lock"):
          p = os.path.join(self._local, name)
          if now - os.path.getmtime(p) >= grace_s and clear_stale_lock(p, delete=True):
            locks.append(name)
    return {"segments": removed, "lock_files": locks}

  def _segment_ids(self) -> list[str]:
    if self._local:
      d = os.path.join(self._local, "segments")
      return sorted(os.listdir(d)) if os.path.isdir(d) else []
    keys = self._kv.list(ts.KvStore.KeyRange("segments/", "segments0")).result()
    return sorted({k.decode().split("/")[1] for k in keys})

  def _segment_started(self, seg_id: str) -> float | None:
    r = self._kv.read(f"segments/{seg_id}/_STARTED").result()
    if r.state == "value":
      try:
        return float(json.loads(r.value)["started_unix"])
      except (ValueError, KeyError):
        pass
    if self._local:  # killed before the marker: fall back to the directory's age
      try:
        return os.path.getmtime(os.path.join(self._local, "segments", seg_id))
      except FileNotFoundError:
        return None
    return None

  def _delete_segment(self, seg_id: str):
    if self._local:
      shutil.rmtree(os.path.join(self._local, "segments", seg_id), ignore_errors=True)
    else:
      prefix = f"segments/{seg_id}/"
      self._kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()


# ---- writing -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowOrigin:
  """Where the rows of a written batch came from, for error messages.

  ``unit="line"``: row i is line ``first + i`` of file ``source``; ``"example"``: example
  ``first + i`` of a stream; ``"good row"``: the ``first + i``-th good row of ``source``
  (lines are unknown once a reader has skipped bad ones).
  """

  source: str
  first: int
  unit: str = "line"

  def where(self, i: int) -> str:
    n = self.first + i
    if self.unit == "line":
      return f"{self.source}:{n}"
    return f"{self.source}: {self.unit} {n}"


@dataclasses.dataclass
class AppendStats:
  rows_written: int = 0
  rows_skipped: int = 0
  skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
  # The first few skipped rows as "where: field: reason".
  skipped_examples: list[str] = dataclasses.field(default_factory=list)


class _ColumnWriter:
  """Appends rows to one zarr3 array, writing whole chunks as they fill (bounded memory)."""

  def __init__(self, array: ts.TensorStore, chunk: int):
    self._array = array
    self._chunk = chunk
    self._pending: list[np.ndarray] = []
    self._num_pending = 0
    self.written = 0
    self._inflight: deque = deque()

  def append(self, x: np.ndarray):
    if len(x):
      self._pending.append(x)
      self._num_pending += len(x)
    if self._num_pending >= self._chunk:
      self._flush(whole_chunks_only=True)

  def _flush(self, whole_chunks_only: bool):
    if not self._num_pending:
      return
    data = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
    n = len(data) - len(data) % self._chunk if whole_chunks_only else len(data)
    if n:
      self._inflight.append(self._array[self.written:self.written + n].write(data[:n]))
      self.written += n
    rest = data[n:]
    self._pending = [rest.copy()] if len(rest) else []  # don't pin the big concatenation
    self._num_pending = len(rest)
    while len(self._inflight) > _MAX_INFLIGHT:
      self._inflight.popleft().result()

  def close(self) -> ts.TensorStore:
    """Writes the tail, waits until everything is durable, and cuts the array to length."""
    self._flush(whole_chunks_only=False)
    while self._inflight:
      self._inflight.popleft().result()
    shape = list(self._array.shape)
    shape[0] = self.written
    return self._array.resize(exclusive_max=shape, resize_metadata_only=True,
                              shrink_only=True).result()


class Appender:
  """Writes one segment and commits it atomically on :meth:`commit` (or a clean ``with`` exit).

  Rows are checked against the schema as they come: labels must be finite and in [0, 1], dense
  features finite. ``bad_rows="error"`` raises :class:`BadRowError` naming where the row came
  from and the field; ``"skip"`` drops such rows and counts them in ``stats``. A failed or
  abandoned append leaves the store as it was.
  """

  def __init__(self, store: FeatureStore, source: str = "", bad_rows: str = "error",
               max_skipped_examples: int = 10):
    if bad_rows not in BAD_ROW_POLICIES:
      raise ValueError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}")
    self.store = store
    self.source = source
    self.bad_rows = bad_rows
    self.stats = AppendStats()
    self.committed: Commit | None = None
    self._max_examples = max_skipped_examples
    self._base = store.head()
    self.schema = schema = self._base.schema
    self._chunk_rows = cr = self._base.chunk_rows
    now = datetime.datetime.now(datetime.timezone.utc)
    self.segment_id = f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
    prefix = f"segments/{self.segment_id}/"
    self._prefix_url = store.url + prefix
    # The marker comes first so garbage collection can age a segment killed at any point.
    store._kv.write(prefix + "_STARTED", json.dumps(
        {"started_unix": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
         "source": source}).encode()).result()
    ctx = _context()
    codec = self._base.codec

    def create(rel, dtype, shape, chunk):
      return ts.open(_zarr_spec(self._prefix_url + rel + "/", dtype, shape, chunk, codec),
                     create=True, context=ctx)

    t = schema.num_tasks
    futures = {"labels": create("labels", "float32", [_CAPACITY] + ([t] if t > 1 else []),
                                [cr] + ([t] if t > 1 else [])),
               "dense": create("dense", "float32", [_CAPACITY, schema.num_dense],
                               [cr, max(schema.num_dense, 1)])}
    for n, m in zip(schema.sparse_names, schema.max_ids):
      futures[f"{n}/values"] = create(f"sparse/{n}/values", "uint64", [_CAPACITY], [cr * m])
      futures[f"{n}/offsets"] = create(f"sparse/{n}/offsets", "int64", [_CAPACITY], [cr])
    for n in schema.extra_names:
      futures[f"extra:{n}"] = create(f"extra/{n}", "float32", [_CAPACITY], [cr])
    self._writers = {}
    for k, fut in futures.items():
      arr = fut.result()
      self._writers[k] = _ColumnWriter(arr, int(arr.chunk_layout.read_chunk.shape[0]))
    self._num_ids = np.zeros(len(schema.sparse_names), np.int64)
    # offsets[k * chunk_rows] of every block after the first, recorded as rows stream by.
    self._block_starts: list[list[int]] = [[] for _ in schema.sparse_names]
    for n in schema.sparse_names:
      self._writers[f"{n}/offsets"].append(np.zeros(1, np.int64))
    self._closed = False

  def __enter__(self) -> Appender:
    return self

  def __exit__(self, exc_type, exc, tb):
    if self._closed:  # committed or aborted explicitly inside the block
      return False
    if exc_type is None:
      self.commit()
    else:
      self.abort()
    return False

  # ---- rows ----

  def _check_shapes(self, b: Batch, origin: RowOrigin | None):
    s = self.schema
    src = origin.source if origin else (self.source or "input")
    want_labels = (len(b.ids),) if s.num_tasks == 1 else (len(b.ids), s.num_tasks)
    problems = []
    if b.dense.ndim != 2 or b.dense.shape[1] != s.num_dense:
      problems.append(f"dense has shape {b.dense.shape}; the store has {s.num_dense} dense "
                      f"features ({', '.join(s.dense_names)})")
    if b.ids.ndim != 2 or b.ids.shape[1] != s.layout.num_columns or b.mask.shape != b.ids.shape:
      problems.append(f"ids/mask have shapes {b.ids.shape}/{b.mask.shape}; the store's sparse "
                      f"features take {s.layout.num_columns} columns (max_ids "
                      f"{dict(zip(s.sparse_names, s.max_ids))})")
    if b.labels.shape != want_labels:
      problems.append(f"labels have shape {b.labels.shape}, expected {want_labels}")
    if problems:
      raise SchemaMismatchError(f"{src}: batch does not fit the store schema: "
                                + "; ".join(problems))

  def _check_extras(self, b: Batch, origin: RowOrigin | None,
                    extras: dict | None) -> dict[str, np.ndarray]:
    names = self.schema.extra_names
    extras = dict(extras or {})
    src = origin.source if origin else (self.source or "input")
    if set(extras) != set(names):
      raise SchemaMismatchError(f"{src}: extra columns {sorted(extras)} given, but the store's "
                                f"schema has extra columns {list(names)}")
    out = {}
    for n in names:
      x = np.asarray(extras[n], np.float32)
      if x.shape != (b.size,):
        raise SchemaMismatchError(f"{src}: extra column {n!r} has shape {x.shape}, expected "
                                  f"({b.size},)")
      out[n] = np.ascontiguousarray(x)
    return out

  def _bad_rows(self, b: Batch) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
    """(row has a bad label, row has a bad dense value, [(row, field, reason)] of the first)."""
    lab = b.labels.reshape(len(b.labels), -1)
    lab_bad = ~(np.isfinite(lab) & (lab >= 0) & (lab <= 1))
    dense_bad = ~np.isfinite(b.dense)
    label_rows, dense_rows = lab_bad.any(1), dense_bad.any(1)
    details = []
    want = 1 if self.bad_rows == "error" else self._max_examples - len(self.stats.skipped_examples)
    for r in np.flatnonzero(label_rows | dense_rows)[:max(want, 1)]:
      if label_rows[r]:
        v = lab[r][lab_bad[r]][0]
        hint = " (unlabeled data? Criteo test.txt has no labels)" if np.isnan(v) else ""
        details.append((int(r), "label", f"{float(v)!r} is not a probability in [0, 1]{hint}"))
      else:
        c = int(np.argmax(dense_bad[r]))
        details.append((int(r), self.schema.dense_names[c],
                        f"{float(b.dense[r, c])!r} is not a finite number"))
    return label_rows, dense_rows & ~label_rows, details

  def write(self, batch: Batch, origin: RowOrigin | None = None,
            extras: dict[str, np.ndarray] | None = None):
    """Appends the rows of ``batch`` (checked against the schema) to the segment.

    ``extras``: one [rows] array for each of the schema's ``extra_names`` (skipped rows are
    dropped from them too)."""
    if self._closed:
      raise StoreError("this append is already committed or aborted")
    self._check_shapes(batch, origin)
    extras = self._check_extras(batch, origin, extras)
    label_bad, dense_bad, details = self._bad_rows(batch)
    bad = label_bad | dense_bad
    if details:
      org = origin or RowOrigin(self.source or "input", self.stats.rows_written
                                + self.stats.rows_skipped, "example")
      if self.bad_rows == "error":
        r, field, reason = details[0]
        raise BadRowError(org.where(r), field, reason)
      st = self.stats
      st.rows_skipped += int(bad.sum())
      for r, field, reason in details:
        if len(st.skipped_examples) < self._max_examples:
          st.skipped_examples.append(f"{org.where(r)}: field {field}: {reason}")
      for name, rows in ((REASON_LABEL, label_bad), (REASON_DENSE, dense_bad)):
        if rows.any():
          st.skipped_by_reason[name] = st.skipped_by_reason.get(name, 0) + int(rows.sum())
      batch = take(batch, ~bad)
      extras = {n: x[~bad] for n, x in extras.items()}
    if not batch.size:
      return
    w = self._writers
    for n, x in extras.items():
      w[f"extra:{n}"].append(x)
    w["labels"].append(np.ascontiguousarray(batch.labels, np.float32))
    w["dense"].append(np.ascontiguousarray(batch.dense, np.float32))
    layout = self.schema.layout
    # Row i of this batch ends a block when rows_written + i + 1 is a multiple of chunk_rows.
    first_block_end = (-self.stats.rows_written - 1) % self._chunk_rows
    ids = np.asarray(batch.ids, np.uint64)
    mask = np.asarray(batch.mask, bool)
    for f, n in enumerate(self.schema.sparse_names):
      cols = layout.columns(f)
      m = mask[:, cols]
      # Bags are stored compacted: the real IDs of each row, in slot order.
      w[f"{n}/values"].append(ids[:, cols][m])
      ends = np.cumsum(m.sum(1), dtype=np.int64) + self._num_ids[f]
      w[f"{n}/offsets"].append(ends)
      self._num_ids[f] = ends[-1]
      self._block_starts[f].extend(ends[first_block_end::self._chunk_rows].tolist())
    self.stats.rows_written += batch.size

  # ---- commit ----

  def _close_segment(self) -> Segment:
    ctx = _context()
    for w in self._writers.values():
      w.close()
    rows = self.stats.rows_written
    # Block index: where each block's IDs start, so reading a block never needs the next
    # block's offsets chunk.
    futs = []
    for f, n in enumerate(self.schema.sparse_names):
      idx = [0] + self._block_starts[f]
      if rows % self._chunk_rows or not rows:
        idx.append(int(self._num_ids[f]))
      arr = ts.open(_zarr_spec(self._prefix_url + f"sparse/{n}/block_offsets/", "int64",
                               [len(idx)], [len(idx)], self._base.codec),
                    create=True, context=ctx).result()
      futs.append(arr.write(np.array(idx, np.int64)))
    for fu in futs:
      fu.result()
    return Segment(self.segment_id, -1, rows, tuple(int(x) for x in self._num_ids), self.source)

  def commit(self) -> Commit:
    """Makes the segment visible: waits for durable data, then swaps HEAD. Returns HEAD."""
    if self._closed:
      if self.committed is not None:
        return self.committed
      raise StoreError("this append was aborted")
    self._closed = True
    try:
      seg = self._close_segment()
      for attempt in range(1000):
        head, gen = self.store._read_head()
        if head is None:
          raise StoreNotFoundError(f"the store at {self.store.path!r} disappeared")
        diff = head.schema.difference(self.schema)
        if diff:
          raise SchemaMismatchError(f"the store's schema changed during the append: {diff}")
        new_seg = dataclasses.replace(seg, version=head.version + 1, committed_unix=time.time())
        new = dataclasses.replace(head, version=head.version + 1,
                                  segments=head.segments + (new_seg,))
        if self.store._swap_head(new, gen):
          self.committed = new
          return new
        time.sleep(min(0.001 * 2 ** min(attempt, 8), 0.5))  # another append won; retry on it
      raise StoreError(f"could not commit to {self.store.path!r}: HEAD kept changing")
    except BaseException:
      self._discard()
      raise

  def abort(self):
    """Abandons the append; the store stays as it was (the partial segment is deleted)."""
    if not self._closed:
      self._closed = True
      self._discard()

  def _discard(self):
    try:
      for w in self._writers.values():
        while w._inflight:
          try:
            w._inflight.popleft().result()
          except Exception:  # noqa: BLE001 - best effort; garbage collection catches the rest
            pass
      self.store._delete_segment(self.segment_id)
    except Exception:  # noqa: BLE001
      pass


# ---- reading -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
  """Rows [start, stop) of segment ``segment`` (index into the snapshot's segments);
  ``row0`` is the global index of its first row."""

  segment: int
  start: int
  stop: int
  row0: int

  @property
  def rows(self) -> int:
    return self.stop - self.start


class StoreSnapshot:
  """A read-only, consistent view of one committed version of a store. Thread-safe."""

  def __init__(self, store: FeatureStore, commit: Commit):
    self.store = store
    self.commit = commit
    self.schema = commit.schema
    self.layout = commit.schema.layout
    self.version = commit.version
    self.chunk_rows = commit.chunk_rows
    blocks, row0 = [], 0
    for si, seg in enumerate(commit.segments):
      for start in range(0, seg.rows, self.chunk_rows):
        stop = min(start + self.chunk_rows, seg.rows)
        blocks.append(Block(si, start, stop, row0 + start))
      row0 += seg.rows
    self.blocks: tuple[Block, ...] = tuple(blocks)
    self.num_rows = row0
    self._block_starts = np.array([b.row0 for b in blocks] + [row0], np.int64)
    self._arrays: dict[int, dict] = {}
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"StoreSnapshot({self.store.path!r}, version={self.version}, rows={self.num_rows}, "
            f"segments={len(self.commit.segments)}, blocks={len(self.blocks)})")

  def _segment(self, si: int) -> dict:
    with self._lock:
      arrays = self._arrays.get(si)
    if arrays is not None:
      return arrays
    seg = self.commit.segments[si]
    url = self.store.url + f"segments/{seg.id}/"
    ctx = _context()
    futs = {rel: ts.open({"driver": "zarr3", "kvstore": url + rel + "/"}, open=True,
                         context=ctx) for rel, _, _ in _segment_arrays(self.schema)}
    arrays = {}
    for rel, fut in futs.items():
      try:
        arrays[rel] = fut.result()
      except Exception as e:
        raise StoreError(f"store {self.store.path!r} version {self.version}: segment {seg.id} "
                         f"array {rel!r} cannot be opened ({e}); the store is damaged") from e
    for f, n in enumerate(self.schema.sparse_names):
      arrays[f"sparse/{n}/block_offsets"] = arrays[f"sparse/{n}/block_offsets"].read().result()
    with self._lock:
      self._arrays[si] = arrays
    return arrays

  def read_blocks(self, indices: Sequence[int]) -> list[Batch]:
    """Blocks by index into ``self.blocks``, read concurrently."""
    pending = []
    for bi in indices:
      blk = self.blocks[bi]
      a = self._segment(blk.segment)
      k = blk.start // self.chunk_rows
      futs = [a["labels"][blk.start:blk.stop].read(), a["dense"][blk.start:blk.stop].read()]
      ranges = []
      for n in self.schema.sparse_names:
        bo = a[f"sparse/{n}/block_offsets"]
        v0, v1 = int(bo[k]), int(bo[k + 1])
        ranges.append((v0, v1))
        futs.append(a[f"sparse/{n}/offsets"][blk.start:blk.stop].read())
        futs.append(a[f"sparse/{n}/values"][v0:v1].read())
      pending.append((blk, ranges, futs))
    return [self._assemble(blk, ranges, [f.result() for f in futs])
            for blk, ranges, futs in pending]

  def _assemble(self, blk: Block, ranges, parts) -> Batch:
    """Jagged columns of one block -> the padded Batch form."""
    n = blk.rows
    layout = self.layout
    ids = np.zeros((n, layout.num_columns), np.uint64)
    mask = np.zeros((n, layout.num_columns), bool)
    labels, dense = parts[0], parts[1]
    for f, name in enumerate(self.schema.sparse_names):
      starts, values = parts[2 + 2 * f], parts[3 + 2 * f]
      v0, v1 = ranges[f]
      lengths = np.diff(np.append(starts, v1))
      cols = layout.columns(f)
      L = layout.max_ids[f]
      if len(values) != v1 - v0 or (n and (starts[0] != v0 or lengths.min() < 0
                                          or lengths.max() > L)):
        seg = self.commit.segments[blk.segment]
        raise StoreError(f"store {self.store.path!r}: segment {seg.id} feature {name!r} rows "
                         f"{blk.start}..{blk.stop}: offsets do not match the values; the store "
                         "is damaged")
      if L == 1 and len(values) == n:
        ids[:, cols.start] = values
        mask[:, cols.start] = True
        continue
      slot = np.arange(L)
      valid = slot[None, :] < lengths[:, None]
      pos = (starts - v0)[:, None] + slot[None, :]
      if len(values):
        ids[:, cols] = np.where(valid, values[np.minimum(pos, len(values) - 1)], np.uint64(0))
      mask[:, cols] = valid
    return Batch(dense, ids, mask, labels)

  def read(self, start: int = 0, stop: int | None = None) -> Batch:
    """Rows [start, stop) in store order as one Batch."""
    stop = self.num_rows if stop is None else stop
    if not 0 <= start <= stop <= self.num_rows:
      raise IndexError(f"rows [{start}, {stop}) are outside [0, {self.num_rows}) of store "
                       f"version {self.version}")
    if start == stop:
      return self._empty()
    b0 = int(np.searchsorted(self._block_starts, start, "right")) - 1
    b1 = int(np.searchsorted(self._block_starts, stop, "left"))
    parts = self.read_blocks(range(b0, b1))
    batch = Batch.concat(parts) if len(parts) > 1 else parts[0]
    off = self.blocks[b0].row0
    return batch.slice(start - off, stop - off)

  def read_extra(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of the extra column ``name`` (float32), in store order."""
    if name not in self.schema.extra_names:
      raise KeyError(f"store {self.store.path!r} has no extra column {name!r} (it has "
                     f"{list(self.schema.extra_names)})")
    stop = self.num_rows if stop is None else stop
    if not 0 <= start <= stop <= self.num_rows:
      raise IndexError(f"rows [{start}, {stop}) are outside [0, {self.num_rows}) of store "
                       f"version {self.version}")
    futs, row0 = [], 0
    for si, seg in enumerate(self.commit.segments):
      lo, hi = max(start - row0, 0), min(stop - row0, seg.rows)
      if lo < hi:
        futs.append(self._segment(si)[f"extra/{name}"][lo:hi].read())
      row0 += seg.rows
    return (np.concatenate([f.result() for f in futs]) if futs
            else np.zeros(0, np.float32))

  def read_rows(self, rows: Sequence[int] | np.ndarray) -> Batch:
    """Rows by global index, in the order given (random access, a block at a time)."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise IndexError(f"row indices must lie in [0, {self.num_rows}) (store version "
                       f"{self.version})")
    if not rows.size:
      return self._empty()
    blk = np.searchsorted(self._block_starts, rows, "right") - 1
    uniq = np.unique(blk)
    parts = self.read_blocks(uniq.tolist())
    sizes = np.array([p.size for p in parts])
    base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    local = base[np.searchsorted(uniq, blk)] + (rows - self._block_starts[blk])
    return take(Batch.concat(parts) if len(parts) > 1 else parts[0], local)

  def iter_batches(self, batch_size: int, drop_remainder: bool = False) -> Iterator[Batch]:
    """Sequential batches in store order (a block at a time)."""
    pending: list[Batch] = []
    num = 0
    for bi in range(len(self.blocks)):
      pending.append(self.read_blocks([bi])[0])
      num += pending[-1].size
      if num >= batch_size:
        merged = Batch.concat(pending) if len(pending) > 1 else pending[0]
        full = num - num % batch_size
        for s in range(0, full, batch_size):
          yield merged.slice(s, s + batch_size)
        pending = [merged.slice(full, num)] if full < num else []
        num -= full
    if num and not drop_remainder:
      yield Batch.concat(pending) if len(pending) > 1 else pending[0]

  def _empty(self) -> Batch:
    t = self.schema.num_tasks
    return Batch(np.zeros((0, self.schema.num_dense), np.float32),
                 np.zeros((0, self.layout.num_columns), np.uint64),
                 np.zeros((0, self.layout.num_columns), bool),
                 np.zeros((0,) if t == 1 else (0, t), np.float32))


def take(batch: Batch, rows: np.ndarray) -> Batch:
  """The rows of ``batch`` at ``rows`` (a gather)."""
  return Batch(batch.dense[rows], batch.ids[rows], batch.mask[rows], batch.labels[rows])
