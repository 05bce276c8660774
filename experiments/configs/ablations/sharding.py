"""Ablation: embedding sharding types on 8 fake CPU devices (DLRM, every table one type).

  python benchmarks/ablate.py --config=experiments/configs/ablations/sharding.py

Each run is its own process with JAX_NUM_CPU_DEVICES=8 (the harness sets it). `table_row_wise`
needs hosts: it runs on a ("host", "local") = (2, 4) mesh, the others on (8,). `planner` lets
the planner choose per table. On one CPU the 8 devices share two cores, so samples/s measures
the extra routing work, not a multi-chip speedup. `:tiny` (seconds): two types.
"""

from experiments.configs.ablations import common


def get_config(variant: str = ""):
  c = common.ablation("sharding", "embedding sharding type, 8 fake CPU devices",
                      "experiments/configs/dlrm_sharded.py", variant, devices=8)
  types = ("data_parallel", "row_wise") if variant == "tiny" else (
      "data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise")
  c.overrides += (("embedding.memory_budget_mib", 256.0),)  # data_parallel replicates all
  c.variants = tuple(
      (t, {"embedding.sharding": t, **({"mesh.shape": (2, 4)} if t == "table_row_wise" else {})})
      for t in types)
  if variant != "tiny":
    c.variants += (("planner", {}),)
  return c
