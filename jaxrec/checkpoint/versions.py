"""The versions under a run's ``checkpoints/`` directory: listing, rollback and pruning.

Plain file operations on what ``Checkpointer`` wrote (no devices, no Orbax manager), so the
CLI can inspect and repair a run's directory while nothing is training. See manager.py for the
directory layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from absl import logging

from jaxrec.checkpoint import manifest
from jaxrec.checkpoint.manifest import CorruptCheckpointError

META_FORMAT = "jaxrec.snapshot/v1"
ROLLED_BACK = "rolled_back"
TRASH = "trash"


class NoCheckpointError(FileNotFoundError):
  """No restorable version exists."""


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its versions."""
  return os.path.join(workdir, "checkpoints")


@dataclasses.dataclass(frozen=True)
class Version:
  """One version on disk, as ``list`` shows it."""

  step: int
  path: str
  status: str                      # "ok", "incomplete", "broken chain: ...", "corrupt: ..."
  kind: str = "?"
  chain: tuple[int, ...] = ()
  uid: str = ""
  data_position: Any = None
  metadata: dict = dataclasses.field(default_factory=dict)
  metrics: dict | None = None
  created: float = 0.0
  bytes: int = 0
  rolled_back: bool = False

  @property
  def ok(self) -> bool:
    return self.status == "ok"


# ---- reading the directory (no devices needed: the CLI uses these) -----------------------------


def read_meta(vdir: str) -> dict | None:
  try:
    with open(os.path.join(vdir, "meta", "metadata")) as f:
      meta = json.load(f)
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
    return None
  return meta if isinstance(meta, dict) and meta.get("format") == META_FORMAT else None


def step_dirs(root: str) -> dict[int, str]:
  out = {}
  try:
    names = os.listdir(root)
  except FileNotFoundError:
    return out
  for n in names:
    if n.isdigit() and os.path.isdir(os.path.join(root, n)):
      out[int(n)] = os.path.join(root, n)
  return out


def _rolled_back_dirs(root: str) -> list[tuple[int, str]]:
  rb = os.path.join(root, ROLLED_BACK)
  out = []
  for n in sorted(os.listdir(rb)) if os.path.isdir(rb) else []:
    head = n.split(".")[0]
    if head.isdigit():
      out.append((int(head), os.path.join(rb, n)))
  return out


def _version(step: int, vdir: str, rolled_back: bool = False) -> Version:
  doc = manifest.read(vdir)
  meta = read_meta(vdir)
  if doc is None or meta is None:
    return Version(step, vdir, "incomplete", rolled_back=rolled_back)
  return Version(step, vdir, "ok", kind=meta["kind"], chain=tuple(c[0] for c in meta["chain"]),
                 uid=meta["uid"], data_position=meta.get("data_position"),
                 metadata=meta.get("metadata") or {}, metrics=meta.get("metrics"),
                 created=meta.get("created", 0.0), bytes=manifest.dir_bytes(vdir),
                 rolled_back=rolled_back)


def _check_chain(v: Version, by_step: dict[int, Version], meta: dict) -> str:
  for s, uid in meta["chain"][:-1]:
    dep = by_step.get(s)
    if dep is None or not dep.ok:
      return f"broken chain: needs version {s}, which is missing or incomplete"
    if dep.uid != uid:
      return f"broken chain: version {s} on disk is not the one this increment builds on"
  return "ok"


def list_versions(directory: str, verify: str = "none", include_rolled_back: bool = False
                  ) -> list[Version]:
  """Every version under ``directory`` (a run's checkpoints/), oldest first, with a status.

  Only versions with status "ok" are restorable. ``verify`` ("none", "size", "checksum")
  re-checks files against manifests (the whole chain of each version).
  """
  found = {s: _version(s, d) for s, d in step_dirs(directory).items()}
  out = []
  for s in sorted(found):
    v = found[s]
    if v.ok:
      meta = read_meta(v.path)
      status = _check_chain(v, found, meta)
      if status == "ok" and verify != "none":
        try:
          for c in v.chain:
            manifest.verify(found[c].path, verify)
        except CorruptCheckpointError as e:
          status = f"corrupt: {e}"
      v = dataclasses.replace(v, status=status)
    out.append(v)
  if include_rolled_back:
    for s, d in _rolled_back_dirs(directory):
      out.append(_version(s, d, rolled_back=True))
  return out


