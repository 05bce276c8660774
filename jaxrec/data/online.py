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
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Iterator, Sequence

import numpy as np
import tensorstore as ts

from jaxrec.data.batch import Batch, SparseLayout
from jaxrec.data.store import StoreError, _local_dir, _root_url, clear_stale_lock

_SCHEMA_KEY = b"__jaxrec_entity_schema__"  # never 8 bytes long, so never an entity key
_FORMAT = "jaxrec.online_features"
_REPLICA_META = "replica.json"
_FENCE = 64  # keys per run of a serving replica's two-level search
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

  def export(self, path: str | os.PathLike, chunk: int = 65536) -> ServingReplica:
    """Writes this version as a local serving replica (sorted keys + packed records, both
    ``.npy`` files that :class:`ServingReplica` memory-maps) and opens it.

    A 1,000-key get through OCDBT costs one B+tree descent per key (about 14 µs each here,
    even with every node cached), so p99 under a few ms needs the replica's binary search
    over mapped arrays. The metadata file is written last: a half-written export never opens.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    meta_path = os.path.join(path, _REPLICA_META)
    if os.path.exists(meta_path):
      os.remove(meta_path)
    keys = np.concatenate(list(self._keys_by_range()))
    rdt = self.schema.record_dtype
    keys_mm = np.lib.format.open_memmap(os.path.join(path, "keys.npy"), "w+", np.uint64,
                                        (len(keys),))
    keys_mm[:] = keys
    recs = np.lib.format.open_memmap(os.path.join(path, "records.npy"), "w+", rdt, (len(keys),))
    for s in range(0, len(keys), chunk):
      found, values = self._read(keys[s:s + chunk])
      if not found.all():
        raise StoreError(f"online store {self.store.path!r} version {self.version}: a listed key "
                         "could not be read while exporting")
      recs[s:s + len(found)] = values
    keys_mm.flush()
    recs.flush()
    del keys_mm, recs
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"version": self.version, "count": int(len(keys)), "source": self.store.url,
                 "schema": self.schema.to_json()}, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, meta_path)
    return ServingReplica(path)

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


class ServingReplica:
  """A read-only copy of one store version on local disk (made by :meth:`OnlineSnapshot.export`):
  the sorted keys in memory, the packed records memory-mapped. A get is a two-level binary
  search and a gather served from the page cache. ``map_pages`` touches every record page at
  open (a serving warm-up). Thread-safe; open a newer export to move to a newer version."""

  def __init__(self, path: str | os.PathLike, map_pages: bool = True):
    self.path = os.fspath(path)
    meta_path = os.path.join(self.path, _REPLICA_META)
    if not os.path.exists(meta_path):
      raise StoreError(f"no complete serving replica at {self.path!r} (no {_REPLICA_META}); "
                       "make one with OnlineFeatureStore(...).snapshot().export(path)")
    with open(meta_path) as f:
      meta = json.load(f)
    self.version = int(meta["version"])
    self.schema = EntitySchema.from_json(meta["schema"])
    # The key index (8 bytes an entity) is read into memory, like an SSTable's index block;
    # the records stay on disk, mapped.
    self.keys = np.load(os.path.join(self.path, "keys.npy"))
    self.records = np.load(os.path.join(self.path, "records.npy"), mmap_mode="r")
    if len(self.keys) != meta["count"] or self.records.dtype != self.schema.record_dtype:
      raise StoreError(f"serving replica {self.path!r} does not match its {_REPLICA_META}")
    # Every _FENCE-th key: a binary search there (small enough for the CPU caches) picks the
    # run of _FENCE keys to finish in, instead of ~log2(n) cache misses over the whole index.
    self._fences = self.keys[::_FENCE].copy()
    if map_pages and len(self.records):
      # Touch every page once so lookups don't take page faults (a serving process's warm-up).
      raw = self.records.view(np.uint8).reshape(-1)
      int(raw[::4096].sum())

  def __repr__(self) -> str:
    return f"ServingReplica({self.path!r}, version={self.version}, entities={len(self.keys)})"

  def get(self, keys: Sequence[int] | np.ndarray) -> EntityRows:
    keys = _as_keys(keys, "get")
    n = len(self.keys)
    rdt = self.schema.record_dtype
    if not n:
      return _rows(self.schema, keys, np.zeros(len(keys), rdt), np.zeros(len(keys), bool),
                   self.version)
    # Sorted, distinct queries walk the mapped files forwards: fewer pages, better readahead.
    uniq, inverse = np.unique(keys, return_inverse=True)
    run = np.maximum(np.searchsorted(self._fences, uniq, "right") - 1, 0) * _FENCE
    window = self.keys[np.minimum(run[:, None] + np.arange(_FENCE), n - 1)]
    idx = np.minimum(run + (window < uniq[:, None]).sum(1), n - 1)
    found = self.keys[idx] == uniq
    recs = self.records[idx]
    recs[~found] = np.zeros((), rdt)
    return _rows(self.schema, keys, recs[inverse], found[inverse], self.version)


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
