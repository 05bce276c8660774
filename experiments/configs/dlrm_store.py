"""DLRM trained from a feature store (the synthetic stream ingested first), evaluated on a
held-out store of the examples that follow.

  python -m jaxrec.data.ingest --input=synthetic --preset=small --num_examples=10000000 \\
      --store=/tmp/jaxrec_store/train
  python -m jaxrec.data.ingest --input=synthetic --preset=small --start=10000000 \\
      --num_examples=200000 --store=/tmp/jaxrec_store/eval
  python experiments/train.py --config=experiments/configs/dlrm_store.py --workdir=/tmp/dlrm_store

The model, tables and optimizer are those of dlrm_synthetic.py; only the data differ: batches
come through the StorePipeline (block-shuffled, read ahead by Grain threads, put on devices
ahead of the step) and the pipeline's position is checkpointed, so a restarted run resumes on
the exact next batch. Stores ingested from the generator keep its click probability, so the
Bayes-optimal AUC is printed as for the synthetic source; a Criteo store
(`python -m jaxrec.data.ingest --input='day_*' --store=...`, with `--config.data.preset=''`)
reports test AUC and logloss only. Variants: `:tiny` (ingest `--num_examples=200000` and
`--start=200000 --num_examples=50000`), `:test` (the `:test` model of dlrm_synthetic).
`--config.data.shuffle=False` reads in store order: the same batches as the synthetic source.
"""

import ml_collections

from experiments.configs import dlrm_synthetic


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = dlrm_synthetic.get_config(variant)
  d = c.data
  d.source = "store"
  d.store_path = "/tmp/jaxrec_store/train"
  d.eval_store_path = "/tmp/jaxrec_store/eval"
  d.store_version = ml_collections.FieldReference(None, field_type=int)  # None: the newest
  d.train_examples = 0           # 0: one pass over the training store
  d.eval_examples = 0            # 0: the whole eval store (in whole eval batches)
  d.shuffle = True
  d.shuffle_seed = 0
  d.window_blocks = 8            # blocks of chunk_rows rows mixed by the shuffle
  d.read_threads = 2
  # data.preset stays: it sizes the tables from the vocabularies the store was ingested with.
  return c
