"""Wide & Deep on the synthetic Criteo-like stream: a linear model over the dense features and
the field embeddings (wide) plus an MLP over the concatenated embeddings (deep).

  python experiments/train.py --config=experiments/configs/wide_deep_synthetic.py --workdir=/tmp/wide_deep

Variants as dlrm_synthetic: `:tiny` (seconds), `:test` (used by tests), `:kaggle`.
"""

import ml_collections

from experiments.configs import dlrm_synthetic


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = dlrm_synthetic.get_config(variant)
  c.model.name = "wide_deep"
  c.model.top_mlp = (256, 128, 1)       # the deep part
  return c
