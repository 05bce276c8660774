"""DLRM small enough to run as several processes on one machine (the multi-process tests).

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      python experiments/train.py --config=experiments/configs/dlrm_multihost.py

The same model and data as one process with 8 devices:
`JAX_NUM_CPU_DEVICES=8 python experiments/train.py --config=experiments/configs/dlrm_multihost.py`.
Eight sparse features with a mix of table sizes, so the planner places some tables whole on
one device and replicates others; 30 steps of 512 examples; a loss line every step.
"""

import ml_collections

from experiments.configs import dlrm_synthetic


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = dlrm_synthetic.get_config("tiny")
  c.log_every_steps = 1
  c.data.preset = "kaggle"   # the generator without preset vocabularies: ours come next
  c.data.synthetic.cardinalities = (20000, 8000, 3000, 2000, 500, 100, 50, 10)
  c.data.synthetic.weighted_features = 8
  c.data.synthetic.num_pairs = 3
  c.data.batch_size = 512
  c.data.train_examples = 30 * 512
  c.data.eval_start = 30 * 512
  c.data.eval_examples = 4096
  c.data.eval_batch_size = 1024
  c.model.bottom_mlp = (32, 16)
  c.model.top_mlp = (64, 1)
  c.optimizer.warmup_steps = 5
  c.checkpoint.every_steps = 10
  if variant == "long":   # for killing a process mid-run: minutes of training
    c.data.train_examples = 100_000 * 512
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of dlrm_multihost (long)")
  return c
