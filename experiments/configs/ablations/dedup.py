"""Ablation: ID dedup before the embedding all_to_all on / off, 8 fake CPU devices, row-wise
tables (the Zipf-distributed stream repeats popular IDs within a batch).

  python benchmarks/ablate.py --config=experiments/configs/ablations/dedup.py

Needs config.embedding.dedup (the communication branch); until it exists the harness stops
before any run and names the missing key. `:tiny` (seconds).
"""

from experiments.configs.ablations import common


def get_config(variant: str = ""):
  c = common.ablation("dedup", "ID dedup before the all_to_all",
                      "experiments/configs/dlrm_sharded.py", variant, devices=8)
  c.overrides += (("embedding.sharding", "row_wise"),)
  c.variants = (("dedup_on", {"embedding.dedup": True}),
                ("dedup_off", {"embedding.dedup": False}))
  return c
