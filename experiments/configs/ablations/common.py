"""Run sizes shared by the ablation configs: the default grid takes minutes on a 2-core CPU,
`:tiny` seconds."""

import ml_collections


def ablation(name: str, description: str, base: str, variant: str,
             devices: int = 1) -> ml_collections.ConfigDict:
  """An ablation of ``base`` (an experiment config with a `:tiny` variant, resized here).

  Default: the test-sized stream (vocabularies / 10), 160k training examples, held-out AUC every
  40 steps, 3 seeds. `tiny`: 16k examples, batch 512, 2 seeds (the test suite's size).
  """
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of ablation {name} (tiny)")
  c = ml_collections.ConfigDict()
  c.name = name + ("_tiny" if variant else "")
  c.description = description
  c.kind = "train"
  c.base = base + ":tiny"
  c.devices = devices        # CPU devices each run sees (meshes: set mesh.shape in overrides)
  c.seed_keys = ("seed",)    # model and table init; the data stream stays the same
  c.x_axis = "steps"
  if variant == "tiny":
    c.seeds = (0, 1)
    c.overrides = (("data.preset", "test"), ("data.train_examples", 16_384),
                   ("data.batch_size", 512), ("data.eval_examples", 8_192),
                   ("data.eval_batch_size", 4_096), ("data.eval_start", 800_000),
                   ("optimizer.warmup_steps", 8), ("log_every_steps", 8),
                   ("eval_every_steps", 8))
  else:
    c.seeds = (0, 1, 2)
    c.overrides = (("data.preset", "test"), ("data.train_examples", 160_000),
                   ("data.eval_examples", 50_000), ("data.eval_start", 800_000),
                   ("optimizer.warmup_steps", 25), ("log_every_steps", 20),
                   ("eval_every_steps", 40))
  return c
