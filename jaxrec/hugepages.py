"""Transparent huge pages for host memory: a launcher re-executes itself with glibc's THP tunable.

On a CPU the embedding tables are host memory, and a train step reads and writes rows at
random across them (tens of thousands of rows a step, from tables of hundreds of MB). With
4 KiB pages nearly every such row costs a TLB miss and a page walk; with 2 MiB pages the
whole table fits the TLB's reach. Measured on this project's 2-core CPU (benchmarks/README.md):
DLRM's fp32 SGD step with 26 x 100k tables ran about 30% faster.

Linux gives anonymous memory huge pages either always (``/sys/kernel/mm/transparent_hugepage/
enabled`` = ``always``) or only where the program asked with ``madvise(MADV_HUGEPAGE)``
(``madvise``, the common default). XLA:CPU allocates through glibc's malloc, and glibc >= 2.35
madvises its heap and mmap'd chunks when the tunable ``glibc.malloc.hugetlb=1`` is set. glibc
reads tunables once, at process start, from the ``GLIBC_TUNABLES`` environment variable, so the
only way in for a Python program is to start again with it: ``reexec_with_huge_pages`` does
that (``os.execve`` of the same interpreter and command line), before any work is done.

It changes nothing when THP is ``always`` or ``never``, off Linux or glibc, when the variable
already names the tunable (the user's choice, ``=0`` included, wins), or when
``JAXREC_HUGE_PAGES=0``. Only launchers call it (experiments/train.py, the benchmarks); the
library itself never touches the process environment.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
ENV = "GLIBC_TUNABLES"
OPT_OUT = "JAXREC_HUGE_PAGES"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)


def thp_mode(path: str = _THP_ENABLED) -> str | None:
  """The kernel's THP mode (``always``, ``madvise`` or ``never``); None if it has none."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  m = re.search(r"\[(\w+)\]", text)
  return m.group(1) if m else None


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library if it is glibc, else None."""
  try:
    s = os.confstr("CS_GNU_LIBC_VERSION") or ""
  except (AttributeError, ValueError, OSError):
    return None
  m = re.fullmatch(r"glibc (\d+)\.(\d+).*", s)
  return (int(m.group(1)), int(m.group(2))) if m else None


def tunable_value(environ=None) -> str | None:
  """The value ``GLIBC_TUNABLES`` gives ``glibc.malloc.hugetlb``, or None if it is not set."""
  environ = os.environ if environ is None else environ
  for item in environ.get(ENV, "").split(":"):
    name, _, value = item.partition("=")
    if name == TUNABLE:
      return value
  return None


def with_tunable(current: str | None) -> str:
  """``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1`` added, keeping the other tunables."""
  items = [i for i in (current or "").split(":") if i]
  return ":".join([*items, f"{TUNABLE}=1"])


def plan(environ=None, mode: str | None = None, glibc: tuple[int, int] | None = None
         ) -> tuple[bool, str]:
  """(whether to re-execute, why), from the environment, the THP mode and the glibc version."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1") == "0":
    return False, f"{OPT_OUT}=0"
  value = tunable_value(environ)
  if value is not None:
    return False, f"{ENV} already sets {TUNABLE}={value}"
  if mode != "madvise":
    return False, f"transparent huge pages are {mode or 'unavailable'}"
  if glibc is None or glibc < _MIN_GLIBC:
    return False, f"needs glibc >= {_MIN_GLIBC[0]}.{_MIN_GLIBC[1]}, have {glibc}"
  return True, f"THP is madvise-only: restarting with {ENV}={TUNABLE}=1"


def active(environ=None, mode: str | None = None) -> bool:
  """Whether this process's large allocations may get huge pages."""
  mode = thp_mode() if mode is None else mode
  return mode == "always" or (mode == "madvise" and tunable_value(environ) not in (None, "0"))


def reexec_with_huge_pages(enable: bool = True) -> None:
  """Restart this process with glibc's THP tunable when it helps (see the module doc).

  Call it first thing in a launcher's main, before jax has allocated anything: what ran before
  is lost (stdout/stderr are flushed). Returns only when no restart is needed.
  """
  if not enable:
    return
  go, _ = plan(os.environ, thp_mode(), glibc_version())
  if not go:
    return
  env = dict(os.environ)
  env[ENV] = with_tunable(env.get(ENV))
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv keeps the interpreter options and ``-m`` of the original command line.
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
  os.execve(sys.executable, argv, env)
