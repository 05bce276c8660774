"""Dirty-row tracking by fingerprints, and the row deltas an incremental snapshot holds.

Big arrays are grouped into *row groups*: arrays that share leading "row" axes and change
together (a stack's table and its optimizer slots; a hash shard's keys, values, slots and
metadata). Each row of a group gets a 64-bit fingerprint (two independent 32-bit lanes) of the
bits of all its members, computed with jnp on the device that holds the row. An incremental save
recomputes the fingerprints, writes only the rows whose fingerprint changed (their flat row
indices, and each member's row values), and keeps the new fingerprints for the next save.

Exactness: a row whose bits changed in exactly one 32-bit word always changes both lanes
(``fmix32`` is a bijection; see ``_fingerprint``); any other change is missed with probability
about 2**-64 per changed row. A row rewritten to identical bits needs no saving. Memory: 8 bytes
per row, on the devices holding the rows. Cost: one pass over the group, one hash per word.

When a group is split over a mesh along its row axes only (the stacks and hash shards are),
every pass is one ``shard_map``: each device fingerprints, diffs and gathers its own rows (one
compile for all devices; rows never move until the changed ones go to the host). Any other
group (replicated, single-device) is handled by one jitted computation over the global arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.checkpoint import tree as tree_lib
from jaxrec.embedding import routing

_LANE_SEEDS = (0x243F6A88, 0x85A308D3)
_COL_MULT = np.uint32(0x9E3779B9)


@dataclasses.dataclass(frozen=True)
class RowGroup:
  """Arrays (full state paths) sharing ``row_shape`` (their first ``row_axes`` dims)."""

  name: str
  members: tuple[str, ...]
  row_axes: int
  row_shape: tuple[int, ...]

  @property
  def num_rows(self) -> int:
    return int(np.prod(self.row_shape))

  def to_json(self) -> dict:
    return {"name": self.name, "members": list(self.members), "row_axes": self.row_axes,
            "row_shape": list(self.row_shape)}

  @staticmethod
  def from_json(d: dict) -> "RowGroup":
    return RowGroup(d["name"], tuple(d["members"]), int(d["row_axes"]), tuple(d["row_shape"]))


# ---- fingerprints -----------------------------------------------------------------------------


_fmix32 = routing.fmix32


def _words(x, row_axes: int):
  """The bits of each row as uint32 words: [*rows, W]."""
  if tree_lib.is_key_array(x):
    x = jax.random.key_data(x)
  rows = x.shape[:row_axes]
  size = x.dtype.itemsize
  if x.dtype == jnp.bool_:
    w = x.astype(jnp.uint32)
  elif size == 4:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif size == 2:
    w = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif size == 1:
    w = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  elif size == 8:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
  else:
    raise TypeError(f"cannot fingerprint dtype {x.dtype}")
  return w.reshape(*rows, -1)


def _fingerprint(members: Sequence[jax.Array], row_axes: int):
  """[*rows, 2] uint32 over the concatenated words of all members.

  One hash per word, ``e_j = fmix32(w_j ^ K_j)``; lane 0 sums ``e_j``, lane 1 sums
  ``e_j * M_j`` (odd ``M_j``), both mod 2**32, then each is finalised. A change in one word
  changes ``e_j`` by some d != 0, hence lane 0 by d and lane 1 by d * M_j != 0: always seen.
  """
  s0 = s1 = None
  col0 = 0
  for m in members:
    w = _words(m, row_axes)
    cols = jnp.arange(col0, col0 + w.shape[-1], dtype=jnp.uint32)
    e = _fmix32(w ^ (cols * _COL_MULT + jnp.uint32(_LANE_SEEDS[0])))
    p0 = jnp.sum(e, axis=-1, dtype=jnp.uint32)  # wraps mod 2**32
    p1 = jnp.sum(e * ((cols * jnp.uint32(_LANE_SEEDS[1])) | jnp.uint32(1)), axis=-1,
                 dtype=jnp.uint32)
    s0 = p0 if s0 is None else s0 + p0
    s1 = p1 if s1 is None else s1 + p1
    col0 += w.shape[-1]
  return jnp.stack([_fmix32(s0 ^ jnp.uint32(_LANE_SEEDS[0])),
                    _fmix32(s1 ^ jnp.uint32(_LANE_SEEDS[1]))], axis=-1)


def _pad(n: int) -> int:
  """Static size for n rows: the next power of two (few compiles, at most 2x work)."""
  return 1 << max(0, (int(n) - 1).bit_length())


# ---- how a group is split ---------------------------------------------------------------------


def _row_split(arrays: Sequence[Any], row_axes: int):
  """(mesh, PartitionSpec of the row axes) when every member is split over one mesh along its
  row axes only, identically; else None (the group is processed globally)."""
  found = None
  for a in arrays:
    s = getattr(a, "sharding", None)
    if not isinstance(s, NamedSharding) or not a.is_fully_addressable:
      return None
    spec = tuple(s.spec) + (None,) * (a.ndim - len(s.spec))
    if any(x is not None for x in spec[row_axes:]) or all(x is None for x in spec[:row_axes]):
      return None
    key = (s.mesh, P(*spec[:row_axes]))
    if found is not None and key != found:
      return None
    found = key
  return found


def _flat_spec(mesh) -> P:
  return P(tuple(mesh.axis_names))


@functools.lru_cache(maxsize=256)
def _sharded_fingerprint(mesh, rowspec, row_axes, n):
  f = lambda *ms: _fingerprint(ms, row_axes)
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(rowspec,) * n, out_specs=rowspec,
                               check_vma=False))


@functools.lru_cache(maxsize=256)
def _sharded_diff(mesh, rowspec):
  def f(old, new):
    changed = jnp.any(old != new, axis=-1)
    return changed, jnp.sum(changed, dtype=jnp.int32)[None]
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(rowspec, rowspec),
                               out_specs=(rowspec, _flat_spec(mesh)), check_vma=False))


@functools.lru_cache(maxsize=256)
def _sharded_gather(mesh, rowspec, row_axes, n, pad):
  def f(changed, *ms):
    rows = int(np.prod(changed.shape))
    idx = jnp.nonzero(changed.reshape(-1), size=pad, fill_value=0)[0].astype(jnp.int32)
    return (idx, *[m.reshape(rows, *m.shape[row_axes:])[idx] for m in ms])
  flat = _flat_spec(mesh)
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(rowspec,) * (n + 1),
                               out_specs=(flat,) * (n + 1), check_vma=False))


@functools.partial(jax.jit, static_argnums=1)
def _global_fingerprint(members, row_axes):
  return _fingerprint(members, row_axes)


@jax.jit
def _global_diff(old, new):
  changed = jnp.any(old != new, axis=-1)
  return changed, jnp.sum(changed, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _global_gather(changed, members, pad, row_axes):
  rows = int(np.prod(changed.shape))
  idx = jnp.nonzero(changed.reshape(-1), size=pad, fill_value=0)[0].astype(jnp.int32)
  return idx, [m.reshape(rows, *m.shape[row_axes:])[idx] for m in members]


def _blocks(a, mesh, row_axes):
  """Per device of ``mesh`` (flat order): the start of its row block, or None when an earlier
  device holds the same block (a replica)."""
  index = a.sharding.devices_indices_map(a.shape)
  seen, out = set(), []
  for d in mesh.devices.flat:
    starts = tuple(sl.indices(a.shape[i])[0] for i, sl in enumerate(index[d][:row_axes]))
    out.append(None if starts in seen else starts)
    seen.add(starts)
  return out


# ---- fingerprints and deltas --------------------------------------------------------------------


@dataclasses.dataclass
class GroupFingerprints:
  """A group's fingerprints at the last save: [*rows, 2] uint32, laid out like its rows."""

  split: Any
  prints: Any


