"""Ablation: static hashed tables vs dynamic hash tables (admission + eviction) on a drifting
stream (experiments/configs/dlrm_dynamic.py).

  python benchmarks/ablate.py --config=experiments/configs/ablations/dynamic_tables.py

`:tiny` (seconds): --config=experiments/configs/ablations/dynamic_tables.py:tiny
"""

from experiments.configs.ablations import common


def get_config(variant: str = ""):
  c = common.ablation("dynamic_tables", "static hashed vs dynamic tables, drifting IDs",
                      "experiments/configs/dlrm_dynamic.py", variant)
  c.variants = (("static", {"embedding.dynamic": False}),
                ("dynamic", {"embedding.dynamic": True}))
  return c
