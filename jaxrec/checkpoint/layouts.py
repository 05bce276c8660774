"""Physical layouts of sparse state, and how to move a snapshot from one layout to another.

A snapshot stores arrays the way the run held them (a stack's slab per device, a hash table
per shard): saving never reshuffles rows. A ``Layout`` attached to a state prefix describes
that physical arrangement as JSON; a restore whose target layout describes itself identically
reads the arrays straight onto the target shardings, and otherwise converts on the host:
saved physical -> logical (per table / per key) -> target physical. The same conversion serves
resharding (8 -> 4 -> 1 devices, a different hash-shard count: keys re-routed) and warm starts
(tables added: fresh; removed: ignored; reshaped: fresh, reported).

Layouts also say which arrays form row groups for incremental snapshots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class Layout(Protocol):
  """How the arrays under one state prefix are laid out (paths below are relative to it)."""

  def describe(self) -> dict:
    """JSON; two layouts with equal descriptions hold the same array at the same place."""

  def row_groups(self, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, list[str], int]]:
    """(name, member paths, row axes) of each group of arrays that change row by row."""

  def convert(self, saved: dict, arrays: dict[str, np.ndarray], template: dict[str, Any],
              partial: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """Arrays for ``template``'s paths (host numpy) from ``arrays`` saved under layout
    ``saved``, and report lines. ``partial``: tables the snapshot lacks (or holds in another
    shape) keep the template's values instead of raising."""


class LayoutMismatchError(ValueError):
  """The snapshot does not hold what the target needs (and warm start was not asked for)."""


def _host(x, fill=0.0) -> np.ndarray:
  """A template leaf as a writable host array (abstract leaves: ``fill``)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return np.full(x.shape, fill, dtype=np.dtype(x.dtype))
  return np.array(jax.device_get(x), copy=True)


# ---- stacked (fixed-size) tables of jaxrec.embedding.sharded ------------------------------------


def _piece_rows(stack: dict, piece: dict):
  """(device, slab row) of each row of a piece: row r lives on devices[r % n] at
  offsets[device] + r // n (stacked.py); replicated stacks: offset + r."""
  r = np.arange(piece["table_rows"])
  if stack["replicated"]:
    return None, piece["offset"] + r
  devs = np.asarray(piece["devices"])
  dev = devs[r % len(devs)]
  offs = np.asarray(piece["offsets"])
  return dev, offs[dev] + r // len(devs)