def _unique_dest(parent: str, step: int, uid: str) -> str:
  dest = os.path.join(parent, str(step))
  return dest if not os.path.exists(dest) else os.path.join(parent, f"{step}.{uid[:8] or 'x'}")


def rollback(directory: str, to: int | None = None, back: int | None = None) -> int:
  """Makes a version the one training resumes from; returns its step.

  ``to=STEP`` (a listed version, or a rolled-back one: rolls forward) or ``back=N`` (N versions
  before the newest restorable one). Newer versions move to ``rolled_back/`` (not deleted;
  ``prune`` deletes them, ``rollback --to`` brings them back). Do not run it on a directory a
  live job is writing to.
  """
  if (to is None) == (back is None):
    raise ValueError("rollback: give exactly one of to=STEP or back=N")
  versions = [v for v in list_versions(directory) if v.ok]
  if back is not None:
    if back < 0 or back >= len(versions):
      raise ValueError(f"rollback: back={back}, but {directory} has {len(versions)} restorable "
                       f"versions ({[v.step for v in versions]})")
    to = versions[-1 - back].step
  steps = {v.step: v for v in versions}
  rb = os.path.join(directory, ROLLED_BACK)
  if to not in steps:
    bad = {v.step: v for v in list_versions(directory, verify="size") if not v.ok}
    if to in bad:
      raise ValueError(f"rollback: version {bad[to].path} is not restorable ({bad[to].status})")
    _roll_forward(directory, to)
  newer = sorted((s for s in step_dirs(directory) if s > to), reverse=True)
  os.makedirs(rb, exist_ok=True)
  for s in newer:  # newest first: an interrupted rollback leaves a consistent, shorter history
    src = os.path.join(directory, str(s))
    meta = read_meta(src) or {}
    os.rename(src, _unique_dest(rb, s, meta.get("uid", "")))
  logging.info("checkpoint rollback in %s: resuming from version %d; set aside %s", directory,
               to, newer)
  return int(to)


def _roll_forward(directory: str, to: int):
  cands = [(s, d) for s, d in _rolled_back_dirs(directory) if s == to]
  if not cands:
    ok = [v.step for v in list_versions(directory) if v.ok]
    raise ValueError(f"rollback: version {to} is neither in {directory} nor in its "
                     f"{ROLLED_BACK}/; restorable: {ok}")
  s, d = cands[-1]
  meta = read_meta(d)
  if meta is None or manifest.read(d) is None:
    raise ValueError(f"rollback: rolled-back version {d} is incomplete")
  main = step_dirs(directory)
  rbs = {(read_meta(p) or {}).get("uid"): p for _, p in _rolled_back_dirs(directory)}
  moves = []
  for cs, uid in meta["chain"]:
    if cs in main and (read_meta(main[cs]) or {}).get("uid") == uid:
      continue
    if uid not in rbs:
      raise ValueError(f"rollback: version {to} builds on version {cs}, which is gone")
    moves.append((cs, rbs[uid]))
  # Versions of the current timeline at or after the first step brought back are set aside.
  first = min(cs for cs, _ in moves)
  rb = os.path.join(directory, ROLLED_BACK)
  for s2 in sorted((x for x in main if x >= first), reverse=True):
    m2 = read_meta(main[s2]) or {}
    os.rename(main[s2], _unique_dest(rb, s2, m2.get("uid", "")))
  for cs, src in moves:
    os.rename(src, os.path.join(directory, str(cs)))


def prune(directory: str) -> list[str]:
  """Deletes rolled-back versions and the trash; returns what it removed."""
  gone = []
  for sub in (ROLLED_BACK, TRASH):
    p = os.path.join(directory, sub)
    if os.path.isdir(p):
      gone += [os.path.join(p, n) for n in sorted(os.listdir(p))]
      shutil.rmtree(p)
  return gone
