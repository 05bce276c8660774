"""Test setup: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Subprocess runs of experiments/train.py keep out of the home directory's compile cache.
os.environ.setdefault("JAXREC_COMPILE_CACHE", "")


def pytest_collection_modifyitems(config, items):
  """Tests that share a module-scoped fixture go first, one fixture's tests together.

  xdist's default ("load") scheduler hands each worker its first tests as one contiguous chunk
  of the collection (a quarter of its share, 40-odd tests here), so a fixture's tests placed side
  by side at the front run on one worker and build the fixture once; left where they are, they
  are often split and every worker builds it (the ablation grid took 22 s on each worker).
  xdist's own grouping (--dist=loadgroup) does not take with pytest 9.2, which no longer reads
  the renamed node ids it relies on. Without xdist the order changes nothing but the order."""
  def shared(item):
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
      return None
    names = sorted(n for n, defs in info.name2fixturedefs.items()
                   if defs and defs[-1].scope in ("module", "package", "session")
                   and defs[-1].baseid)  # fixtures of our test files, not plugins' (tmp_path...)
    return (item.nodeid.split("::")[0], tuple(names)) if names else None

  keys = [shared(i) for i in items]
  order = sorted(range(len(items)), key=lambda i: (keys[i] is None, keys[i] or ("", ()), i))
  items[:] = [items[i] for i in order]
