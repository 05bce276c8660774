"""DLRM on the synthetic Criteo-like stream (the quick-start run).

  python experiments/train.py --config=experiments/configs/dlrm_synthetic.py --workdir=/tmp/dlrm

Variants: `--config=experiments/configs/dlrm_synthetic.py:tiny` (seconds, used by tests),
`:kaggle` (Criteo-Kaggle-sized vocabularies). Any field can be overridden, e.g.
`--config.data.train_examples=1000000 --config.model.embedding_dim=32`.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every_steps = 200

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.preset = "small"
  c.data.seed = 0
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.num_dense = 13
  c.data.train_examples = 4_000_000
  c.data.eval_examples = 200_000
  c.data.eval_start = 0          # 0: evaluate on the examples right after the training range
  c.data.batch_size = 1024
  c.data.eval_batch_size = 8192

  c.model = ml_collections.ConfigDict()
  c.model.name = "dlrm"
  c.model.embedding_dim = 16
  c.model.bottom_mlp = (64, 16)
  c.model.top_mlp = (128, 64, 1)
  c.model.compute_dtype = "float32"

  c.embedding = ml_collections.ConfigDict()
  c.embedding.optimizer = "rowwise_adagrad"
  c.embedding.learning_rate = 0.05
  c.embedding.max_rows = 1 << 18
  c.embedding.rows_factor = 2.0
  c.embedding.min_rows = 64
  c.embedding.pooling = "sum"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.decay = "constant"

  if variant == "tiny":
    c.data.train_examples = 200_000
    c.data.eval_examples = 50_000
    c.log_every_steps = 50
  elif variant == "kaggle":
    c.data.preset = "kaggle"
    c.embedding.max_rows = 1 << 20
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of dlrm_synthetic (tiny, kaggle)")
  return c
