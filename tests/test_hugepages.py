"""The launchers' huge-page restart: the decision, the environment it builds, and the effect."""

import json
import os
import subprocess
import sys

import pytest

from jaxrec import hugepages as hp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hp.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert hp.thp_mode(str(f)) == "always"
  assert hp.thp_mode(str(tmp_path / "missing")) is None


def test_tunable_value_and_merge_keep_the_users_other_tunables():
  env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1"}
  assert hp.tunable_value(env) is None
  merged = hp.with_tunable(env["GLIBC_TUNABLES"])
  assert merged == "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=1"
  assert hp.tunable_value({"GLIBC_TUNABLES": merged}) == "1"
  assert hp.with_tunable(None) == "glibc.malloc.hugetlb=1"
  assert hp.tunable_value({}) is None


@pytest.mark.parametrize("env,mode,glibc,go", [
    ({}, "madvise", (2, 36), True),
    ({}, "madvise", (2, 35), True),
    ({}, "madvise", (2, 34), False),          # the tunable arrived in 2.35
    ({}, "madvise", None, False),             # musl and others
    ({}, "always", (2, 36), False),           # huge pages already, no restart needed
    ({}, "never", (2, 36), False),
    ({}, None, (2, 36), False),               # no THP at all (not Linux, old kernel)
    ({"JAXREC_HUGE_PAGES": "0"}, "madvise", (2, 36), False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), False),  # user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", (2, 36), False),  # restarted
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 36), True),
])
def test_plan(env, mode, glibc, go):
  assert hp.plan(env, mode, glibc)[0] is go


def test_active():
  assert hp.active({}, "always")
  assert not hp.active({}, "madvise")
  assert hp.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise")
  assert not hp.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise")
  assert not hp.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "never")


# A child that logs each start, restarts itself once, then mallocs and touches 64 MiB and
# reports how much of its anonymous memory sits in huge pages.
_CHILD = r"""
import ctypes, json, os, sys
log = os.environ["LOG"]
with open(log, "a") as f:
  f.write("start\n")
from jaxrec import hugepages
hugepages.reexec_with_huge_pages()

def anon_huge_kb():
  with open("/proc/self/smaps_rollup") as f:
    for line in f:
      if line.startswith("AnonHugePages:"):
        return int(line.split()[1])
  return 0

before = anon_huge_kb()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "huge_kb": anon_huge_kb() - before}))
"""


def _run_child(tmp_path, **env):
  log = tmp_path / "log"
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  e = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXREC_HUGE_PAGES")}
  e.update(env, LOG=str(log), PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, str(script), "a b", "--flag=1"], env=e, check=True,
                       capture_output=True, text=True, timeout=60)
  return json.loads(out.stdout.strip().splitlines()[-1]), log.read_text().count("start")


_CAN = hp.plan({}, hp.thp_mode(), hp.glibc_version())[0]


@pytest.mark.skipif(not _CAN, reason="this machine's THP mode or libc needs no restart")
def test_restart_happens_once_keeps_argv_and_gives_huge_pages(tmp_path):
  got, starts = _run_child(tmp_path)
  assert starts == 2
  assert got["argv"] == ["a b", "--flag=1"]
  assert got["tunables"] == "glibc.malloc.hugetlb=1"
  # 64 MiB of plain malloc'd memory, touched: with the tunable most of it is in 2 MiB pages.
  assert got["huge_kb"] >= 32 * 1024, got


@pytest.mark.skipif(not _CAN, reason="this machine's THP mode or libc needs no restart")
def test_opt_out_runs_once_with_small_pages(tmp_path):
  got, starts = _run_child(tmp_path, JAXREC_HUGE_PAGES="0")
  assert starts == 1
  assert got["tunables"] is None
  assert got["huge_kb"] == 0, got


def test_the_users_explicit_setting_wins(tmp_path):
  # Wherever this runs: no restart, and the user's value is kept.
  got, starts = _run_child(tmp_path, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert starts == 1
  assert got["tunables"] == "glibc.malloc.hugetlb=0"
