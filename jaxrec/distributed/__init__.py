"""Multi-device and multi-host setup: joining the run, the mesh, per-process data."""

from jaxrec.distributed.cluster import ClusterSpec, detect
from jaxrec.distributed.data import (is_main_process, process_batches, process_rows, to_global,
                                     to_host)
from jaxrec.distributed.mesh import make_mesh
from jaxrec.distributed.runtime import CoordinatorUnreachable, Timeouts, initialize, spec