class StackedEmbeddingLayout:
  """The ``EmbeddingState`` of a ``ShardedEmbedding``: ``tables/<stack>`` and
  ``slots/<stack>/<slot>``, slab per device ([devices, rows, dim]) or replicated ([rows, dim])."""

  KIND = "jaxrec.stacked/v1"

  def __init__(self, emb):
    from jaxrec.embedding import optimizers  # the engine may be mid-change; import late
    stacks = {}
    for s in emb.stacks:
      pieces = []
      for i, p in enumerate(s.pieces):
        d = {"table": p.table.name, "block": p.block, "col0": p.col0, "dim": p.dim,
             "table_rows": p.table.rows, "table_dim": p.table.dim,
             "optimizer": p.table.optimizer.name}
        if s.replicated:
          d["offset"] = int(s.offsets[i])
        else:
          d["devices"] = [int(x) for x in p.devices]
          d["offsets"] = [int(x) for x in s.offsets[:, i]]
        pieces.append(d)
      stacks[s.name] = {
          "replicated": bool(s.replicated), "rows": int(s.rows), "dim": int(s.dim),
          "dtype": str(s.dtype), "pieces": pieces,
          "slots": {k: {"shape": list(shape), "init": float(v)} for k, (shape, v) in
                    optimizers.slot_shapes(s.optimizer, s.dim).items()}}
    self._desc = {"kind": self.KIND, "num_devices": int(emb.num_devices), "stacks": stacks}

  def describe(self) -> dict:
    return self._desc

  def row_groups(self, shapes):
    groups = []
    for name, s in self._desc["stacks"].items():
      members = [f"tables/{name}"] + [f"slots/{name}/{k}" for k in s["slots"]]
      members = [m for m in members if m in shapes]
      groups.append((name, members, 1 if s["replicated"] else 2))
    return groups

  @staticmethod
  def logical(desc: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """({table: [rows, dim]}, {table: {slot: [rows] or [rows, dim]}}, {table: optimizer})."""
    tables, slots, opts = {}, {}, {}
    for name, s in desc["stacks"].items():
      arr = arrays.get(f"tables/{name}")
      if arr is None:
        continue
      for p in s["pieces"]:
        dev, row = _piece_rows(s, p)
        pick = (lambda a: a[row]) if dev is None else (lambda a: a[dev, row])
        t = p["table"]
        if t not in tables:
          tables[t] = np.zeros((p["table_rows"], p["table_dim"]), arr.dtype)
        tables[t][:, p["col0"]:p["col0"] + p["dim"]] = pick(arr)
        opts[t] = p["optimizer"]
        for k in s["slots"]:
          v = arrays.get(f"slots/{name}/{k}")
          if v is None:
            continue
          vals = pick(v)
          ts = slots.setdefault(t, {})
          if vals.ndim == 1:  # row-wise slot: one value a row (equal in every column block)
            if p["block"] == 0:
              ts[k] = vals
          else:
            if k not in ts:
              ts[k] = np.zeros((p["table_rows"], p["table_dim"]), vals.dtype)
            ts[k][:, p["col0"]:p["col0"] + p["dim"]] = vals
    return tables, slots, opts

  def convert(self, saved, arrays, template, partial):
    if saved.get("kind") != self.KIND:
      raise LayoutMismatchError(f"snapshot layout {saved.get('kind')!r} is not {self.KIND!r}")
    tables, slots, opts = self.logical(saved, arrays)
    out, report, missing = {}, [], []
    seen = set()
    for name, s in self._desc["stacks"].items():
      tkey = f"tables/{name}"
      if tkey not in template:
        continue
      arr = _host(template[tkey])
      sl = {k: _host(template[f"slots/{name}/{k}"], v["init"])
            for k, v in s["slots"].items() if f"slots/{name}/{k}" in template}
      for p in s["pieces"]:
        t = p["table"]
        dev, row = _piece_rows(s, p)
        idx = (row,) if dev is None else (dev, row)
        src = tables.get(t)
        want = (p["table_rows"], p["table_dim"])
        if src is None or src.shape != want:
          why = ("new in this config" if src is None else
                 f"shape {list(src.shape)} in the snapshot, {list(want)} now")
          if t not in seen:
            missing.append(f"table {t}: {why}")
            report.append(f"table {t}: {why}; initialised fresh")
          seen.add(t)
          continue
        arr[idx] = src[:, p["col0"]:p["col0"] + p["dim"]].astype(arr.dtype)
        kept_slots = []
        for k, a in sl.items():
          v = slots.get(t, {}).get(k)
          if v is None or opts.get(t) != p["optimizer"]:
            continue
          if v.ndim == 1 and a.ndim == (1 if s["replicated"] else 2):
            a[idx] = v
          elif v.ndim == 2 and a.ndim == (2 if s["replicated"] else 3):
            a[idx] = v[:, p["col0"]:p["col0"] + p["dim"]]
          else:
            continue
          kept_slots.append(k)
        if t not in seen:
          fresh = sorted(set(sl) - set(kept_slots))
          report.append(f"table {t}: restored" + (
              f" (optimizer slots {fresh} fresh: optimizer {opts.get(t)} -> {p['optimizer']})"
              if fresh else ""))
        seen.add(t)
      out[tkey] = arr
      out.update({f"slots/{name}/{k}": a for k, a in sl.items()})
    report += _check_tables("embedding tables", "table", missing, sorted(set(tables) - seen),
                            partial)
    return out, report


# ---- dynamic hash tables, one per shard ---------------------------------------------------------


def route_hash32(name: str) -> Callable[[np.ndarray, int], np.ndarray]:
  """Owner shard of uint32 (lo, hi) keys: ``hash32(id, table salt) % n``, the routing of
  jaxrec.embedding.routing (so static and dynamic tables place IDs alike)."""
  from jaxrec.embedding import routing

  salt = np.uint32(routing.table_salt(name))

  def shard_of(pairs: np.ndarray, n: int) -> np.ndarray:
    h = np.asarray(routing.hash_u64_pair(jnp.asarray(pairs, jnp.uint32), salt))
    return (h % np.uint32(n)).astype(np.int64)

  return shard_of


_HASH_ROW_FIELDS = ("keys", "values", "frequency", "last_seen")


@functools.lru_cache(maxsize=16)
def _inserter(spec):
  """find_or_insert jitted once per table spec (restores of several layouts share it)."""
  from jaxrec.embedding import hash_table as ht
  return jax.jit(lambda st, k, v: ht.find_or_insert(spec, st, k, 0, v))


class HashShardsLayout:
  """A ``hash_table.HashTableState`` whose every leaf has a leading shard axis: shard ``i``
  owns the keys with ``shard_of(key, num_shards) == i``. A restore onto another shard count
  (or capacity) exports every live entry and re-inserts it on its new owner, keeping values,
  optimizer slots, frequency and last-seen step."""

  KIND = "jaxrec.hash_shards/v1"

  def __init__(self, spec, num_shards: int, shard_of: Callable | None = None,
               routing: str = "hash32_mod_n/v1"):
    self.spec = spec
    self.num_shards = int(num_shards)
    self.shard_of = shard_of or route_hash32(spec.name)
    self._desc = {"kind": self.KIND, "table": spec.name, "num_shards": self.num_shards,
                  "capacity": int(spec.capacity), "dim": int(spec.dim), "dtype": str(
                      np.dtype(spec.dtype)), "routing": routing,
                  "slots": {s.name: list(s.shape) for s in spec.slots},
                  "track_frequency": bool(spec.track_frequency),
                  "track_last_seen": bool(spec.track_last_seen)}

  def describe(self) -> dict:
    return self._desc

  def row_groups(self, shapes):
    rows = [f for f in _HASH_ROW_FIELDS if f in shapes and np.prod(shapes[f])]
    rows += sorted(p for p in shapes if p.startswith("slots/") and np.prod(shapes[p]))
    groups = [("entries", rows, 2)]
    if "buckets" in shapes:
      groups.append(("buckets", ["buckets"], 2))
    return groups

  @staticmethod
  def _entries(saved: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every live entry of every saved shard: keys [n, 2] and their per-row fields."""
    from jaxrec.embedding import hash_table as ht

    live = (arrays["buckets"][..., 2][..., None] >> np.arange(ht.SLOTS_PER_BUCKET,
                                                              dtype=np.uint32)) & 1
    live = live.reshape(live.shape[0], -1).astype(bool)  # [shards, capacity]
    out = {"keys": arrays["keys"][live]}
    for f in ("values", "frequency", "last_seen"):
      a = arrays.get(f)
      if a is not None and a.size:
        out[f] = a[live]
    for p, a in arrays.items():
      if p.startswith("slots/"):
        out[p] = a[live]
    return out

  def convert(self, saved, arrays, template, partial):
    from jaxrec.embedding import hash_table as ht

    if saved.get("kind") != self.KIND:
      raise LayoutMismatchError(f"snapshot layout {saved.get('kind')!r} is not {self.KIND!r}")
    name = self.spec.name
    if saved["dim"] != self.spec.dim:
      if not partial:
        raise LayoutMismatchError(f"hash table {name!r}: dim {saved['dim']} in the snapshot, "
                                  f"{self.spec.dim} now; restore with warm_start=True")
      return {}, [f"hash table {name}: dim {saved['dim']} -> {self.spec.dim}; initialised fresh"]
    spec = dataclasses.replace(self.spec, admission=None, on_full="reject")
    ent = self._entries(saved, arrays)
    n = len(ent["keys"])
    owner = self.shard_of(ent["keys"], self.num_shards) if n else np.zeros((0,), np.int64)
    shards, report = [], []
    insert = _inserter(spec)
    most = max([int((owner == i).sum()) for i in range(self.num_shards)] + [1])
    chunk = min(1 << 14, 1 << (most - 1).bit_length())  # one compile, no more than 16k keys
    for i in range(self.num_shards):
      mine = np.nonzero(owner == i)[0]
      st = ht.init(spec)
      rows = np.zeros((len(mine),), np.int32)
      for c in range(0, len(mine), chunk):
        sel = mine[c:c + chunk]
        keys = np.zeros((chunk, 2), np.uint32)
        keys[:len(sel)] = ent["keys"][sel]
        valid = np.arange(chunk) < len(sel)
        st, r, _ = insert(st, keys, valid)
        rows[c:c + len(sel)] = np.asarray(r)[:len(sel)]
      if (rows < 0).any():
        raise LayoutMismatchError(
            f"hash table {spec.name!r}: shard {i} of {self.num_shards} cannot hold its "
            f"{len(mine)} keys at capacity {spec.capacity} ({int((rows < 0).sum())} rejected); "
            "restore onto more shards or a larger capacity")
      st = jax.device_get(st)
      fields = {f: np.array(getattr(st, f), copy=True) for f in
                ("buckets", "keys", "values", "frequency", "last_seen", "sketch", "size")}
      slots = {k: np.array(v, copy=True) for k, v in st.slots.items()}
      for f in ("values", "frequency", "last_seen"):
        if f in ent and fields[f].size:
          fields[f][rows] = ent[f][mine]
      for k in slots:
        src = ent.get(f"slots/{k}")
        if src is not None and src.shape[1:] == slots[k].shape[1:]:
          slots[k][rows] = src[mine]
      shards.append((fields, slots))
    out = {f: np.stack([s[0][f] for s in shards]) for f in shards[0][0]}
    for k in shards[0][1]:
      out[f"slots/{k}"] = np.stack([s[1][k] for s in shards])
    if "sketch" in arrays and arrays["sketch"].shape[1:] == out["sketch"].shape[1:]:
      # Count-min counts of keys now spread over other shards: the sum over-counts, which is
      # what a count-min sketch may do (admission can only come earlier, never be lost).
      out["sketch"] = np.broadcast_to(arrays["sketch"].sum(0), out["sketch"].shape).copy()
    report.append(f"hash table {spec.name}: {n} keys re-routed from {saved['num_shards']} to "
                  f"{self.num_shards} shards (capacity {saved['capacity']} -> {spec.capacity})")
    fresh = sorted(k for k in self._desc["slots"] if saved["slots"].get(k) !=
                   self._desc["slots"][k])
    if fresh:
      report.append(f"hash table {spec.name}: optimizer slots {fresh} initialised fresh")
    out = {p: a for p, a in out.items() if p in template}
    return out, report


class DynamicEmbeddingLayout:
  """The state of a ``jaxrec.embedding.dynamic.DynamicEmbedding``: ``{table: HashTableState}``
  with a leading device axis on every leaf, keys owned by ``hash32(id, salt) % devices``."""

  KIND = "jaxrec.dynamic/v1"

  def __init__(self, emb):
    self.tables = {n: HashShardsLayout(spec, emb.num_devices) for n, spec in emb.specs.items()}
    self._desc = {"kind": self.KIND,
                  "tables": {n: l.describe() for n, l in self.tables.items()}}
    # Trainable default rows (``DEFAULTS/<table>/...``): replicated, the same on any mesh.
    self.defaults = tuple(getattr(emb, "trainable_default", ()))
    if self.defaults:
      self._desc["default_rows"] = list(self.defaults)

  def describe(self) -> dict:
    return self._desc

  def row_groups(self, shapes):
    out = []
    for n, layout in self.tables.items():
      sub = {p[len(n) + 1:]: s for p, s in shapes.items() if p.startswith(n + "/")}
      out += [(f"{n}:{g}", [f"{n}/{m}" for m in members], ra)
              for g, members, ra in layout.row_groups(sub)]
    return out

  def convert(self, saved, arrays, template, partial):
    if saved.get("kind") != self.KIND:
      raise LayoutMismatchError(f"snapshot layout {saved.get('kind')!r} is not {self.KIND!r}")
    out, report, missing = {}, [], []
    for n, layout in self.tables.items():
      sub = lambda d: {p[len(n) + 1:]: x for p, x in d.items() if p.startswith(n + "/")}
      if n not in saved["tables"]:
        missing.append(f"hash table {n}: new in this config")
        report.append(f"hash table {n}: new in this config; starts empty")
        continue
      if saved["tables"][n] == layout.describe():
        conv, rep = sub(arrays), [f"hash table {n}: restored"]
      else:
        conv, rep = layout.convert(saved["tables"][n], sub(arrays), sub(template), partial)
      out.update({f"{n}/{p}": a for p, a in conv.items()})
      report += rep
    report += _check_tables("dynamic tables", "hash table", missing,
                            sorted(set(saved["tables"]) - set(self.tables)), partial)
    from jaxrec.embedding.dynamic import DEFAULTS
    saved_defaults = set(saved.get("default_rows", ()))
    for n in self.defaults:
      prefix = f"{DEFAULTS}/{n}/"
      if n not in saved_defaults:
        if not partial:
          raise LayoutMismatchError(f"hash table {n}: the snapshot has no trainable default "
                                    "row; restore with warm_start=True to start it at zero")
        report.append(f"hash table {n}: default row not in the snapshot; starts at zero")
        continue
      for p, a in arrays.items():
        if p.startswith(prefix) and p in template and np.shape(a) == np.shape(template[p]):
          out[p] = a
      report.append(f"hash table {n}: default row restored")
    return out, report


class MixedEmbeddingLayout:
  """The state of a ``jaxrec.embedding.mixed.MixedEmbedding``: ``{"static": ...}`` under the
  static engine's layout and ``{"dynamic": ...}`` under the dynamic one's; each part converts
  on its own (a part whose description is unchanged is taken as saved)."""

  KIND = "jaxrec.mixed/v1"

  def __init__(self, emb):
    self.parts = {"static": StackedEmbeddingLayout(emb.static),
                  "dynamic": DynamicEmbeddingLayout(emb.dynamic)}
    self._desc = {"kind": self.KIND, **{k: l.describe() for k, l in self.parts.items()}}

  def describe(self) -> dict:
    return self._desc

  def row_groups(self, shapes):
    out = []
    for k, layout in self.parts.items():
      sub = {p[len(k) + 1:]: s for p, s in shapes.items() if p.startswith(k + "/")}
      out += [(f"{k}:{g}", [f"{k}/{m}" for m in members], ra)
              for g, members, ra in layout.row_groups(sub)]
    return out

  def convert(self, saved, arrays, template, partial):
    if saved.get("kind") != self.KIND:
      raise LayoutMismatchError(f"snapshot layout {saved.get('kind')!r} is not {self.KIND!r}; "
                                "a model that mixes static and dynamic tables restores only "
                                "from one that did")
    out, report = {}, []
    for k, layout in self.parts.items():
      sub = lambda d: {p[len(k) + 1:]: x for p, x in d.items() if p.startswith(k + "/")}
      if saved[k] == layout.describe():
        conv, rep = sub(arrays), []
      else:
        conv, rep = layout.convert(saved[k], sub(arrays), sub(template), partial)
      out.update({f"{k}/{p}": a for p, a in conv.items()})
      report += [f"{k}: {r}" for r in rep]
    return out, report



def _check_tables(what: str, noun: str, missing: list[str], dropped: list[str], partial: bool
                  ) -> list[str]:
  """Report lines for tables only the snapshot has; without ``partial`` (a warm start) any
  table present on one side only is an error that names it."""
  if not partial and (missing or dropped):
    raise LayoutMismatchError(
        f"{what} differ between the snapshot and this config: "
        + "; ".join(missing + [f"{noun} {t}: not in this config" for t in dropped])
        + ". Restore with warm_start=True to keep the tables that match")
  return [f"{noun} {t}: in the snapshot, not in this config; ignored" for t in dropped]

def layout_for(emb) -> Layout:
  """The layout of an embedding engine's state (static stacks or dynamic hash tables)."""
  if getattr(emb, "is_mixed", False):
    return MixedEmbeddingLayout(emb)
  if getattr(emb, "is_dynamic", False):
    return DynamicEmbeddingLayout(emb)
  return StackedEmbeddingLayout(emb)