def fingerprint_group(group: RowGroup, arrays: Sequence[Any]) -> GroupFingerprints:
  split = _row_split(arrays, group.row_axes)
  if split is None:
    return GroupFingerprints(None, _global_fingerprint(list(arrays), group.row_axes))
  mesh, rowspec = split
  fn = _sharded_fingerprint(mesh, rowspec, group.row_axes, len(arrays))
  return GroupFingerprints(split, fn(*arrays))


@dataclasses.dataclass
class RowDelta:
  """Changed rows of one group: flat row indices (sorted) and each member's rows."""

  rows: np.ndarray                 # int64 [k]
  values: dict[str, np.ndarray]    # member path -> [k, *trailing]


def diff_group(group: RowGroup, arrays: Sequence[Any], old: GroupFingerprints
               ) -> tuple[RowDelta | None, GroupFingerprints]:
  """(delta of the rows changed since ``old``, new fingerprints). The delta is None when
  ``old`` was taken under another split (the caller then saves the group whole)."""
  new = fingerprint_group(group, arrays)
  if new.split != old.split or new.prints.shape != old.prints.shape:
    return None, new
  ra = group.row_axes
  if new.split is None:
    changed, count = _global_diff(old.prints, new.prints)
    k = int(count)
    rows, vals = np.zeros((0,), np.int64), [np.zeros((0, *np.shape(a)[ra:]), _np_dtype(a))
                                            for a in arrays]
    if k:
      idx, got = jax.device_get(_global_gather(changed, list(arrays), _pad(k), ra))
      rows = np.asarray(idx[:k], np.int64)
      vals = [np.asarray(g[:k]) for g in got]
    return RowDelta(rows, dict(zip(group.members, vals))), new
  mesh, rowspec = new.split
  changed, counts = _sharded_diff(mesh, rowspec)(old.prints, new.prints)
  counts = np.asarray(counts)
  blocks = _blocks(arrays[0], mesh, ra)
  live = [c for c, b in zip(counts, blocks) if b is not None]
  pad = _pad(max(live) if live else 1)
  rows, vals = [], [[] for _ in arrays]
  if any(live):
    out = jax.device_get(_sharded_gather(mesh, rowspec, ra, len(arrays), pad)(changed, *arrays))
    block_shape = tuple(group.row_shape[i] // _parts(mesh, rowspec[i]) for i in range(ra))
    for k, (c, b) in enumerate(zip(counts, blocks)):
      if b is None or not c:
        continue
      local = np.asarray(out[0][k * pad:k * pad + c])
      coords = np.unravel_index(local, block_shape)
      rows.append(np.ravel_multi_index([x + s for x, s in zip(coords, b)], group.row_shape))
      for j in range(len(arrays)):
        vals[j].append(np.asarray(out[1 + j][k * pad:k * pad + c]))
  if not rows:
    empty = {m: np.zeros((0, *np.shape(a)[ra:]), _np_dtype(a))
             for m, a in zip(group.members, arrays)}
    return RowDelta(np.zeros((0,), np.int64), empty), new
  r = np.concatenate(rows).astype(np.int64)
  order = np.argsort(r, kind="stable")
  return RowDelta(r[order], {m: np.concatenate(v)[order] for m, v in zip(group.members, vals)}
                  ), new


def _parts(mesh, entry) -> int:
  """How many blocks a PartitionSpec entry cuts an axis into."""
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[n] for n in names]))


