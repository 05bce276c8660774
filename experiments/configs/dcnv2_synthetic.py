"""DCNv2 on the synthetic Criteo-like stream: the DLRM quick start with cross layers in place
of the dot interaction.

  python experiments/train.py --config=experiments/configs/dcnv2_synthetic.py --workdir=/tmp/dcnv2

Variants as dlrm_synthetic: `:tiny` (seconds), `:test` (used by tests), `:kaggle`. The cross
structure: `--config.model.options.structure=parallel` (cross || deep; default stacked: cross,
then deep), `--config.model.options.low_rank=64` (W = U V^T), `--config.model.options.num_cross_layers=2`.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import dlrm_synthetic


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = dlrm_synthetic.get_config(variant)
  c.model.name = "dcnv2"
  c.model.top_mlp = (128, 64, 1)        # the deep part; its last layer is the output
  c.model.options = ml_collections.ConfigDict()
  c.model.options.num_cross_layers = 3
  c.model.options.structure = "stacked"
  c.model.options.low_rank = config_dict.placeholder(int)   # None: full-rank W [d, d]
  return c
