"""Runs N processes x M CPU devices on this machine: the way tests and laptops run multi-host.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
      python experiments/train.py --config=experiments/configs/dlrm_synthetic.py:tiny

Each process gets JAXREC_COORDINATOR / JAXREC_NUM_PROCESSES / JAXREC_PROCESS_ID (read by
jaxrec.distributed.initialize), JAX_NUM_CPU_DEVICES=M and a free coordinator port. Output
lines carry a "[i] " prefix. When a process exits non-zero, the others get ``--grace_s``
seconds to end on their own (they do, within the heartbeat timeout), then are killed; the
launcher exits with the first failing process's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _say(msg: str):
  print(f"[local] {msg}", flush=True)


def _pump(prefix: str, stream, out):
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode(errors="replace"))
    out.flush()
  stream.close()


def _status(rc: int) -> str:
  return f"was killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"


def process_env(i: int, n: int, devices: int, coordinator: str, platform: str) -> dict:
  env = dict(os.environ)
  env.update({
      "JAXREC_COORDINATOR": coordinator, "JAXREC_NUM_PROCESSES": str(n),
      "JAXREC_PROCESS_ID": str(i), "PYTHONUNBUFFERED": "1",
  })
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    # Older jax reads only the XLA flag; drop any device count inherited from the caller.
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  else:  # disjoint GPUs per process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(i * devices, (i + 1) * devices))
  return env


def run(cmd: list[str], num_processes: int, devices_per_process: int, platform: str = "cpu",
        grace_s: float = 0.0, port: int | None = None) -> int:
  coordinator = f"127.0.0.1:{port or _free_port()}"
  _say(f"{num_processes} processes x {devices_per_process} {platform} devices, coordinator "
       f"{coordinator}: {' '.join(cmd)}")
  procs, pumps = [], []
  t0 = time.monotonic()
  for i in range(num_processes):
    p = subprocess.Popen(cmd, env=process_env(i, num_processes, devices_per_process,
                                              coordinator, platform),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)  # its own group: we can end its children too
    _say(f"started process {i} (pid {p.pid})")
    t = threading.Thread(target=_pump, args=(f"[{i}] ", p.stdout, sys.stdout), daemon=True)
    t.start()
    procs.append(p)
    pumps.append(t)

  def stop_all(sig):
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass

  failed, first_rc, kill_at = None, 0, None
  prev_int = signal.signal(signal.SIGINT, lambda *_: stop_all(signal.SIGINT))
  prev_term = signal.signal(signal.SIGTERM, lambda *_: stop_all(signal.SIGTERM))
  try:
    done = set()
    while len(done) < len(procs):
      for i, p in enumerate(procs):
        if i in done or p.poll() is None:
          continue
        done.add(i)
        rc = p.returncode
        _say(f"process {i} {_status(rc)} after {time.monotonic() - t0:.1f} s")
        if rc != 0 and failed is None:
          failed, first_rc = i, rc
          if len(done) < len(procs):
            _say(f"process {i} failed; stopping the others"
                 + (f" in {grace_s:.0f} s unless they end first" if grace_s else ""))
            kill_at = time.monotonic() + grace_s
      if kill_at is not None and time.monotonic() >= kill_at:
        stop_all(signal.SIGTERM)
        kill_at = None
        threading.Timer(5, stop_all, args=(signal.SIGKILL,)).start()
      time.sleep(0.05)
  finally:
    signal.signal(signal.SIGINT, prev_int)
    signal.signal(signal.SIGTERM, prev_term)
    stop_all(signal.SIGKILL)
    for t in pumps:
      t.join(timeout=5)
  if failed is not None:
    _say(f"run failed: process {failed} {_status(first_rc)}")
    return first_rc if first_rc > 0 else 128 - first_rc
  _say("all processes finished")
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               usage="%(prog)s [options] -- command [args ...]")
  ap.add_argument("--num_processes", "-n", type=int, default=2)
  ap.add_argument("--devices_per_process", "-m", type=int, default=4)
  ap.add_argument("--platform", default="cpu", choices=["cpu", "gpu"],
                  help="cpu: fake M CPU devices per process; gpu: M GPUs each (one host)")
  ap.add_argument("--grace_s", type=float, default=0.0,
                  help="after a failure, seconds the others get to end on their own")
  ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  ap.add_argument("cmd", nargs=argparse.REMAINDER)
  a = ap.parse_args(argv)
  cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
  if not cmd:
    ap.error("give the command to run after --")
  if a.num_processes < 1 or a.devices_per_process < 1:
    ap.error("--num_processes and --devices_per_process must be at least 1")
  return run(cmd, a.num_processes, a.devices_per_process, a.platform, a.grace_s, a.port)


if __name__ == "__main__":
  sys.exit(main())
