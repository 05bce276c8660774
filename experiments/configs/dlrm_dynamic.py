"""DLRM with dynamic embedding tables (device hash tables) on the synthetic stream with drift.

New IDs keep entering the stream (``data.synthetic.drift``: identities shift per example), so
fixed tables either grow with the run or collide; dynamic tables hold only the IDs that earned
a row: admission after 2 sightings, age eviction (``steps_to_live``) every K steps and past a
load factor, capacity below the number of distinct IDs.

  python experiments/train.py --config=experiments/configs/dlrm_dynamic.py --workdir=/tmp/dyn

The baseline, the same model and stream with large static hashed tables:

  python experiments/train.py --config=experiments/configs/dlrm_dynamic.py:static \
      --workdir=/tmp/dyn_static

Variants (joined with "_", e.g. `:test_static`): `tiny` (seconds), `test` (the test suite's
miniature of the quick start), `static` (the baseline), `mixed` (features with fewer than
1,000 IDs keep a static hashed table, the rest are dynamic: both engines in one step).
Per-table stats (size, load factor, admitted, rejected, evicted, probe-length mean, insert
failures) are in metrics.jsonl as `dynamic/<table>/<stat>`; `dynamic/size` is the rows held
over all dynamic tables.
"""

import ml_collections

from experiments.configs import dlrm_synthetic


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  variants = set(variant.split("_")) if variant else set()
  unknown = variants - {"tiny", "test", "static", "mixed"}
  if unknown or {"tiny", "test"} <= variants or {"static", "mixed"} <= variants:
    raise ValueError(f"unknown variant {variant!r} of dlrm_dynamic (tiny, test, static, mixed "
                     "and their '_' joins, e.g. test_static)")
  base = "tiny" if "tiny" in variants else "test" if "test" in variants else ""
  c = dlrm_synthetic.get_config(base)
  c.data.synthetic.drift = 0.002        # a new identity enters each feature every 500 examples
  c.embedding.dynamic = "static" not in variants
  # Features with a vocabulary below this keep a static hashed table (0: all dynamic); the
  # model then mixes both engines (jaxrec.embedding.mixed).
  c.embedding.dynamic_min_vocab = 1000 if "mixed" in variants else 0
  # One program per group of same-shaped tables: ~1.5x faster compile, ~2x slower CPU step.
  c.embedding.dynamic_group_tables = False
  c.embedding.dynamic_table = ml_collections.ConfigDict()
  d = c.embedding.dynamic_table
  d.capacity_factor = 0.5               # rows per vocabulary entry: below the distinct IDs seen
  d.min_capacity = 64
  d.max_capacity = 1 << 17
  d.min_count = 2                       # admission: an ID earns a row on its second sighting
  d.steps_to_live = 200                 # age eviction: IDs unseen for 200 steps leave
  d.evict_every_steps = 50
  d.evict_above_load_factor = 0.9       # ... and whenever a shard passes 90% full
  d.max_load_factor = 0.8               # eviction then trims least recently used to 80%
  d.on_full = "evict"
  d.default_row = "zeros"               # or "trainable": one learned row for IDs without a row
  return c
