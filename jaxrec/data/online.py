"""Online entity features on TensorStore's OCDBT key-value store.

An entity (a user, an item, an ad) is a 64-bit key with a fixed-width float vector and a few
scalar fields. Each entity is one OCDBT entry: the key as 8 big-endian bytes (so keys sort
numerically), the value one packed little-endian record (``EntitySchema.record_dtype``), small
enough to live inline in the B+tree leaves, so a lookup is one leaf read. The schema is stored
in the same database under a key that is not 8 bytes long.

Writes: :meth:`OnlineFeatureStore.put` writes a batch as one atomic OCDBT transaction, which
commits as one new database version (the manifest swap makes it all-or-nothing; a writer killed
mid-commit leaves the previous version current). Reads: :meth:`OnlineFeatureStore.snapshot`
pins one version (OCDBT's ``version`` option), so every lookup through it sees that version
however many writers commit meanwhile; :meth:`OnlineFeatureStore.get` pins the latest version
per call, so one batch never mixes two versions.

One writer process at a time is the supported model (any number of readers). Lookups cost a
B+tree descent per distinct key; nodes are cached (``cache_bytes``), and the tree is built with
small leaves (``leaf_bytes``) so a cold lookup decodes little.

Serving: that per-key cost (a TensorStore read future and a descent, tens of ms for 1,000 keys
on a small CPU) is too slow for millisecond lookups, so :meth:`OnlineSnapshot.export` writes a
version as a :class:`ServingReplica` (sorted keys + memory-mapped records, published atomically
beside older versions) whose batch get is a few vectorised numpy operations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import uuid
from typing import Iterator, Sequence

import numpy as np
import tensorstore as ts

from jaxrec.data.batch import Batch, SparseLayout
from jaxrec.data.store import StoreError, _local_dir, _root_url, clear_stale_lock

_SCHEMA_KEY = b"__jaxrec_entity_schema__"  # never 8 bytes long, so never an entity key
_FORMAT = "jaxrec.online_features"
_REPLICA_META = "replica.json"
_CURRENT = "CURRENT"  # a serving replica's pointer to its newest complete version
_VERSION_DIR = re.compile(r"v\d+-[0-9a-f]{8}")
_MAX_BUCKET = 16  # keys compared per lookup in a serving replica's bucket index
_FIELD_DTYPES = ("float32", "float64", "int32", "int64", "uint32", "uint64", "int8", "uint8",
                 "bool")


@dataclasses.dataclass(frozen=True)
class EntitySchema:
  """``dim`` floats of ``vector`` plus named scalar ``fields`` ((name, dtype) pairs)."""

  dim: int
  fields: tuple[tuple[str, str], ...] = ()
  vector_dtype: str = "float32"

  def __post_init__(self):
    if self.dim < 0:
      raise ValueError(f"EntitySchema.dim must be >= 0, got {self.dim}")
    names = [n for n, _ in self.fields]
    if "vector" in names or len(set(names)) != len(names):
      raise ValueError(f"EntitySchema field names must be unique and not 'vector': {names}")
    for n, d in self.fields + (("vector", self.vector_dtype),):
      if d not in _FIELD_DTYPES:
        raise ValueError(f"EntitySchema field {n!r}: dtype {d!r} is not one of {_FIELD_DTYPES}")

  @property
  def record_dtype(self) -> np.dtype:
    return np.dtype([("vector", "<" + np.dtype(self.vector_dtype).str[1:], (self.dim,))]
                    + [(n, "<" + np.dtype(d).str[1:]) for n, d in self.fields])

  @property
  def field_names(self) -> tuple[str, ...]:
    return tuple(n for n, _ in self.fields)

  def to_json(self) -> dict:
    return {"format": _FORMAT, "dim": self.dim, "vector_dtype": self.vector_dtype,
            "fields": [{"name": n, "dtype": d} for n, d in self.fields]}

  @classmethod
  def from_json(cls, d: dict) -> EntitySchema:
    return cls(int(d["dim"]), tuple((f["name"], f["dtype"]) for f in d["fields"]),
               d.get("vector_dtype", "float32"))


@dataclasses.dataclass
class EntityRows:
  """Result of a batch get, aligned with the requested keys. Missing keys are zeros with
  ``found`` False."""

  keys: np.ndarray
  vector: np.ndarray
  fields: dict[str, np.ndarray]
  found: np.ndarray
  version: int

  def __getitem__(self, name: str) -> np.ndarray:
    return self.vector if name == "vector" else self.fields[name]


def _key_bytes(keys: np.ndarray) -> list[bytes]:
  raw = np.ascontiguousarray(keys, dtype=">u8").tobytes()
  return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _as_keys(keys, what: str) -> np.ndarray:
  arr = np.asarray(keys)
  if arr.ndim != 1:
    raise ValueError(f"{what}: keys must be a 1-D array, got shape {arr.shape}")
  if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
    raise ValueError(f"{what}: keys are unsigned 64-bit; got negative key {int(arr.min())}")
  if arr.dtype.kind not in "iu":
    raise ValueError(f"{what}: keys must be integers, got dtype {arr.dtype}")
  return arr.astype(np.uint64)


def _rows(schema: EntitySchema, keys, recs, found, version) -> EntityRows:
  return EntityRows(keys=keys, vector=np.array(recs["vector"]),
                    fields={n: np.array(recs[n]) for n in schema.field_names}, found=found,
                    version=version)


def _ocdbt_spec(url: str, version: int | None = None) -> dict:
  spec = {"driver": "ocdbt", "base": url}
  if version is not None:
    spec["version"] = int(version)
  return spec


class OnlineSnapshot:
  """Lookups against one pinned version of an :class:`OnlineFeatureStore`. Thread-safe."""

  def __init__(self, store: OnlineFeatureStore, version: int):
    self.store = store
    self.version = version
    self.schema = store.schema
    self._kv = ts.KvStore.open(_ocdbt_spec(store.url, version), context=store._ctx).result()

  def __repr__(self) -> str:
    return f"OnlineSnapshot({self.store.path!r}, version={self.version})"

  def _keys_by_range(self) -> Iterator[np.ndarray]:
    """The version's entity keys in ascending order, a 1/256 of the key space at a time."""
    for first in range(256):
      lo = bytes([first])
      hi = bytes([first + 1]) if first < 255 else b"\xff" * 9
      ks = [k for k in self._kv.list(ts.KvStore.KeyRange(lo, hi)).result() if len(k) == 8]
      yield np.frombuffer(b"".join(sorted(ks)), ">u8").astype(np.uint64)

  def warm_cache(self) -> int:
    """Reads every B+tree node of this version into the node cache in one ordered pass, so
    later lookups decode nothing; the cache (``cache_bytes``) must hold the store. Returns
    the number of entities."""
    return sum(len(k) for k in self._keys_by_range())

  def export(self, path: str | os.PathLike, chunk: int = 65536, keep: int = 2
             ) -> ServingReplica:
    """Writes this version as a local serving replica and opens it.

    A replica directory holds one directory per exported version (sorted keys + packed
    records, ``.npy`` files that :class:`ServingReplica` memory-maps, and the metadata) and
    ``CURRENT``, the name of the newest complete one, replaced atomically once everything is
    durable. So an export that fails or is killed never becomes visible, and a process already
    serving an older version keeps reading exactly that version while a newer one is written
    and published: files are never rewritten in place. Versions beyond the newest ``keep``
    are deleted (a reader that mapped one still reads it: unlinked files stay mapped).

    Why a replica: a 1,000-key get through OCDBT costs one B+tree descent per key plus a
    TensorStore future per key, several ms even with every node cached; the replica's lookup
    is a few vectorised numpy operations.
    """
    root = os.fspath(path)
    os.makedirs(root, exist_ok=True)
    name = f"v{self.version}-{uuid.uuid4().hex[:8]}"
    tmp_dir = os.path.join(root, name)
    os.makedirs(tmp_dir)
    keys = np.concatenate(list(self._keys_by_range()))
    rdt = self.schema.record_dtype
    keys_mm = np.lib.format.open_memmap(os.path.join(tmp_dir, "keys.npy"), "w+", np.uint64,
                                        (len(keys),))
    keys_mm[:] = keys
    recs = np.lib.format.open_memmap(os.path.join(tmp_dir, "records.npy"), "w+", rdt,
                                     (len(keys),))
    for s in range(0, len(keys), chunk):
      found, values = self._read(keys[s:s + chunk])
      if not found.all():
        raise StoreError(f"online store {self.store.path!r} version {self.version}: a listed key "
                         "could not be read while exporting")
      recs[s:s + len(found)] = values
    keys_mm.flush()
    recs.flush()
    del keys_mm, recs
    _write_durably(os.path.join(tmp_dir, _REPLICA_META), json.dumps(
        {"version": self.version, "count": int(len(keys)), "source": self.store.url,
         "schema": self.schema.to_json()}).encode())
    for f in ("keys.npy", "records.npy"):
      _fsync_path(os.path.join(tmp_dir, f))
    _fsync_path(tmp_dir)
    _write_durably(os.path.join(root, _CURRENT), name.encode())  # the publish
    # Older versions beyond ``keep``, and leftovers of failed exports (one exporter at a time).
    dirs = [d for d in os.listdir(root) if _VERSION_DIR.fullmatch(d) and d != name]
    done = sorted((d for d in dirs if os.path.exists(os.path.join(root, d, _REPLICA_META))),
                  key=lambda d: os.path.getmtime(os.path.join(root, d, _REPLICA_META)))
    stale = set(dirs) - set(done[len(done) - max(keep - 1, 0):] if keep > 1 else [])
    for old in stale:
      shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return ServingReplica(root)

  def _read(self, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, records of the found keys) for distinct keys."""
    batch = ts.Batch()
    futs = [self._kv.read(k, batch=batch) for k in _key_bytes(uniq)]
    batch.submit()
    found = np.zeros(len(uniq), bool)
    chunks = []
    for i, f in enumerate(futs):
      r = f.result()
      if r.state == "value":
        found[i] = True
        chunks.append(r.value)
    rdt = self.schema.record_dtype
    values = np.frombuffer(b"".join(chunks), rdt)
    if len(values) != int(found.sum()):
      raise StoreError(f"online store {self.store.path!r} version {self.version}: a record has "
                       f"the wrong size for schema {self.schema} (expected {rdt.itemsize} bytes)")
    return found, values

  def get(self, keys: Sequence[int] | np.ndarray) -> EntityRows:
    """The entities of ``keys`` (any order, repeats allowed) as of this snapshot's version."""
    keys = _as_keys(keys, "get")
    uniq, inverse = np.unique(keys, return_inverse=True)
    found, values = self._read(uniq)
    recs = np.zeros(len(uniq), self.schema.record_dtype)
    recs[found] = values
    return _rows(self.schema, keys, recs[inverse], found[inverse], self.version)


