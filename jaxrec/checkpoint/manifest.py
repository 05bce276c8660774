"""Per-version manifests: what a complete snapshot holds, and a check that it still does.

Every version directory ends up with ``MANIFEST.json`` listing the size and CRC32 of each data
file. It is written inside Orbax's temporary directory, before the atomic rename that publishes
the version, so a published version without a manifest cannot come from a finished save. A
restore re-reads the files and compares, so truncation and bit rot are caught before a single
byte reaches the state.
"""

from __future__ import annotations

import json
import os
import time
import zlib

MANIFEST = "MANIFEST.json"
FORMAT = "jaxrec.manifest/v1"
# Orbax rewrites these after our manifest (commit timestamp, commit marker): existence only.
_UNCHECKED_TOP = ("_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST)
_CHUNK = 8 << 20


class CorruptCheckpointError(RuntimeError):
  """A version's files do not match its manifest (or it has none)."""


def crc32_file(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while True:
      b = f.read(_CHUNK)
      if not b:
        return crc
      crc = zlib.crc32(b, crc)


def _data_files(root: str) -> list[str]:
  out = []
  for d, _, files in os.walk(root):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), root)
      if os.sep not in rel and rel in _UNCHECKED_TOP:
        continue
      out.append(rel)
  return sorted(out)


def write(version_dir: str, info: dict, checksums: bool = True) -> dict:
  """Lists every data file of ``version_dir`` (sizes, CRC32s) into its MANIFEST.json.

  Written to a temporary name and renamed, so a reader never sees half a manifest.
  """
  files = {}
  for rel in _data_files(version_dir):
    p = os.path.join(version_dir, rel)
    files[rel] = {"size": os.path.getsize(p)}
    if checksums:
      files[rel]["crc32"] = crc32_file(p)
  doc = {"format": FORMAT, "written": time.time(), **info, "files": files}
  tmp = os.path.join(version_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(version_dir, MANIFEST))
  return doc


def read(version_dir: str) -> dict | None:
  p = os.path.join(version_dir, MANIFEST)
  try:
    with open(p) as f:
      doc = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  return doc if doc.get("format") == FORMAT else None


def verify(version_dir: str, level: str = "checksum") -> dict:
  """Raises CorruptCheckpointError naming the version and the first bad file; returns the
  manifest. ``level``: "checksum" (sizes and CRC32s), "size" or "none"."""
  doc = read(version_dir)
  if doc is None:
    raise CorruptCheckpointError(
        f"checkpoint version {version_dir}: no valid {MANIFEST}; the save that wrote it did not "
        "finish (or the file was damaged)")
  if level == "none":
    return doc
  for rel, want in doc["files"].items():
    p = os.path.join(version_dir, rel)
    try:
      size = os.path.getsize(p)
    except FileNotFoundError:
      raise CorruptCheckpointError(
          f"checkpoint version {version_dir}: file {rel} listed in {MANIFEST} is missing") from None
    if size != want["size"]:
      raise CorruptCheckpointError(
          f"checkpoint version {version_dir}: file {rel} has {size} bytes, {MANIFEST} says "
          f"{want['size']} (truncated or overwritten)")
    if level == "checksum" and "crc32" in want and crc32_file(p) != want["crc32"]:
      raise CorruptCheckpointError(
          f"checkpoint version {version_dir}: file {rel} fails its CRC32 check (corrupted)")
  return doc


def dir_bytes(root: str) -> int:
  total = 0
  for d, _, files in os.walk(root):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(d, f))
      except FileNotFoundError:
        pass
  return total
