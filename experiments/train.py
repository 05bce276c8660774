"""Train and evaluate a jaxrec model.

  python experiments/train.py --config=experiments/configs/dlrm_synthetic.py --workdir=/tmp/run

Multi-process runs take the same command under a launcher (launch/README.md): the process
topology comes from the flags below or from the launcher's environment (SLURM, Kubernetes
Indexed Job, launch/local.py).
"""

import json
import os
import sys

import jax
from absl import app, flags, logging

# Configs may build on each other (`from experiments.configs import dlrm_synthetic`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ml_collections import config_flags

from jaxrec import distributed, hugepages
from jaxrec.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where metrics (and later checkpoints) go")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: from the launcher's env)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..n-1")
_LOCAL_DEVICES = flags.DEFINE_integer(
    "local_device_count", None, "devices this process drives (CPU: how many to fake)")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache_dir", os.environ.get("JAXREC_COMPILE_CACHE", "~/.cache/jaxrec/xla"),
    "persistent XLA compilation cache: a rerun of the same model and mesh loads its compiled "
    "steps instead of compiling again (dynamic tables: ~50 s -> seconds); '' turns it off")
_HUGE_PAGES = flags.DEFINE_bool(
    "huge_pages", True, "on Linux with madvise-only transparent huge pages, restart once with "
    "glibc's THP tunable so host-memory tables get 2 MiB pages (jaxrec/hugepages.py)")


def main(argv):
  del argv
  hugepages.reexec_with_huge_pages(_HUGE_PAGES.value)   # returns unless a restart is needed
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # progress lines only; --verbosity=0 shows INFO
  if _COMPILE_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_COMPILE_CACHE.value))
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)   # LRU beyond 4 GiB
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _LOCAL_DEVICES.value)
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if distributed.is_main_process():
    summary["huge_pages"] = hugepages.active()
    print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