def _np_dtype(a):
  return jax.random.key_data(a).dtype if tree_lib.is_key_array(a) else np.dtype(a.dtype)


# ---- applying deltas --------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _sharded_scatter(mesh, rowspec, row_axes, row_shape):
  num_rows = int(np.prod(row_shape))

  def f(x, rows, vals):
    local_shape = x.shape[:row_axes]
    coords = jnp.unravel_index(jnp.minimum(rows, num_rows - 1), row_shape)
    inside = rows < num_rows
    flat = jnp.zeros_like(rows)
    for i in range(row_axes):
      entry = rowspec[i]
      block = jnp.int32(0)
      for name in (() if entry is None else entry if isinstance(entry, tuple) else (entry,)):
        block = block * mesh.shape[name] + jax.lax.axis_index(name)
      c = coords[i] - block * local_shape[i]
      inside &= (c >= 0) & (c < local_shape[i])
      flat = flat * local_shape[i] + c
    n = int(np.prod(local_shape))
    flat = jnp.where(inside, flat, n)
    out = x.reshape(n, *x.shape[row_axes:]).at[flat].set(vals.astype(x.dtype), mode="drop")
    return out.reshape(x.shape)

  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(rowspec, P(), P()), out_specs=rowspec,
                               check_vma=False), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _global_scatter(x, rows, vals, row_axes):
  n = int(np.prod(x.shape[:row_axes]))
  out = x.reshape(n, *x.shape[row_axes:]).at[rows].set(vals.astype(x.dtype), mode="drop")
  return out.reshape(x.shape)


def apply_delta(array, row_axes: int, rows: np.ndarray, values: np.ndarray):
  """``array`` with flat rows ``rows`` (over its first ``row_axes`` dims) set to ``values``.

  numpy in, numpy out; a jax.Array keeps its sharding (split over a mesh: each device writes
  the rows of its own block).
  """
  if len(rows) == 0:
    return array
  row_shape = tuple(np.shape(array)[:row_axes])
  tail = tuple(np.shape(array)[row_axes:])
  num_rows = int(np.prod(row_shape))
  if not isinstance(array, jax.Array):
    out = np.array(array, copy=True).reshape(num_rows, *tail)
    out[rows] = values
    return out.reshape(row_shape + tail)
  if num_rows >= 2**31:
    raise NotImplementedError(f"incremental restore of an array with {num_rows} rows (int32)")
  k, pad = len(rows), _pad(len(rows))
  r = np.full((pad,), num_rows, np.int32)   # padding rows fall outside every block
  r[:k] = rows
  v = np.zeros((pad, *tail), values.dtype)
  v[:k] = values
  split = _row_split([array], row_axes)
  if split is None:
    out = _global_scatter(array, r, v, row_axes)
    return jax.device_put(out, array.sharding) if out.sharding != array.sharding else out
  mesh, rowspec = split
  return _sharded_scatter(mesh, rowspec, row_axes, row_shape)(array, r, v)
