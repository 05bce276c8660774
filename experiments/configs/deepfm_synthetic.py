"""DeepFM on the synthetic Criteo-like stream: first-order + FM pairwise term + deep MLP over
the 26 field embeddings and the dense features projected to one more field.

  python experiments/train.py --config=experiments/configs/deepfm_synthetic.py --workdir=/tmp/deepfm

Variants as dlrm_synthetic: `:tiny` (seconds), `:test` (used by tests), `:kaggle`.

Measured (2-core shared CPU): `:test` with --config.data.train_examples=5000000
--config.data.eval_start=5000000 --config.data.eval_examples=200000 (4,882 steps x 1,024):
AUC 0.8536 vs Bayes 0.8645, 0.970 of the margin over 0.5; a deep part of (256, 128, 1)
gave the same AUC (0.8536), so the default stays.
"""

import ml_collections

from experiments.configs import dlrm_synthetic


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = dlrm_synthetic.get_config(variant)
  c.model.name = "deepfm"
  c.model.bottom_mlp = (64, 16)         # dense features -> one 16-dim FM field
  c.model.top_mlp = (128, 64, 1)        # the deep part
  return c