class OnlineFeatureStore:
  """A key-value store of entity features at ``path`` (local directory or kvstore URL)."""

  def __init__(self, path: str | os.PathLike, *, cache_bytes: int = 1 << 30):
    self.path = os.fspath(path)
    self.url = _root_url(self.path)
    self._local = _local_dir(self.path)
    # Decoded B+tree nodes are cached here and shared by every snapshot of this handle.
    self._ctx = ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}})
    self._kv = ts.KvStore.open(_ocdbt_spec(self.url), context=self._ctx).result()
    self._base = ts.KvStore.open(self.url, context=self._ctx).result()
    r = self._kv.read(_SCHEMA_KEY).result()
    if r.state != "value":
      raise StoreError(f"no online feature store at {self.path!r}; create it with "
                       "OnlineFeatureStore.create(path, EntitySchema(...))")
    self.schema = EntitySchema.from_json(json.loads(r.value))
    self._snapshots: dict[int, OnlineSnapshot] = {}
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"OnlineFeatureStore({self.path!r}, {self.schema})"

  @classmethod
  def create(cls, path: str | os.PathLike, schema: EntitySchema, *, leaf_bytes: int = 8192,
             exist_ok: bool = False, cache_bytes: int = 1 << 30) -> OnlineFeatureStore:
    """Creates an empty store (an OCDBT database holding only the schema).

    ``leaf_bytes`` bounds a decoded B+tree node: small leaves make a cache-missing lookup
    decode little (8 KiB measured best for random 1,000-key gets; 64 KiB was 1.3x slower).
    """
    url = _root_url(os.fspath(path))
    rec = schema.record_dtype.itemsize
    kv = ts.KvStore.open(
        {"driver": "ocdbt", "base": url,
         "config": {"max_inline_value_bytes": max(100, min(rec, 1 << 20)),
                    "max_decoded_node_bytes": int(leaf_bytes)}}).result()
    r = kv.read(_SCHEMA_KEY).result()
    if r.state == "value":
      existing = EntitySchema.from_json(json.loads(r.value))
      if not exist_ok:
        raise StoreError(f"an online feature store already exists at {path!r}")
      if existing != schema:
        raise StoreError(f"online store {path!r} exists with schema {existing}, not {schema}")
    else:
      kv.write(_SCHEMA_KEY, json.dumps(schema.to_json()).encode()).result()
    return cls(path, cache_bytes=cache_bytes)

  # ---- versions ----

  def latest_version(self) -> int:
    """The generation number of the newest committed version."""
    manifest = ts.ocdbt.dump(self._base).result()
    return int(manifest["versions"][-1]["generation_number"])

  def snapshot(self, version: int | None = None) -> OnlineSnapshot:
    """A view pinned to ``version`` (default: the newest committed one)."""
    version = self.latest_version() if version is None else int(version)
    with self._lock:
      snap = self._snapshots.get(version)
      if snap is None:
        snap = OnlineSnapshot(self, version)
        self._snapshots[version] = snap
        while len(self._snapshots) > 4:
          self._snapshots.pop(next(iter(self._snapshots)))
      return snap

  def get(self, keys: Sequence[int] | np.ndarray, version: int | None = None) -> EntityRows:
    """Batch lookup at ``version`` (default: the newest, pinned for the whole batch)."""
    return self.snapshot(version).get(keys)

  # ---- writes ----

  def put(self, keys: Sequence[int] | np.ndarray, vector: np.ndarray | None = None,
          **fields: np.ndarray) -> int:
    """Writes (inserts or replaces) whole entities as one atomic commit; returns its version.

    ``vector``: [n, dim]; every field of the schema must be given, [n] each.
    """
    keys = _as_keys(keys, "put")
    n = len(keys)
    s = self.schema
    uniq, counts = np.unique(keys, return_counts=True)
    if len(uniq) != n:
      raise ValueError(f"put: key {int(uniq[counts > 1][0])} appears more than once in one put")
    missing = sorted(set(s.field_names) - set(fields))
    unknown = sorted(set(fields) - set(s.field_names))
    if missing or unknown:
      raise ValueError(f"put: fields {missing} are missing and {unknown} are unknown; the "
                       f"schema's fields are {list(s.field_names)}")
    recs = np.zeros(n, s.record_dtype)
    if s.dim:
      if vector is None or np.shape(vector) != (n, s.dim):
        raise ValueError(f"put: vector must have shape ({n}, {s.dim}), got "
                         f"{None if vector is None else np.shape(vector)}")
      recs["vector"] = vector
    for name, v in fields.items():
      if np.shape(v) != (n,):
        raise ValueError(f"put: field {name!r} must have shape ({n},), got {np.shape(v)}")
      recs[name] = v
    order = np.argsort(keys, kind="stable")  # sorted keys touch B+tree leaves in order
    raw = recs[order].tobytes()
    size = s.record_dtype.itemsize
    self._clear_stale_manifest_lock()
    txn = ts.Transaction(atomic=True)
    kv = self._kv.with_transaction(txn)
    for i, k in enumerate(_key_bytes(keys[order])):
      kv.write(k, raw[i * size:(i + 1) * size])
    txn.commit_sync()
    return self.latest_version()

  def delete(self, keys: Sequence[int] | np.ndarray) -> int:
    """Deletes entities (missing keys are fine) as one atomic commit; returns its version."""
    keys = _as_keys(keys, "delete")
    self._clear_stale_manifest_lock()
    txn = ts.Transaction(atomic=True)
    kv = self._kv.with_transaction(txn)
    for k in _key_bytes(np.unique(keys)):
      kv.write(k, None)
    txn.commit_sync()
    return self.latest_version()

  def _clear_stale_manifest_lock(self):
    # A writer killed while writing the manifest leaves a lock file that would corrupt ours.
    if self._local:
      clear_stale_lock(os.path.join(self._local, "manifest.ocdbt.__lock"))


