"""Joining a multi-process run: ``jax.distributed.initialize`` with timeouts that never hang.

What ends a run, and how fast (``Timeouts``):
- the coordinator (process 0) cannot be reached: the other processes stop after
  ``initialization`` seconds with ``CoordinatorUnreachable`` naming the address;
- a process never registers: process 0 says so, then JAX aborts at ``initialization`` s;
- a process dies mid-run: JAX's coordination service declares it dead after ``heartbeat``
  seconds and aborts every process (SIGABRT) with "The following tasks are unhealthy
  (stopped sending heartbeats): <i>", or, when process 0 is the one gone, "the leader task was
  preempted/died". A survivor whose collective fails first (connection reset) says so and
  waits for that verdict (at most ``heartbeat`` + 10 s), so its log names the lost process.
  On CPU, gloo's TCP transport sometimes aborts the survivor first (a C++ terminate on the
  dead peer's half-received message, which no Python hook sees): it still ends at once and
  non-zero, and the launcher names the process that died;
- a process raises: our exception hook says why and ends it at once (``os._exit(1)``) rather
  than waiting in the exit barrier, so its peers fail fast instead of waiting on it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
import traceback

import jax

from jaxrec.distributed import cluster as cluster_lib
from jaxrec.distributed.cluster import ClusterSpec


@dataclasses.dataclass(frozen=True)
class Timeouts:
  """Seconds. The defaults end a run within about 40 s of a lost process."""
  initialization: int = 120   # to reach the coordinator / for every process to register
  heartbeat: int = 30         # a process silent this long is declared dead; all abort
  shutdown: int = 30          # at exit, how long to wait for the others at the final barrier

  @classmethod
  def from_env(cls, env=None) -> "Timeouts":
    """Overrides from JAXREC_INIT_TIMEOUT / JAXREC_HEARTBEAT_TIMEOUT / JAXREC_SHUTDOWN_TIMEOUT."""
    env = os.environ if env is None else env
    d = cls()
    names = {"initialization": "JAXREC_INIT_TIMEOUT", "heartbeat": "JAXREC_HEARTBEAT_TIMEOUT",
             "shutdown": "JAXREC_SHUTDOWN_TIMEOUT"}
    return cls(**{f: int(env.get(n, getattr(d, f))) for f, n in names.items()})


class CoordinatorUnreachable(RuntimeError):
  """The coordinator address did not accept a connection within the initialization timeout."""


_SPEC: ClusterSpec | None = None


def tag() -> str:
  """'[process i/n] ' in multi-process runs, '' otherwise: a prefix for messages."""
  s = _SPEC
  return f"[process {s.process_id}/{s.num_processes}] " if s and s.is_multi_process else ""


def _say(msg: str):
  print(f"jaxrec.distributed: {tag()}{msg}", file=sys.stderr, flush=True)


def _split(addr: str) -> tuple[str, int]:
  host, _, port = addr.rpartition(":")
  return host.strip("[]"), int(port)


def wait_for_coordinator(addr: str, timeout: float, process_id: int) -> float:
  """Retries a TCP connect to ``addr`` until it succeeds; returns the seconds it took.

  JAX's own failure here is an abort with 'DEADLINE_EXCEEDED' on RegisterTask; this names the
  address and what to check instead.
  """
  host, port = _split(addr)
  t0 = time.monotonic()
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return time.monotonic() - t0
    except OSError as e:   # refused (not started yet), unknown host (DNS not ready), timeout
      last = e
    if time.monotonic() - t0 > timeout:
      raise CoordinatorUnreachable(
          f"process {process_id}: cannot reach the coordinator at {addr} after {timeout:.0f} s "
          f"({type(last).__name__}: {last}). Check that process 0 is running and listening "
          "there, that every process got the same --coordinator_address, and that the port is "
          "open between the hosts.")
    time.sleep(0.25)


def _cpu_only() -> bool:
  plats = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  return plats.strip().lower() == "cpu"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None,
               timeouts: Timeouts | None = None) -> ClusterSpec:
  """Joins the run described by the arguments or the environment (see cluster.detect).

  A no-op for a single process (apart from ``local_device_count`` on CPU). Must run before
  anything touches a JAX device. Returns the topology it used.
  """
  global _SPEC
  spec = cluster_lib.detect(coordinator_address, num_processes, process_id, local_device_count)
  timeouts = timeouts or Timeouts.from_env()
  local_ids = None
  if spec.local_device_count is not None:
    if _cpu_only():   # fake CPU devices: the count is a config knob, not a selection
      jax.config.update("jax_num_cpu_devices", int(spec.local_device_count))
    else:
      local_ids = list(range(int(spec.local_device_count)))
  _SPEC = spec
  if not spec.is_multi_process:
    return spec
  if jax.distributed.is_initialized():
    raise RuntimeError(f"jax.distributed is already initialized; {spec.describe()} cannot "
                       "join again")
  t_start = time.monotonic()
  if spec.process_id != 0:
    wait_for_coordinator(spec.coordinator_address, timeouts.initialization, spec.process_id)
  left = max(5, int(timeouts.initialization - (time.monotonic() - t_start)))
  # JAX aborts (SIGABRT) when registration times out; say what we were waiting for first.
  warn = threading.Timer(max(left - 2, 1), _say, args=(
      f"still not connected after {timeouts.initialization - 2} s: not all {spec.num_processes}"
      f" processes registered with the coordinator at {spec.coordinator_address}. Check that "
      "every process was started with the same --num_processes and coordinator; the run aborts"
      " now.",))
  warn.daemon = True
  warn.start()
  try:
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
        process_id=spec.process_id, local_device_ids=local_ids,
        initialization_timeout=left, heartbeat_timeout_seconds=timeouts.heartbeat,
        shutdown_timeout_seconds=timeouts.shutdown,
        # We detected the cluster ourselves; JAX's SLURM detection would also pin each
        # process to GPU number SLURM_LOCALID, wrong for one process per node.
        cluster_detection_method="deactivate")
  finally:
    warn.cancel()
  install_fail_fast(timeouts)
  return spec


def spec() -> ClusterSpec:
  """The topology ``initialize`` set up (a single process if it was never called)."""
  return _SPEC or ClusterSpec(None, jax.process_count(), jax.process_index(), None, "single")


# -- failing fast ---------------------------------------------------------------------------------

def _looks_like_peer_loss(e: BaseException) -> bool:
  text = str(e)
  return isinstance(e, jax.errors.JaxRuntimeError) and any(
      k in text for k in ("Gloo", "gloo", "Connection reset", "Connection closed", "NCCL",
                          "coordination service", "UNAVAILABLE", "DEADLINE_EXCEEDED"))


def report_failure(e: BaseException, timeouts: Timeouts | None = None) -> str:
  """The one-line reason a multi-process run ends with ``e``.

  A failed collective does not say which peer is gone, and asking the coordination service
  (get_live_nodes) is itself a barrier, so we do not ask: JAX's coordination service names
  the process whose heartbeats stopped, in every survivor's log.
  """
  timeouts = timeouts or Timeouts.from_env()
  if _looks_like_peer_loss(e):
    return (f"a collective with the other processes failed ({str(e).splitlines()[0][:300]}): "
            "another process has most likely died or been killed")
  return f"this process failed: {type(e).__name__}: {e}"


def install_fail_fast(timeouts: Timeouts):
  """An uncaught error ends this process at once with status 1 (after saying why).

  A normal interpreter exit would wait in jax.distributed.shutdown for peers that are blocked
  in a collective with us; exiting hard makes their collective fail instead, so every process
  ends within the heartbeat timeout.
  """
  prev = sys.excepthook

  def hook(etype, value, tb):
    try:
      traceback.print_exception(etype, value, tb)
      if _looks_like_peer_loss(value):
        # The collective error cannot say which peer is gone; the coordination service can,
        # once the peer's heartbeats stop, and then it aborts this process with its name.
        wait = timeouts.heartbeat + 10
        _say(f"{report_failure(value, timeouts)}. Waiting up to {wait} s for the coordination "
             "service to name it.")
        time.sleep(wait)
        _say("the coordination service named no lost process; exiting with status 1")
      else:
        _say(f"exiting with status 1. {report_failure(value, timeouts)}")
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)
  hook.previous = prev
  sys.excepthook = hook
