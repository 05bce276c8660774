"""Ablation: batch size with the linear learning-rate scaling rule and warmup (DLRM).

  python benchmarks/ablate.py --config=experiments/configs/ablations/batch_size.py

Every run sees the same examples. The dense (Adam) and sparse (row-wise Adagrad) learning
rates scale with batch / 1024; warmup is a fixed number of steps, so bigger batches warm up
over more examples. `b4096_no_warmup` and `b4096_unscaled` are the controls that show what the
rule and the warmup do. Curves are plotted against examples. `:tiny` (seconds): two sizes.
"""

from experiments.configs.ablations import common

_DENSE_LR, _SPARSE_LR, _REF = 1e-3, 0.05, 1024


def _batch(b: int, warmup: int, scale: bool = True) -> dict:
  k = b / _REF if scale else 1.0
  return {"data.batch_size": b, "optimizer.learning_rate": _DENSE_LR * k,
          "embedding.learning_rate": _SPARSE_LR * k, "optimizer.warmup_steps": warmup}


def get_config(variant: str = ""):
  c = common.ablation("batch_size", "batch size, learning rate scaled with batch / 1024, warmup",
                      "experiments/configs/dlrm_synthetic.py", variant)
  c.x_axis = "examples"
  if variant == "tiny":
    c.variants = (("b256", _batch(256, 8)), ("b1024", _batch(1024, 4)))
    return c
  c.variants = (("b256", _batch(256, 25)), ("b1024", _batch(1024, 25)),
                ("b4096", _batch(4096, 25)), ("b4096_no_warmup", _batch(4096, 1)),
                ("b4096_unscaled", _batch(4096, 25, scale=False)))
  return c
