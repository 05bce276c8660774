"""Consistent, crash-safe, incremental snapshots of a training run, on Orbax's CheckpointManager.

A *version* is one Orbax step directory holding everything from one step: every leaf of the
state pytree (dense params, optax state, embedding tables and slots, hash-table keys and
metadata, RNG keys...), the data position, and JSON metadata. Layout::

  <workdir>/checkpoints/
    <step>/                      one version (Orbax step directory, published by atomic rename)
      dense/                     Orbax PyTree item: arrays saved whole every time
      tables/                    Orbax PyTree item: row-group arrays (full version) or the rows
                                 changed since the previous version (incremental version)
      meta/metadata              Orbax JSON item: step, kind, chain, data position, layouts...
      MANIFEST.json              sizes + CRC32 of every data file (written before the rename)
    rolled_back/<step>[.<uid>]   versions set aside by a rollback (kept until ``prune``)
    trash/                       versions retention dropped (emptied by the next save)

A full version restores alone; an incremental one restores as its chain: the full version it
builds on, then every increment up to it, in order (``meta["chain"]``). Retention keeps the
latest N versions (Orbax ``LatestN``, optionally plus ``BestN`` by a metric) and every version
their chains need.

Crash safety: Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames; our manifest is
written inside the temporary directory first, so a published version always has one, and a
version without one (or with a missing chain member) is never listed or restored. Retention
deletes by renaming into ``trash/`` (atomic), so a kill during deletion leaves no half version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as ocm

from jaxrec.checkpoint import incremental, manifest
from jaxrec.checkpoint import tree as tree_lib
from jaxrec.checkpoint.layouts import Layout, LayoutMismatchError
from jaxrec.checkpoint.manifest import CorruptCheckpointError
from jaxrec.checkpoint.versions import (META_FORMAT, TRASH, NoCheckpointError, Version,
                                        read_meta, step_dirs, list_versions, rollback)

_TMP_MARK = ".orbax-checkpoint-tmp"
_EMPTY = "__empty__"


@dataclasses.dataclass(frozen=True)
class SnapshotOptions:
  """How often and what to save, and what to keep.

  save_every_steps: a version every N steps (Orbax ``FixedIntervalPolicy``; step 0 included).
  keep_latest: versions kept (Orbax ``LatestN``), plus the versions their chains need.
  keep_best: additionally keep the best N by ``best_metric`` (``metrics=`` of ``save``).
  incremental: between full versions, save only the rows that changed.
  full_every: at most this many versions per chain (a full one and its increments).
  max_dirty_fraction: an increment touching more rows than this saves a full version instead.
  min_row_group_bytes: row groups smaller than this are saved whole in every version.
  track_other_arrays: also row-track big arrays outside every layout (along axis 0). Off by
    default: dense weights change everywhere every step, so diffing them only costs time.
  checksums: CRC32 every file in the manifest (else sizes only).
  verify: what restore checks before reading: "checksum", "size" or "none".
  """

  save_every_steps: int = 1000
  keep_latest: int = 3
  keep_best: int = 0
  best_metric: str = "auc"
  best_mode: str = "max"
  incremental: bool = True
  full_every: int = 8
  max_dirty_fraction: float = 0.5
  min_row_group_bytes: int = 1 << 20
  track_other_arrays: bool = False
  checksums: bool = True
  verify: str = "checksum"

  def __post_init__(self):
    if self.keep_latest < 1:
      raise ValueError(f"SnapshotOptions.keep_latest={self.keep_latest}: keep at least 1")
    if self.verify not in ("checksum", "size", "none"):
      raise ValueError(f"SnapshotOptions.verify={self.verify!r}; expected checksum, size, none")
    if self.best_mode not in ("max", "min"):
      raise ValueError(f"SnapshotOptions.best_mode={self.best_mode!r}; expected max or min")
    if self.full_every < 1:
      raise ValueError(f"SnapshotOptions.full_every={self.full_every}: must be >= 1")


@dataclasses.dataclass
class Restored:
  """What ``restore`` gives back: the state and where the run was."""

  state: Any
  step: int | None
  data_position: Any
  metadata: dict
  report: list[str]
  version: Version | None


@dataclasses.dataclass(frozen=True)
class SaveInfo:
  step: int
  kind: str
  dirty_rows: int
  total_rows: int
  seconds: float                   # blocking part (fingerprints, delta gather, device->host)


# ---- retention -----------------------------------------------------------------------------


class _KeepChains:
  """Orbax preservation policy: ``inner``'s choice plus every version a kept one builds on."""

  def __init__(self, inner, deps: dict[int, tuple[int, ...]]):
    self.inner = inner
    self.deps = deps

  def should_preserve(self, checkpoints, *, context):
    keep = list(self.inner.should_preserve(checkpoints, context=context))
    need = set()
    for c, k in zip(checkpoints, keep):
      if k:
        need.update(self.deps.get(c.step, ()))
    return [bool(k) or c.step in need for c, k in zip(checkpoints, keep)]


