"""jaxrec vs TorchRec DLRM training throughput on CPU: fp32 / bf16 x SGD / Adagrad.

  python benchmarks/ablate.py --config=experiments/configs/ablations/torchrec_cpu.py

Each cell runs benchmarks/dlrm_throughput.py (jaxrec, then benchmarks/torchrec_dlrm.py in the
TorchRec venv on the same model and data: batch 2048, dim 64, 26 x 100k tables, MLPs
512-256-64 / 512-256-1). TorchRec always trains fp32; `bf16` is jaxrec's bf16 matmuls with fp32
parameters, tables and optimizer state. TorchRec is never a jaxrec dependency: it lives in
its own venv, named by --config.torchrec_python ('' runs jaxrec alone). Repeats = seeds.
`:tiny` (seconds + the TorchRec import): small tables and MLPs, 2 windows.
"""

import ml_collections


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of ablation torchrec_cpu (tiny)")
  c = ml_collections.ConfigDict()
  c.name = "torchrec_cpu" + ("_tiny" if variant else "")
  c.description = "DLRM training samples/s, jaxrec vs TorchRec DMP (fused FBGEMM TBE), CPU"
  c.kind = "dlrm_throughput"
  c.devices = 1
  c.torchrec_python = "/work/torchrec-venv/bin/python"
  c.seeds = (0, 1)
  c.overrides = (("windows", 5), ("warmup", 10), ("steps_per_window", 10))
  if variant == "tiny":
    c.seeds = (0,)
    c.overrides = (("windows", 2), ("warmup", 2), ("steps_per_window", 2), ("batch_size", 256),
                   ("num_tables", 4), ("rows_per_table", 1000), ("bottom_mlp", "32,16"),
                   ("top_mlp", "32,1"), ("embedding_dim", 16))
  c.variants = tuple((f"{opt}_{'fp32' if dt == 'float32' else 'bf16'}",
                      {"optimizer": opt, "compute_dtype": dt})
                     for dt in ("float32", "bfloat16") for opt in ("sgd", "adagrad"))
  return c
