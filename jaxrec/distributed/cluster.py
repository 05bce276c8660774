"""Who am I in the run: coordinator, process count and index, from flags or the launcher's env.

Sources, first match wins: explicit arguments; our local launcher (``JAXREC_*``); a
Kubernetes Indexed Job (``JOB_COMPLETION_INDEX`` plus a headless service); SLURM
(``SLURM_NTASKS`` > 1). Nothing found means a single process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from typing import Mapping

# Set by launch/local.py and usable by any launcher that wants to be explicit.
ENV_COORDINATOR = "JAXREC_COORDINATOR"          # host:port of process 0
ENV_NUM_PROCESSES = "JAXREC_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXREC_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXREC_LOCAL_DEVICE_COUNT"  # devices each process drives (optional)
# Kubernetes: the headless service that gives pod i the name <job>-<i>.<service>.
ENV_K8S_SERVICE = "JAXREC_K8S_SERVICE"
ENV_K8S_JOB = "JAXREC_K8S_JOB_NAME"             # default: HOSTNAME without its "-<index>"
ENV_PORT = "JAXREC_COORDINATOR_PORT"            # coordinator port where the env names no port
DEFAULT_PORT = 8476


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """The arguments ``jax.distributed.initialize`` needs, and where they came from."""
  coordinator_address: str | None
  num_processes: int
  process_id: int
  local_device_count: int | None = None   # None: every device the process sees
  source: str = "single"                  # explicit | local | kubernetes | slurm | single

  @property
  def is_multi_process(self) -> bool:
    return self.num_processes > 1

  def describe(self) -> str:
    return (f"process {self.process_id} of {self.num_processes} ({self.source}), "
            f"coordinator {self.coordinator_address}")


def _int(env: Mapping[str, str], name: str) -> int:
  v = env[name]
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM nodelist: 'gpu[003-010,012],cpu1' -> 'gpu003'."""
  m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
  if not m:
    raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
  prefix, ranges = m.group(1), m.group(2)
  if ranges is None:
    return prefix
  return prefix + re.split(r"[,-]", ranges)[0]


def _port(env: Mapping[str, str], default: int) -> int:
  return _int(env, ENV_PORT) if ENV_PORT in env else default


def _with_port(addr: str, env: Mapping[str, str], default: int) -> str:
  return addr if re.search(r":\d+$", addr) else f"{addr}:{_port(env, default)}"


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, local_device_count: int | None = None,
           env: Mapping[str, str] | None = None) -> ClusterSpec:
  """The run's topology from explicit arguments, else from the environment."""
  env = os.environ if env is None else env
  local = local_device_count
  if local is None and ENV_LOCAL_DEVICES in env:
    local = _int(env, ENV_LOCAL_DEVICES)

  given = [a is not None for a in (coordinator_address, num_processes, process_id)]
  if any(given):
    if num_processes is None or process_id is None or (
        num_processes > 1 and coordinator_address is None):
      raise ValueError("distributed flags: give --coordinator_address, --num_processes and "
                       f"--process_id together (got coordinator_address={coordinator_address!r},"
                       f" num_processes={num_processes}, process_id={process_id})")
    spec = ClusterSpec(coordinator_address, int(num_processes), int(process_id), local,
                       "explicit")
  elif "JOB_COMPLETION_INDEX" in env and ENV_K8S_SERVICE in env:
    job = env.get(ENV_K8S_JOB) or re.sub(r"-\d+$", "", env.get("HOSTNAME", ""))
    if not job:
      raise ValueError(f"Kubernetes Indexed Job: set {ENV_K8S_JOB} (the Job's name) so process 0"
                       f" can be found at <job>-0.<{ENV_K8S_SERVICE}>")
    if ENV_NUM_PROCESSES not in env:
      raise ValueError(f"Kubernetes Indexed Job: set {ENV_NUM_PROCESSES} to the Job's "
                       "completions (parallelism must equal it)")
    # Pod i of an Indexed Job with subdomain=<service> is reachable as <job>-i.<service>.
    addr = _with_port(f"{job}-0.{env[ENV_K8S_SERVICE]}", env, DEFAULT_PORT)
    spec = ClusterSpec(addr, _int(env, ENV_NUM_PROCESSES), _int(env, "JOB_COMPLETION_INDEX"),
                       local, "kubernetes")
  elif ENV_NUM_PROCESSES in env:
    if ENV_PROCESS_ID not in env or (_int(env, ENV_NUM_PROCESSES) > 1
                                     and ENV_COORDINATOR not in env):
      raise ValueError(f"{ENV_NUM_PROCESSES} is set but {ENV_PROCESS_ID} or {ENV_COORDINATOR} "
                       "is not: set all three (launch/local.py does)")
    spec = ClusterSpec(env.get(ENV_COORDINATOR), _int(env, ENV_NUM_PROCESSES),
                       _int(env, ENV_PROCESS_ID), local, "local")
  elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS") > 1:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
      raise ValueError("SLURM: SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST; "
                       "start the processes with srun")
    # A port derived from the job id, so two jobs sharing a first node do not collide.
    port = 20000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else DEFAULT_PORT
    addr = _with_port(first_slurm_host(nodes), env, port)
    spec = ClusterSpec(addr, _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"), local,
                       "slurm")
  else:
    spec = ClusterSpec(None, 1, 0, local, "single")
  if not 0 <= spec.process_id < spec.num_processes:
    raise ValueError(f"process id {spec.process_id} is outside [0, {spec.num_processes}) "
                     f"(from {spec.source})")
  if spec.coordinator_address is not None and not re.search(r":\d+$", spec.coordinator_address):
    raise ValueError(f"coordinator address {spec.coordinator_address!r} (from {spec.source}) "
                     "needs a port, e.g. 10.0.0.1:8476")
  return spec


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nothing listens on right now (for local runs)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]