def _fsync_path(path: str):
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_durably(path: str, data: bytes):
  """Writes ``path`` as a whole or not at all (temp file, fsync, rename, fsync the dir)."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_path(os.path.dirname(path) or ".")


class ServingReplica:
  """A read-only copy of one store version on local disk (made by :meth:`OnlineSnapshot.export`):
  the sorted keys and a bucket index in memory, the packed records memory-mapped.

  A get is vectorised numpy with no per-key Python: bucket ``(key - min) >> shift`` of the
  index gives where that bucket's keys start in the sorted key column (about one key per
  bucket), one compare against a few neighbouring keys finds the row, and one gather reads the
  records from the page cache. Keys that crowd into one bucket beyond ``_MAX_BUCKET`` (very
  skewed key sets) fall back to a binary search. ``map_pages`` touches every record page at
  open (a serving warm-up).

  One object serves one version for its whole life (thread-safe: nothing is mutated after
  open); :meth:`refresh` opens the newest published version, e.g. between requests."""

  def __init__(self, path: str | os.PathLike, map_pages: bool = True):
    self.path = os.fspath(path)
    for attempt in range(3):
      vdir = self._current_dir()
      try:
        self._open(vdir, map_pages)
        break
      except FileNotFoundError:
        if attempt == 2:  # an export deleted it between reading CURRENT and opening
          raise
    self.dir = vdir

  def _current_dir(self) -> str:
    cur = os.path.join(self.path, _CURRENT)
    try:
      with open(cur) as f:
        return os.path.join(self.path, f.read().strip())
    except FileNotFoundError:
      if os.path.exists(os.path.join(self.path, _REPLICA_META)):
        return self.path  # a replica of the first layout: one version, no CURRENT
      raise StoreError(f"no complete serving replica at {self.path!r} (no {_CURRENT}); make "
                       "one with OnlineFeatureStore(...).snapshot().export(path)") from None

  def _open(self, vdir: str, map_pages: bool):
    with open(os.path.join(vdir, _REPLICA_META)) as f:
      meta = json.load(f)
    self.version = int(meta["version"])
    self.schema = EntitySchema.from_json(meta["schema"])
    # The keys (8 bytes an entity) are read into memory, like an SSTable's index block; the
    # records stay on disk, mapped.
    self.keys = np.load(os.path.join(vdir, "keys.npy"))
    self.records = np.load(os.path.join(vdir, "records.npy"), mmap_mode="r")
    if len(self.keys) != meta["count"] or self.records.dtype != self.schema.record_dtype:
      raise StoreError(f"serving replica {vdir!r} does not match its {_REPLICA_META}")
    self._build_index()
    if map_pages and len(self.records):
      # Touch every page once so lookups don't take page faults (a serving process's warm-up).
      raw = self.records.view(np.uint8).reshape(-1)
      int(raw[::4096].sum())

  def _build_index(self):
    keys = self.keys
    n = len(keys)
    if not n:
      return
    self._min = keys[0]
    span = int(keys[-1] - keys[0])
    # 2-4 keys a bucket for spread keys: an index of 1-2 bytes a key, a window of a few keys.
    bits = max(int(n).bit_length() - 2, 1)
    self._shift = np.uint64(max(span.bit_length() - bits, 0))
    buckets = (span >> int(self._shift)) + 1
    counts = np.bincount(((keys - self._min) >> self._shift).astype(np.int64),
                         minlength=buckets)
    self._starts = np.zeros(buckets + 1, np.int32 if n < 2**31 else np.int64)
    np.cumsum(counts, out=self._starts[1:])
    self._width = int(min(counts.max(), _MAX_BUCKET))
    self._crowded = bool(counts.max() > _MAX_BUCKET)
    self._slots = np.arange(self._width)
    self._last_bucket = np.uint64(buckets - 1)

  def __repr__(self) -> str:
    return f"ServingReplica({self.path!r}, version={self.version}, entities={len(self.keys)})"

  def refresh(self) -> ServingReplica:
    """This replica if it is still the newest published version, else the newest opened."""
    try:
      if self._current_dir() == self.dir:
        return self
    except StoreError:
      return self
    return ServingReplica(self.path)

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each key in the key column, found) for uint64 ``keys``; rows of missing keys
    are meaningless (but inside the column)."""
    n = len(self.keys)
    if not n:
      return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    rel = keys - self._min                       # keys below the minimum wrap to huge values
    bucket = np.minimum(rel >> self._shift, self._last_bucket).astype(np.int64)
    lo = np.take(self._starts, bucket).astype(np.int64)
    # A key can only sit in its own bucket, so reading past the bucket's end (into the next
    # bucket, or clipped at the column's end) never makes a false match.
    window = np.take(self.keys, lo[:, None] + self._slots, mode="clip")
    hit = window == keys[:, None]
    found = hit.any(1)
    rows = np.minimum(lo + hit.argmax(1), n - 1)
    if self._crowded:  # buckets wider than the window: binary search their keys
      crowded = np.flatnonzero(np.take(self._starts, bucket + 1) - lo > self._width)
      r = np.minimum(np.searchsorted(self.keys, keys[crowded]), n - 1)
      rows[crowded] = r
      found[crowded] = self.keys[r] == keys[crowded]
    return rows, found

  def get(self, keys: Sequence[int] | np.ndarray) -> EntityRows:
    keys = _as_keys(keys, "get")
    rows, found = self.lookup(keys)
    if len(self.keys):
      # np.take copies whole records; fancy indexing a structured memmap is ~4x slower.
      recs = np.take(self.records, rows)
      if not found.all():
        recs[~found] = np.zeros((), self.schema.record_dtype)
    else:
      recs = np.zeros(len(keys), self.schema.record_dtype)
    return _rows(self.schema, keys, recs, found, self.version)


def join_entities(batch: Batch, layout: SparseLayout, snapshot: OnlineSnapshot | ServingReplica,
                  key_feature: str) -> Batch:
  """Appends each example's entity features to ``dense``: the entity is the first ID of sparse
  feature ``key_feature`` (e.g. the user ID). Adds ``dim`` vector columns, one column per
  field and a last column that is 1 where the entity was found (all zeros where not)."""
  if key_feature not in layout.names:
    raise ValueError(f"join_entities: key_feature {key_feature!r} is not a sparse feature; "
                     f"known: {list(layout.names)}")
  col = layout.columns(layout.names.index(key_feature)).start
  keys = np.asarray(batch.ids[:, col], np.uint64)
  rows = snapshot.get(keys)
  extra = [rows.vector.astype(np.float32).reshape(len(keys), -1)]
  extra += [rows.fields[n].astype(np.float32)[:, None] for n in snapshot.schema.field_names]
  found = rows.found & np.asarray(batch.mask[:, col])
  extra.append(found.astype(np.float32)[:, None])
  dense = np.concatenate([batch.dense] + [np.where(found[:, None], e, 0) for e in extra], axis=1)
  return Batch(dense.astype(np.float32), batch.ids, batch.mask, batch.labels)
