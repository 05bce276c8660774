"""Bytes moved by the collectives of a compiled program, read from its HLO text.

Every claim about traffic is measured here, from ``compiled.as_text()`` (or any HLO module
text): each collective's buffer size comes from its result shape, and its wire bytes per device
from the bandwidth-optimal (ring) cost of its kind over its replica group of size n:

  all-reduce           2 (n-1)/n x buffer     (a reduce-scatter plus an all-gather)
  reduce-scatter       (n-1)/n x input        (input = result x n)
  all-gather           (n-1)/n x output
  all-to-all           (n-1)/n x buffer       (the 1/n kept locally never leaves the device)
  collective-permute   buffer
  collective-broadcast buffer

Counts are static: a collective inside a loop body is counted once per appearance in the text.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict

import numpy as np

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1,
    "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25, "s1": 0.125, "u1": 0.125,
}
KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "ragged-all-to-all",
         "collective-permute", "collective-broadcast")
# "%name = <shape> <op>(" with an optional async "-start"; "-done" halves are not counted.
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>" +
                 "|".join(re.escape(k) for k in KINDS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
# Named-mesh form: replica_groups=mesh['a'=8,'b'=1] {'a'}: devices iota over the named axes
# (optionally permuted as in the iota form), one group per setting of the axes not listed.
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:<=\[([\d,]+)\](?:T\(([\d,]+)\))?)?"
                          r"\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _array_bytes(shape: str) -> list[float]:
  """Bytes of each array in a (possibly tuple) HLO shape string; token/opaque count 0."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out.append(n * _DTYPE_BYTES[dtype])
  return out


def _replica_groups(line: str) -> list[tuple[int, ...]] | None:
  m = _GROUPS_MESH.search(line)
  if m:
    axes = [(n, int(v)) for n, v in re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))]
    names = [n for n, _ in axes]
    sizes = [v for _, v in axes]
    ids = np.arange(int(np.prod(sizes)))
    if m.group(2):
      ids = ids.reshape([int(x) for x in m.group(2).split(",")])
      if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    ids = ids.reshape(sizes)
    listed = [names.index(n) for n in re.findall(r"'([^']+)'", m.group(4))]
    rest = [i for i in range(len(names)) if i not in listed]
    k = int(np.prod([sizes[i] for i in listed]))
    return [tuple(int(v) for v in g) for g in ids.transpose(rest + listed).reshape(-1, k)]
  m = _GROUPS_IOTA.search(line)
  if m:
    shape = [int(x) for x in m.group(1).split(",")]
    reshape = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(int(np.prod(reshape))).reshape(reshape)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return [tuple(int(v) for v in g) for g in ids.reshape(shape)]
  m = _GROUPS_LIST.search(line)
  if m:
    groups = [tuple(int(v) for v in g.split(",") if v.strip())
              for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    return [g for g in groups if g] or None
  return None


def _pairs(line: str) -> list[tuple[int, int]] | None:
  m = _PAIRS.search(line)
  if not m:
    return None
  return [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]


def _axis_groups(mesh) -> dict[tuple[str, ...], frozenset]:
  """For every non-empty subset of mesh axes: the partition of device ids it induces."""
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  names = tuple(mesh.axis_names)
  out = {}
  for r in range(1, len(names) + 1):
    for sub in itertools.combinations(range(len(names)), r):
      rest = [i for i in range(len(names)) if i not in sub]
      moved = np.transpose(ids, rest + list(sub)).reshape(-1, int(np.prod(
          [ids.shape[i] for i in sub])))
      out[tuple(names[i] for i in sub)] = frozenset(frozenset(int(v) for v in g) for g in moved)
  return out


def _axis_name(groups, pairs, axis_groups) -> str:
  if groups is not None:
    key = frozenset(frozenset(g) for g in groups)
    for axes, part in axis_groups.items():
      if part == key:
        return ",".join(axes)
    if len(groups) == 1 and axis_groups:
      return ",".join(max(axis_groups, key=len))  # one group of every device
  if pairs is not None:
    # The smallest axis set whose groups hold every (source, target) pair.
    for axes, part in sorted(axis_groups.items(), key=lambda kv: len(kv[0])):
      member = {d: g for g in part for d in g}
      if all(b in member.get(a, ()) for a, b in pairs):
        return ",".join(axes)
  size = len(groups[0]) if groups else (2 if pairs else 1)
  return f"group_size={size}"


def collective_bytes(compiled_or_hlo_text, mesh=None) -> dict:
  """Bytes moved per device by the collectives of ``compiled_or_hlo_text`` (an object with
  ``as_text()``, e.g. ``jax.jit(f).lower(...).compile()``, or HLO text).

  Returns ``{"total": wire bytes, "buffer_total": buffer bytes, "by_kind": {kind: wire},
  "by_axis": {axis: wire}, "ops": [{kind, axis, group_size, buffer_bytes, wire_bytes, shape}]}``.
  With ``mesh``, a replica group is named by the mesh axes it spans (e.g. "local" or
  "host,local"); without, by its size.
  """
  text = compiled_or_hlo_text
  if hasattr(text, "as_text"):
    text = text.as_text()
  if not isinstance(text, str):
    raise TypeError(f"collective_bytes takes a compiled executable or HLO text, got "
                    f"{type(compiled_or_hlo_text).__name__}")
  axis_groups = _axis_groups(mesh) if mesh is not None else {}
  ops = []
  for line in text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    kind, shape = m.group("op"), m.group("shape")
    arrays = _array_bytes(shape)
    if m.group("start"):
      # Async starts return (operands..., results..., context): keep the results.
      if kind == "all-gather":
        arrays = arrays[len(arrays) // 2:]
      elif kind == "collective-permute":
        arrays = arrays[1:2]
    buffer = float(sum(arrays))
    groups, pairs = _replica_groups(line), _pairs(line)
    if kind in ("collective-permute", "collective-broadcast"):
      n = 2 if pairs else (len(groups[0]) if groups else 1)
      wire = buffer if (pairs or n > 1) else 0.0
    else:
      n = len(groups[0]) if groups else 1
      if n <= 1:
        wire = 0.0
      elif kind == "all-reduce":
        wire = 2.0 * (n - 1) / n * buffer
      elif kind == "reduce-scatter":
        buffer *= n  # the result is one of n pieces of the input
        wire = (n - 1) / n * buffer
      else:
        wire = (n - 1) / n * buffer
    ops.append({"kind": kind, "axis": _axis_name(groups, pairs, axis_groups), "group_size": n,
                "buffer_bytes": buffer, "wire_bytes": wire, "shape": shape.strip()})
  by_kind: dict[str, float] = defaultdict(float)
  by_axis: dict[str, float] = defaultdict(float)
  for o in ops:
    by_kind[o["kind"]] += o["wire_bytes"]
    by_axis[o["axis"]] += o["wire_bytes"]
  return {"total": float(sum(o["wire_bytes"] for o in ops)),
          "buffer_total": float(sum(o["buffer_bytes"] for o in ops)),
          "by_kind": dict(by_kind), "by_axis": dict(by_axis), "ops": ops}