# ---- the manager ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
  groups: list[incremental.RowGroup]
  dense: list[str]
  signature: str


@dataclasses.dataclass
class _Parent:
  step: int
  chain: list                      # [[step, uid], ...] ending with this version
  signature: str


def _to_host_key(x):
  """PRNG keys are saved as their raw bits (restored with wrap_key_data)."""
  return jax.random.key_data(x) if tree_lib.is_key_array(x) else x


def _json_roundtrip(x, what: str):
  try:
    return json.loads(json.dumps(x))
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint {what} must be JSON-serialisable: {e}") from None


class Checkpointer:
  """Saves and restores versions of a training state under ``directory``.

  ``layouts`` maps state prefixes (``"emb"``) to their ``Layout`` (see layouts.py): what makes
  resharding, warm starts and row groups possible for them. Leaves outside every layout are
  matched by path and saved whole (or row-tracked along axis 0: ``track_other_arrays``).
  """

  def __init__(self, directory: str, options: SnapshotOptions | None = None,
               layouts: Mapping[str, Layout] | None = None, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.options = options or SnapshotOptions()
    self.layouts = dict(layouts or {})
    self.read_only = read_only
    self._descs = {p: _json_roundtrip(l.describe(), f"layout of {p!r}")
                   for p, l in self.layouts.items()}
    if read_only:
      if not os.path.isdir(self.directory):
        raise NoCheckpointError(f"checkpoint directory {self.directory} does not exist")
    else:
      os.makedirs(self.directory, exist_ok=True)
      self._set_aside_incomplete()
    self._deps: dict[int, tuple[int, ...]] = {}
    for v in list_versions(self.directory):
      if v.ok:
        self._deps[v.step] = v.chain[:-1]
    self._mgr = self._make_manager()
    self._parent: _Parent | None = None
    self._prints: dict[str, incremental.GroupFingerprints] | None = None
    self._plan_cache: tuple[Any, _Plan] | None = None
    self._pending: dict | None = None
    self.extra_metadata: dict = {}

  # -- setup --

  def _make_manager(self) -> ocp.CheckpointManager:
    o = self.options
    inner = ocm.LatestN(o.keep_latest)
    if o.keep_best:
      metric = o.best_metric
      inner = ocm.AnyPreservationPolicy([inner, ocm.BestN(
          get_metric_fn=lambda m: m[metric], reverse=o.best_mode == "min", n=o.keep_best,
          keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocm.FixedIntervalPolicy(o.save_every_steps),
        preservation_policy=_KeepChains(inner, self._deps),
        cleanup_tmp_directories=not self.read_only,
        read_only=self.read_only,
        create=not self.read_only,
        todelete_subdir=TRASH,  # deletion is a rename: a kill never leaves half a version
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
    handlers = {"dense": ocp.PyTreeCheckpointHandler(), "tables": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

  def _set_aside_incomplete(self):
    """Published versions without manifest or metadata (not written by a finished save of
    ours) go to the trash, so Orbax's own view never counts them."""
    for s, d in step_dirs(self.directory).items():
      if manifest.read(d) is None or read_meta(d) is None:
        dest = os.path.join(self.directory, TRASH, f"{s}.incomplete.{uuid.uuid4().hex[:8]}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(d, dest)
        logging.warning("checkpoint version %s is incomplete (no manifest); moved to %s", d, dest)

  def _empty_trash(self):
    shutil.rmtree(os.path.join(self.directory, TRASH), ignore_errors=True)

  # -- plans and signatures --

  def _layout_of(self, path: str) -> str | None:
    for p in self.layouts:
      if tree_lib.under(path, p):
        return p
    return None

  def _plan(self, flat: dict) -> _Plan:
    key = tuple((p, tuple(np.shape(x)), str(getattr(x, "dtype", ""))) for p, x in flat.items())
    if self._plan_cache is not None and self._plan_cache[0] == key:
      return self._plan_cache[1]
    groups, grouped = [], set()
    for prefix, layout in self.layouts.items():
      shapes = {tree_lib.rel(p, prefix): tuple(np.shape(x)) for p, x in flat.items()
                if tree_lib.under(p, prefix)}
      for name, members, ra in layout.row_groups(shapes):
        full = [f"{prefix}/{m}" if prefix else m for m in members]
        if not full:
          continue
        rshapes = {tuple(np.shape(flat[m]))[:ra] for m in full}
        if len(rshapes) != 1:
          raise ValueError(f"layout of {prefix!r}: row group {name!r} has members with "
                           f"different row shapes {rshapes}")
        rs = rshapes.pop()
        nb = sum(tree_lib.nbytes(flat[m]) for m in full)
        if nb >= self.options.min_row_group_bytes and int(np.prod(rs)) > 1:
          groups.append(incremental.RowGroup(f"{prefix}:{name}", tuple(full), ra, rs))
          grouped.update(full)
    for p, x in flat.items():
      if (self.options.track_other_arrays and p not in grouped and self._layout_of(p) is None
          and np.ndim(x) >= 1
          and tree_lib.nbytes(x) >= self.options.min_row_group_bytes and np.shape(x)[0] > 1):
        groups.append(incremental.RowGroup(p, (p,), 1, tuple(np.shape(x)[:1])))
        grouped.add(p)
    dense = [p for p in flat if p not in grouped]
    sig_doc = {"leaves": [list(k) for k in key], "groups": [g.to_json() for g in groups],
               "layouts": self._descs}
    sig = hashlib.sha256(json.dumps(sig_doc, sort_keys=True).encode()).hexdigest()[:16]
    plan = _Plan(groups, dense, sig)
    self._plan_cache = (key, plan)
    return plan

  # -- saving --

  def should_save(self, step: int) -> bool:
    return self._mgr.should_save(int(step))

  def save(self, step: int, state, *, data_position=None, metadata: dict | None = None,
           metrics: dict | None = None, force: bool = False, full: bool | None = None
           ) -> SaveInfo | None:
    """Starts an async save of ``state`` as version ``step`` when the policy says so (or
    ``force``); returns None when nothing was saved. The state may be donated right after."""
    step = int(step)
    if step in self._mgr.all_steps():
      return None
    if not force and not self._mgr.should_save(step):
      return None
    t0 = time.perf_counter()
    data_position = _json_roundtrip(data_position, "data_position")
    metadata = _json_roundtrip({**self.extra_metadata, **(metadata or {})}, "metadata")
    metrics = _json_roundtrip(metrics, "metrics") if metrics is not None else None
    try:
      self._mgr.check_for_errors()
    except Exception:
      self._parent, self._prints = None, None  # the failed version cannot be built upon
      raise
    self._empty_trash()
    flat, _ = tree_lib.flatten(state)
    plan = self._plan(flat)
    parent = self._parent
    o = self.options
    incremental_ok = o.incremental and jax.process_count() == 1  # deltas are gathered locally
    if full is None:
      full = (not incremental_ok or parent is None or self._prints is None
              or parent.signature != plan.signature or len(parent.chain) >= o.full_every)
    prints, deltas, dirty = {}, {}, 0
    total = sum(g.num_rows for g in plan.groups)
    if not full:
      for g in plan.groups:
        d, prints[g.name] = incremental.diff_group(g, [flat[m] for m in g.members],
                                                   self._prints[g.name])
        if d is None:
          full = True
          break
        deltas[g.name] = d
        dirty += len(d.rows)
      if not full and total and dirty > o.max_dirty_fraction * total:
        full = True
    if incremental_ok:
      for g in plan.groups:
        if g.name not in prints:
          prints[g.name] = incremental.fingerprint_group(g, [flat[m] for m in g.members])
    uid = uuid.uuid4().hex
    chain = [[step, uid]] if full else parent.chain + [[step, uid]]
    kind = "full" if full else "incremental"
    # Orbax cannot write empty arrays: their shape and dtype in meta["leaves"] suffice.
    dense_items = {p: _to_host_key(flat[p]) for p in plan.dense if np.size(flat[p])} or {
        _EMPTY: np.zeros((1,), np.int8)}
    if full:
      table_items = {m: _to_host_key(flat[m]) for g in plan.groups for m in g.members}
    else:
      table_items = {}
      for gi, g in enumerate(plan.groups):
        d = deltas[g.name]
        if not len(d.rows):
          continue  # Orbax cannot write empty arrays; meta["delta_rows"] says 0
        table_items[f"delta/{gi}/rows"] = d.rows.astype(_index_dtype(g.num_rows))
        for mi, m in enumerate(g.members):
          table_items[f"delta/{gi}/{mi}"] = d.values[m]
    table_items = table_items or {_EMPTY: np.zeros((1,), np.int8)}
    meta = {
        "format": META_FORMAT, "step": step, "uid": uid, "kind": kind, "chain": chain,
        "signature": plan.signature, "data_position": data_position, "metadata": metadata,
        "metrics": metrics, "created": time.time(), "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "leaves": {p: tree_lib.shape_dtype(x) for p, x in flat.items()},
        "dense": plan.dense, "groups": [g.to_json() for g in plan.groups],
        "layouts": self._descs,
        "delta_rows": {g.name: int(len(deltas[g.name].rows)) for g in plan.groups} if not full
        else None,
    }
    self._deps[step] = tuple(c[0] for c in chain[:-1])
    # One save in flight at a time (Orbax would wait too): the manifest hook reads _pending.
    self._mgr.wait_until_finished()
    self._pending = {"step": step, "uid": uid, "kind": kind,
                     "chain": [c[0] for c in chain]}
    self._mgr.save(step, args=ocp.args.Composite(
        dense=ocp.args.PyTreeSave(dense_items), tables=ocp.args.PyTreeSave(table_items),
        meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
    self._parent = _Parent(step, chain, plan.signature)
    self._prints = prints if incremental_ok else None
    info = SaveInfo(step, kind, dirty if not full else total, total, time.perf_counter() - t0)
    logging.info("checkpoint: %s version %d started (%d/%d rows, %.2fs blocking)", kind, step,
                 info.dirty_rows, total, info.seconds)
    return info

  def _write_manifest(self):
    """Orbax's post-finalisation hook (background thread, before the publishing rename)."""
    p = self._pending
    if p is None:
      return
    tmp = [os.path.join(self.directory, n) for n in os.listdir(self.directory)
           if n.startswith(f"{p['step']}{_TMP_MARK}")]
    vdir = tmp[0] if tmp else os.path.join(self.directory, str(p["step"]))
    manifest.write(vdir, {"step": p["step"], "uid": p["uid"], "kind": p["kind"],
                          "chain": p["chain"]}, checksums=self.options.checksums)

  def wait_until_finished(self):
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.close()

  # -- listing and rollback --

  def versions(self, verify: str = "none") -> list[Version]:
    return [v for v in list_versions(self.directory, verify) if v.ok]

  def latest(self, before: int | None = None) -> Version | None:
    vs = [v for v in self.versions() if before is None or v.step < before]
    return vs[-1] if vs else None

  def rollback(self, to: int | None = None, back: int | None = None) -> int:
    """See module-level ``rollback``; also resyncs Orbax's view of the directory."""
    self.wait_until_finished()
    step = rollback(self.directory, to=to, back=back)
    self._mgr.reload()
    self._deps.clear()
    for v in list_versions(self.directory):
      if v.ok:
        self._deps[v.step] = v.chain[:-1]
    self._parent, self._prints = None, None
    return step

  # -- restoring --

  def restore(self, target, *, step: int | None = None, warm_start: bool = False
              ) -> Restored:
    """The newest restorable version (or ``step``) read into ``target``'s structure and
    shardings (a pytree of jax.Arrays or ShapeDtypeStructs with shardings).

    A version that fails verification or reading is logged and skipped for the previous one
    (unless ``step`` was given). ``warm_start``: leaves and tables the snapshot lacks or holds
    in another shape keep ``target``'s values (which must then be concrete), snapshot entries
    the target lacks are ignored; everything is listed in ``Restored.report``.
    """
    self.wait_until_finished()
    versions = list_versions(self.directory)
    by_step = {v.step: v for v in versions}
    if step is not None:
      if step not in by_step:
        raise NoCheckpointError(f"checkpoint version {step} not found in {self.directory}; "
                                f"restorable: {[v.step for v in versions if v.ok]}")
      cands = [by_step[step]]
    else:
      cands = [v for v in reversed(versions) if v.ok]
    if not cands:
      raise NoCheckpointError(f"no restorable checkpoint version in {self.directory}")
    failures = []
    for v in cands:
      if not v.ok:
        raise CorruptCheckpointError(f"checkpoint version {v.path}: {v.status}")
      try:
        return self._restore_version(v, by_step, target, warm_start)
      except CorruptCheckpointError as e:
        if step is not None:
          raise
        failures.append(str(e))
        logging.error("%s; falling back to the previous version", e)
        print(f"jaxrec.checkpoint: {e}; falling back to the previous version", flush=True)
    raise CorruptCheckpointError("no checkpoint version could be restored:\n  "
                                 + "\n  ".join(failures))

  def restore_or_init(self, state, **kw) -> Restored:
    """``restore`` into ``state`` if any version exists, else ``state`` itself at no step."""
    if not self.versions():
      return Restored(state, None, None, {}, ["no checkpoint: starting fresh"], None)
    return self.restore(state, **kw)

  def _restore_version(self, v: Version, by_step: dict, target, warm_start: bool) -> Restored:
    metas = []
    for s in v.chain:
      cv = by_step.get(s)
      if cv is None or not cv.ok:
        raise CorruptCheckpointError(f"checkpoint version {v.path}: chain member {s} missing")
      manifest.verify(cv.path, self.options.verify)
      m = read_meta(cv.path)
      if m is None:
        raise CorruptCheckpointError(f"checkpoint version {cv.path}: unreadable metadata")
      metas.append(m)
    last = metas[-1]
    tflat, treedef = tree_lib.flatten(target)
    saved_leaves = last["leaves"]
    saved_layouts = last.get("layouts") or {}
    relayout = {p: saved_layouts[p] for p in self.layouts
                if p in saved_layouts and saved_layouts[p] != self._descs[p]}
    report, problems = [], []

    def in_relayout(path):
      return any(tree_lib.under(path, p) for p in relayout)

    # Which saved leaves to read, and how: straight onto a target sharding, or to the host.
    direct, host = {}, {}
    for p, x in tflat.items():
      if in_relayout(p):
        continue
      s = saved_leaves.get(p)
      want = tree_lib.shape_dtype(x)
      if s is None:
        problems.append((p, "not in the snapshot", True))
      elif s["shape"] != want["shape"]:
        problems.append((p, f"shape {s['shape']} in the snapshot, {want['shape']} now", True))
      elif s["dtype"] != want["dtype"]:
        host[p] = s
        report.append(f"{p}: dtype {s['dtype']} -> {want['dtype']}")
      else:
        direct[p] = x
    for p in saved_leaves:
      if in_relayout(p):
        host[p] = saved_leaves[p]
      elif p not in tflat:
        problems.append((p, "in the snapshot, not in the target", False))
    if problems and not warm_start:
      raise LayoutMismatchError(
          f"checkpoint version {v.path} does not match the state to restore:\n  "
          + "\n  ".join(f"{p}: {q}" for p, q, _ in problems[:20])
          + ("\n  ..." if len(problems) > 20 else "")
          + "\nRestore with warm_start=True to keep what matches")
    report += [f"{p}: {q} (" + ("kept the initial value" if kept else "ignored") + ")"
               for p, q, kept in problems]
    abstract = [p for p, _, kept in problems
                if kept and isinstance(tflat[p], jax.ShapeDtypeStruct)]
    if abstract:
      raise LayoutMismatchError(
          f"warm start from {v.path}: {abstract[:5]} are not in the snapshot (or changed shape), "
          "so they keep the target's values, but the target is abstract there; pass a "
          "freshly initialised state")
    try:
      values = self._read_chain(v, metas, direct, host)
    except (CorruptCheckpointError, LayoutMismatchError):
      raise
    except Exception as e:  # tensorstore/Orbax read errors of damaged files
      raise CorruptCheckpointError(f"checkpoint version {v.path}: reading failed: "
                                   f"{type(e).__name__}: {e}") from e

    out = {}
    for p, x in tflat.items():
      if p in values and p in direct and isinstance(values[p], jax.Array):
        out[p] = values[p]
      elif p in values and not in_relayout(p):
        out[p] = _place(values[p], x)
      elif not in_relayout(p):
        out[p] = x  # warm start: the target's own value
    for prefix, saved_desc in relayout.items():
      arrays = {tree_lib.rel(p, prefix): values[p] for p in host if tree_lib.under(p, prefix)}
      tmpl = {tree_lib.rel(p, prefix): x for p, x in tflat.items() if tree_lib.under(p, prefix)}
      conv, rep = self.layouts[prefix].convert(saved_desc, arrays, tmpl, partial=warm_start)
      report += [f"{prefix}: {r}" for r in rep]
      for r, x in tmpl.items():
        p = f"{prefix}/{r}" if prefix else r
        out[p] = _place(conv[r], x) if r in conv else x
    state = tree_lib.unflatten(treedef, tflat.keys(), out)

    # The next save may build on this version if nothing about the layout changed.
    plan = self._plan(out)
    if (self.options.incremental and jax.process_count() == 1 and not relayout
        and not problems and plan.signature == last["signature"]):
      self._parent = _Parent(v.step, last["chain"], plan.signature)
      self._prints = {g.name: incremental.fingerprint_group(g, [out[m] for m in g.members])
                      for g in plan.groups}
    else:
      self._parent, self._prints = None, None
    newer = [s for s in by_step if s > v.step]
    if newer:
      logging.warning("restored version %d while newer versions %s exist: saves at or before "
                      "their steps are skipped; rollback(to=%d) sets them aside", v.step, newer,
                      v.step)
    if report:
      logging.info("checkpoint restore of version %d:\n  %s", v.step, "\n  ".join(report))
    return Restored(state, v.step, last.get("data_position"), last.get("metadata") or {},
                    report, v)

  def _read_chain(self, v: Version, metas: list[dict], direct: dict, host: dict) -> dict:
    """Leaf values (jax arrays for ``direct``, numpy for ``host``) of version ``v``: the last
    member's dense item, the full member's tables, and every increment's rows applied."""
    last = metas[-1]
    dense_set = set(last["dense"])
    wanted = {**{p: ("direct", x) for p, x in direct.items()},
              **{p: ("host", s) for p, s in host.items()}}

    def args_for(paths, meta_leaves):
      item, rargs = {}, {}
      for p in paths:
        how, x = wanted[p]
        s = meta_leaves[p]
        dt = _storage_dtype(s["dtype"])
        shape = _storage_shape(s)
        if not np.prod(shape):
          values[p] = np.zeros(shape, dt)  # never written (empty)
          continue
        if how == "direct" and isinstance(getattr(x, "sharding", None), jax.sharding.Sharding):
          item[p] = jax.ShapeDtypeStruct(shape, dt, sharding=x.sharding)
          rargs[p] = ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=shape, dtype=dt)
        else:
          item[p] = jax.ShapeDtypeStruct(shape, dt)
          rargs[p] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dt)
      return item, rargs

    def read(step, name, item, rargs):
      if not item:
        return {}
      got = self._mgr.restore(step, args=ocp.args.Composite(**{name: ocp.args.PyTreeRestore(
          item=item, restore_args=rargs, partial_restore=True)}))
      return dict(got[name])

    values = {}
    dense_paths = [p for p in wanted if p in dense_set]
    item, rargs = args_for(dense_paths, last["leaves"])
    values.update(read(v.step, "dense", item, rargs))
    # Row groups: the full member's arrays, then each increment's rows in order.
    base = metas[0]
    groups = [incremental.RowGroup.from_json(g) for g in last["groups"]]
    table_paths = [p for g in groups for p in g.members if p in wanted]
    item, rargs = args_for(table_paths, base["leaves"])
    values.update(read(v.chain[0], "tables", item, rargs))
    for cstep, m in zip(v.chain[1:], metas[1:]):
      mg = [incremental.RowGroup.from_json(g) for g in m["groups"]]
      if [g.to_json() for g in mg] != [g.to_json() for g in groups]:
        raise CorruptCheckpointError(f"checkpoint version {cstep}: row groups differ from its "
                                     "chain's")
      item, rargs = {}, {}
      for gi, g in enumerate(mg):
        need = [mi for mi, p in enumerate(g.members) if p in wanted]
        if not need or not m["delta_rows"][g.name]:
          continue
        k = m["delta_rows"][g.name]
        idt = _index_dtype(g.num_rows)
        item[f"delta/{gi}/rows"] = jax.ShapeDtypeStruct((k,), idt)
        rargs[f"delta/{gi}/rows"] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=idt)
        for mi in need:
          s = m["leaves"][g.members[mi]]
          shape = (k, *s["shape"][g.row_axes:])
          dt = _storage_dtype(s["dtype"])
          item[f"delta/{gi}/{mi}"] = jax.ShapeDtypeStruct(shape, dt)
          rargs[f"delta/{gi}/{mi}"] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dt)
      got = read(cstep, "tables", item, rargs)
      for gi, g in enumerate(mg):
        rows = got.get(f"delta/{gi}/rows")
        if rows is None:
          continue
        for mi, p in enumerate(g.members):
          if f"delta/{gi}/{mi}" in got:
            values[p] = incremental.apply_delta(values[p], g.row_axes,
                                                np.asarray(rows, np.int64),
                                                got[f"delta/{gi}/{mi}"])
    # Keys were saved as raw bits; dtypes the target wants differently are cast.
    for p, (how, x) in wanted.items():
      s = (last["leaves"] if p in dense_set else base["leaves"])[p]
      if s["dtype"].startswith("key<") and p in values:
        impl = s["dtype"][4:-1]
        values[p] = jax.random.wrap_key_data(values[p], impl=impl)
    return values


def _index_dtype(num_rows: int):
  """Row indices of an increment: int32 when they fit (4 bytes a row less)."""
  return np.dtype(np.int32) if num_rows < 2**31 else np.dtype(np.int64)


def _storage_dtype(dt: str):
  return np.dtype("uint32") if dt.startswith("key<") else jnp.dtype(dt)


def _storage_shape(s: dict) -> tuple[int, ...]:
  return tuple(s.get("data_shape", s["shape"]))


def _place(value, like):
  """``value`` on ``like``'s sharding (or as numpy if ``like`` is host data), in its dtype."""
  if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)) and getattr(like, "sharding", None):
    if tree_lib.is_key_array(like):
      return jax.device_put(value, like.sharding)
    return jax.device_put(np.asarray(value).astype(like.dtype), like.sharding)
  if tree_lib.is_key_array(like):
    return value
  return np.asarray(value).astype(getattr(like, "dtype", np.asarray(value).dtype))
