"""DLRM on the synthetic Criteo-like stream (the quick-start run).

  python experiments/train.py --config=experiments/configs/dlrm_synthetic.py --workdir=/tmp/dlrm

Variants: `--config=experiments/configs/dlrm_synthetic.py:tiny` (seconds), `:test` (the
quick start in miniature, used by tests),
`:kaggle` (Criteo-Kaggle-sized vocabularies). Any field can be overridden, e.g.
`--config.data.train_examples=1000000 --config.model.embedding_dim=32`.
"""

import dataclasses

import ml_collections

from jaxrec.data.synthetic import SyntheticConfig


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every_steps = 200
  c.eval_every_steps = 0            # >0: held-out AUC/logloss every N steps in metrics.jsonl

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = None               # None: every local device on one "data" axis
  c.mesh.axis_names = None          # None: ("data",), or ("host", "local") for 2-D shapes

  # Snapshots in workdir/checkpoints (only when --workdir is given): resume on restart; the
  # monitor's "rollback" restores one and skips the data window after an anomaly.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True
  c.checkpoint.every_steps = 2000
  c.checkpoint.keep = 3
  c.checkpoint.incremental = True

  # Training monitors (jaxrec/monitoring/monitor.py lists the records): metrics.jsonl and
  # TensorBoard event files in workdir/tensorboard, every log_every_steps.
  c.monitor = ml_collections.ConfigDict()
  c.monitor.tensorboard = True
  # On NaN/Inf in the loss or gradients, or a spike: "log", "stop" (raise, naming the step and
  # metric) or "rollback" (needs checkpoints; without a workdir it stops instead).
  c.monitor.anomaly_action = "rollback"
  c.monitor.spike_factor = 10.0         # x the running mean of loss / grad norms; 0: NaN/Inf only
  c.monitor.spike_warmup_steps = 100
  c.monitor.max_rollbacks = 5
  c.monitor.check_every_steps = 10      # anomaly scalars fetched together: no per-step sync
  c.monitor.streaming_auc_bins = 1024   # logit bins of the streaming training AUC
  c.monitor.hot_row_fraction = 0.01     # hot_row_share: lookups hitting the batch's top 1% rows

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.preset = "small"
  c.data.seed = 0
  # Every scalar knob of the stream and its teacher, overridable from the command line, e.g.
  # --config.data.synthetic.drift=1e-4 (vocabularies come from the preset).
  c.data.synthetic = ml_collections.ConfigDict(
      {f.name: getattr(SyntheticConfig(), f.name) for f in dataclasses.fields(SyntheticConfig)
       if f.name not in ("seed", "cardinalities", "max_ids")})
  c.data.num_dense = 13
  c.data.train_examples = 10_000_000
  c.data.eval_examples = 200_000
  c.data.eval_start = 0          # 0: evaluate on the examples right after the training range
  c.data.batch_size = 1024
  c.data.eval_batch_size = 8192
  c.data.drop_features = ()      # sparse features to blank out (ablations)

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
  c.embedding.rows_factor = 16.0     # hashed tables: few collisions among frequent IDs
  c.embedding.min_rows = 64
  c.embedding.pooling = "sum"
  # Sharding: the planner decides unless `sharding` names one type for every table.
  c.embedding.sharding = ""
  c.embedding.memory_budget_mib = 1024.0  # per device; tables over half of it go row-wise
  c.embedding.replicate_below_kib = 1024.0
  c.embedding.capacity_factor = None      # None: all_to_all buckets that never overflow
  c.embedding.dedup = True                # False: send every lookup, not each row once

  # Collectives (jaxrec.comm): the defaults are XLA's flat fp32 all-reduce and fp32 rows.
  c.comm = ml_collections.ConfigDict()
  c.comm.dense_allreduce = "psum"         # or "hierarchical" on a ("host", "local") mesh
  c.comm.dense_precision = "fp32"         # bf16 / int8 add an error-feedback residual
  c.comm.stochastic_rounding = False
  c.comm.block_size = 256                 # values per int8 scale
  c.comm.embedding_precision = "fp32"     # gradient rows: fp32 / bf16 / fp16 / int8 (per row)
  c.comm.embedding_forward_precision = "fp32"  # looked-up rows on the forward all_to_all
  c.comm.compact_ids = False              # row IDs as uint16 where a stack's rows fit

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.decay = "cosine"

  if variant == "tiny":
    c.data.train_examples = 200_000
    c.data.eval_examples = 50_000
    c.log_every_steps = 50
  elif variant == "test":
    # The quick start in miniature (vocabularies / 10), for the test suite: under a minute.
    c.data.preset = "test"
    c.data.train_examples = 800_000
    c.data.eval_examples = 50_000
    c.data.eval_start = 800_000      # pinned, so runs on less data are judged on the same examples
    c.log_every_steps = 100
    c.mesh.shape = (1,)              # the suite fakes 8 devices; sharding has its own tests
  elif variant == "kaggle":
    c.data.preset = "kaggle"
    c.embedding.max_rows = 1 << 20
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of dlrm_synthetic (tiny, test, kaggle)")
  return c
