"""MMoE (two tasks, e.g. click and conversion) on the synthetic Criteo-like stream.

  python experiments/train.py --config=experiments/configs/mmoe_synthetic.py --workdir=/tmp/mmoe

The model has two heads, but the synthetic stream has one label and the train step fits
logits[:, 0] only: this run trains the first (click) head with its gate, the shared experts and
the embeddings; the second head is untrained. Variants as dlrm_synthetic: `:tiny`, `:test`, `:kaggle`.
"""

import ml_collections

from experiments.configs import dlrm_synthetic


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = dlrm_synthetic.get_config(variant)
  c.model.name = "mmoe"
  c.model.top_mlp = (64, 1)             # each task's tower
  c.model.options = ml_collections.ConfigDict()
  c.model.options.num_tasks = 2
  c.model.options.num_experts = 4
  c.model.options.expert_mlp = (128, 64)
  return c
