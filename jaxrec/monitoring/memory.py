"""Memory in use: device allocator stats where the backend has them, else a host estimate."""

from __future__ import annotations

import resource
import sys

import jax


def _rss_bytes() -> int | None:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * resource.getpagesize()
  except (OSError, ValueError, IndexError):
    return None


def _peak_rss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)   # Linux reports KiB


def step_footprint_bytes(compiled) -> int | None:
  """Bytes one device needs for the compiled step (arguments + outputs + temporaries, less
  outputs aliased to donated arguments), from XLA's memory analysis."""
  mem = compiled.memory_analysis() if compiled is not None else None
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def memory_in_use(devices=None, compiled=None) -> dict:
  """{"memory/bytes_in_use", "memory/peak_bytes", "memory/source", ...}.

  source "device.memory_stats": the allocators' bytes in use and peak, the max over the local
  devices (GPU/TPU). source "process_rss": backends without allocator stats (CPU), where
  device buffers live in host memory: the process resident set now and its peak. Either way
  ``memory/step_footprint_bytes`` is the compiled step's per-device need when known.
  """
  devices = devices if devices is not None else jax.local_devices()
  stats = [s for s in (d.memory_stats() for d in devices) if s]
  out: dict = {}
  if stats and "bytes_in_use" in stats[0]:
    out["memory/bytes_in_use"] = max(int(s.get("bytes_in_use", 0)) for s in stats)
    out["memory/peak_bytes"] = max(int(s.get("peak_bytes_in_use", s.get("bytes_in_use", 0)))
                                   for s in stats)
    out["memory/source"] = "device.memory_stats"
  else:
    rss = _rss_bytes()
    out["memory/bytes_in_use"] = rss
    out["memory/peak_bytes"] = max(_peak_rss_bytes(), rss or 0)   # two clocks, KiB vs pages
    out["memory/source"] = "process_rss"
  out["memory/step_footprint_bytes"] = step_footprint_bytes(compiled)
  return out
