"""Ablation: communication precision fp32 / bf16 / int8 of the dense all-reduce and the
embedding all_to_all, and hierarchical vs flat all-reduce, on 8 fake CPU devices.

  python benchmarks/ablate.py --config=experiments/configs/ablations/comm_precision.py

Needs the communication-precision keys (config.comm.dense_precision, .embedding_precision,
.dense_allreduce); until they exist the harness stops before any run and names the missing key.
Row-wise tables, so every lookup crosses the all_to_all. `:tiny` (seconds): fp32 and int8.
"""

from experiments.configs.ablations import common


def _comm(precision: str, allreduce: str = "psum") -> dict:
  return {"comm.dense_precision": precision, "comm.embedding_precision": precision,
          "comm.dense_allreduce": allreduce}


def get_config(variant: str = ""):
  c = common.ablation("comm_precision", "dense all-reduce and embedding all_to_all precision",
                      "experiments/configs/dlrm_sharded.py", variant, devices=8)
  c.overrides += (("embedding.sharding", "row_wise"),)
  if variant == "tiny":
    c.variants = (("fp32", _comm("fp32")), ("int8", _comm("int8")))
  else:
    c.variants = (("fp32", _comm("fp32")), ("bf16", _comm("bf16")), ("int8", _comm("int8")),
                  ("int8_hierarchical_2x4", {**_comm("int8", "hierarchical"),
                                             "mesh.shape": (2, 4)}),
                  ("fp32_hierarchical_2x4", {**_comm("fp32", "hierarchical"),
                                             "mesh.shape": (2, 4)}))
  return c
