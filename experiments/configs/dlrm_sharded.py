"""DLRM on the synthetic Criteo-like stream, embeddings sharded over 8 devices.

The quick start (dlrm_synthetic.py) on a mesh: the planner places every table (data-parallel
when tiny, table-wise when it fits a device's share, row-wise when big; it prints the plan),
the batch is split over the devices, and the lookup routes IDs with all_to_all. On a CPU, fake
the 8 devices:

  JAX_NUM_CPU_DEVICES=8 python experiments/train.py \
      --config=experiments/configs/dlrm_sharded.py --workdir=/tmp/dlrm_sharded

Variants: `:tiny` (seconds), `:2x4` (a ("host", "local") mesh: big tables go table-row-wise,
row-wise inside one host), `:tiny_2x4`. Override the plan with e.g.
`--config.embedding.sharding=row_wise` (every table) or `--config.embedding.memory_budget_mib=8`.
"""

import ml_collections

from experiments.configs import dlrm_synthetic


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  variants = set(variant.split("_")) if variant else set()
  unknown = variants - {"tiny", "2x4"}
  if unknown:
    raise ValueError(f"unknown variant {variant!r} of dlrm_sharded (tiny, 2x4, tiny_2x4)")
  c = dlrm_synthetic.get_config("tiny" if "tiny" in variants else "")
  c.mesh.shape = (2, 4) if "2x4" in variants else (8,)
  c.embedding.memory_budget_mib = 32.0   # small enough that the big tables go row-wise
  return c
