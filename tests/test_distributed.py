"""Process topology from flags and launcher environments; per-process batch rows (no processes
started here: tests/test_multihost.py runs real ones)."""

import numpy as np
import pytest
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec import distributed
from jaxrec.distributed import cluster
from jaxrec.distributed.mesh import make_mesh


def test_single_process_by_default():
  s = cluster.detect(env={})
  assert (s.num_processes, s.process_id, s.source, s.is_multi_process) == (1, 0, "single", False)


def test_explicit_flags_win_over_env():
  env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "n[1-4]"}
  s = cluster.detect("10.0.0.1:1234", 2, 1, 4, env=env)
  assert s == cluster.ClusterSpec("10.0.0.1:1234", 2, 1, 4, "explicit")


def test_explicit_flags_must_come_together():
  with pytest.raises(ValueError, match="together"):
    cluster.detect("10.0.0.1:1234", None, 0, env={})
  with pytest.raises(ValueError, match="needs a port"):
    cluster.detect("10.0.0.1", 2, 0, env={})
  with pytest.raises(ValueError, match=r"process id 2 is outside \[0, 2\)"):
    cluster.detect("h:1", 2, 2, env={})


def test_local_launcher_env():
  env = {"JAXREC_COORDINATOR": "127.0.0.1:5555", "JAXREC_NUM_PROCESSES": "3",
         "JAXREC_PROCESS_ID": "2", "JAXREC_LOCAL_DEVICE_COUNT": "4"}
  assert cluster.detect(env=env) == cluster.ClusterSpec("127.0.0.1:5555", 3, 2, 4, "local")
  with pytest.raises(ValueError, match="JAXREC_PROCESS_ID"):
    cluster.detect(env={"JAXREC_NUM_PROCESSES": "2", "JAXREC_COORDINATOR": "h:1"})
  with pytest.raises(ValueError, match="not an integer"):
    cluster.detect(env={**env, "JAXREC_PROCESS_ID": "two"})


def test_kubernetes_indexed_job():
  env = {"JOB_COMPLETION_INDEX": "5", "JAXREC_K8S_SERVICE": "dlrm-workers",
         "HOSTNAME": "dlrm-train-5", "JAXREC_NUM_PROCESSES": "8"}
  s = cluster.detect(env=env)
  assert s == cluster.ClusterSpec(f"dlrm-train-0.dlrm-workers:{cluster.DEFAULT_PORT}", 8, 5,
                                  None, "kubernetes")
  s = cluster.detect(env={**env, "JAXREC_K8S_JOB_NAME": "job-x", "JAXREC_COORDINATOR_PORT": "9"})
  assert s.coordinator_address == "job-x-0.dlrm-workers:9"
  no_n = dict(env)
  del no_n["JAXREC_NUM_PROCESSES"]
  with pytest.raises(ValueError, match="completions"):
    cluster.detect(env=no_n)


@pytest.mark.parametrize("nodelist,first", [
    ("gpu001", "gpu001"), ("gpu001,gpu007", "gpu001"), ("gpu[003-010,012],cpu1", "gpu003"),
    ("node[7,9-11]", "node7"), ("a-b[10-12]", "a-b10")])
def test_slurm_first_host(nodelist, first):
  assert cluster.first_slurm_host(nodelist) == first


def test_slurm_env():
  env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_JOB_ID": "123456",
         "SLURM_STEP_NODELIST": "gpu[003-006]", "SLURM_JOB_NODELIST": "gpu[001-006]"}
  s = cluster.detect(env=env)
  assert s == cluster.ClusterSpec(f"gpu003:{20000 + 123456 % 20000}", 16, 9, None, "slurm")
  # One task (an interactive allocation): a single process, no coordinator.
  assert cluster.detect(env={**env, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).source == "single"


def test_single_process_initialize_is_a_no_op(monkeypatch):
  for k in ("JAXREC_NUM_PROCESSES", "JOB_COMPLETION_INDEX", "SLURM_NTASKS"):
    monkeypatch.delenv(k, raising=False)
  s = distributed.initialize()
  assert not s.is_multi_process and not jax.distributed.is_initialized()


@pytest.mark.parametrize("shape", [(8,), (2, 4)])
def test_one_process_holds_every_row(shape):
  mesh = make_mesh(shape)
  sh = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  assert distributed.process_rows(sh, 64) == slice(0, 64)
  local = {"x": np.arange(64 * 3, dtype=np.float32).reshape(64, 3)}
  g = distributed.to_global(local, sh, 64)
  assert g["x"].sharding == sh
  np.testing.assert_array_equal(distributed.to_host(g["x"]), local["x"])
  batches = list(distributed.process_batches(lambda a, b: (a, b), 8, 16, 39, slice(2, 6)))
  assert batches == [(18, 22), (26, 30)]   # the partial batch [32, 39) is dropped


def test_default_mesh_single_process():
  m = make_mesh()
  assert dict(m.shape) == {"data": 8}


def test_multi_process_mesh_defaults_and_must_cover_every_device(monkeypatch):
  # Pretend to be one of two processes with 4 devices each (the device list stays 8 long).
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "local_device_count", lambda: 4)
  m = make_mesh()
  assert dict(m.shape) == {"host": 2, "local": 4}
  assert make_mesh((8,)).size == 8
  with pytest.raises(ValueError, match=r"covers 4 of the 8 devices of this 2-process run"):
    make_mesh((4,))


def test_timeouts_from_env():
  t = distributed.Timeouts.from_env({"JAXREC_HEARTBEAT_TIMEOUT": "7"})
  assert (t.initialization, t.heartbeat, t.shutdown) == (120, 7, 30)


def test_local_device_count_sets_the_cpu_device_count():
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXREC_", "JAX_NUM_CPU"))}
  code = ("from jaxrec import distributed; s = distributed.initialize(local_device_count=3); "
          "import jax; print(s.source, jax.device_count(), dict(distributed.make_mesh().shape))")
  r = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"},
                     capture_output=True, text=True, timeout=120,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr
  assert r.stdout.split("\n")[0] == "single 3 {'data': 3}", r.stdout
