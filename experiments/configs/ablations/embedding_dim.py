"""Ablation: embedding dim 16 / 64 / 128 (DLRM; the bottom MLP ends at the dim).

  python benchmarks/ablate.py --config=experiments/configs/ablations/embedding_dim.py

`:tiny` (seconds; two dims): --config=experiments/configs/ablations/embedding_dim.py:tiny
"""

from experiments.configs.ablations import common


def get_config(variant: str = ""):
  c = common.ablation("embedding_dim", "DLRM embedding dim (bottom MLP 64-d)",
                      "experiments/configs/dlrm_synthetic.py", variant)
  dims = (16, 64) if variant == "tiny" else (16, 64, 128)
  c.variants = tuple((f"dim{d}", {"model.embedding_dim": d, "model.bottom_mlp": (64, d)})
                     for d in dims)
  return c
