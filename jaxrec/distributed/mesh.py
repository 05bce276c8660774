"""The device mesh, built once per run."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


def make_mesh(shape: Sequence[int] | None = None, axis_names: Sequence[str] | None = None
              ) -> Mesh:
  """A mesh over the first prod(shape) devices; default: every device on one "data" axis, or
  ("host", "local") = (processes, devices per process) when the run has several processes.

  Two axes default to ("host", "local") (row-wise inside a host, table-wise across hosts).
  Axis types are Auto: the dense model carries no sharding annotations and GSPMD propagates
  the batch split through it; the embedding engine is manual inside its shard_map anyway.
  """
  if shape is None and jax.process_count() > 1:
    # jax.devices() lists each process's devices together, so a host row is one process.
    shape = (jax.process_count(), jax.local_device_count())
  shape = tuple(int(s) for s in (shape or (jax.device_count(),)))
  if axis_names is None:
    axis_names = {1: ("data",), 2: ("host", "local")}.get(len(shape))
    if axis_names is None:
      raise ValueError(f"mesh shape {shape}: name its axes (1-D and 2-D meshes have defaults)")
  n = int(np.prod(shape))
  if n > jax.device_count():
    raise ValueError(f"mesh shape {shape} needs {n} devices but only {jax.device_count()} are "
                     "visible (on CPU set JAX_NUM_CPU_DEVICES before starting Python)")
  if jax.process_count() > 1 and n != jax.device_count():
    # A process without devices in the mesh would have no rows to feed and no shards to save.
    raise ValueError(f"mesh shape {shape} covers {n} of the {jax.device_count()} devices of "
                     f"this {jax.process_count()}-process run; a multi-process mesh must use "
                     f"them all (leave config.mesh.shape unset for ({jax.process_count()}, "
                     f"{jax.local_device_count()}))")
  return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:n])
