"""What the train step's collectives send: the ``config.comm`` block as a frozen spec."""

from __future__ import annotations

import dataclasses

from jaxrec.comm import allreduce, codec


@dataclasses.dataclass(frozen=True)
class CommSpec:
  """dense_allreduce: "psum" (XLA's flat all-reduce) or "hierarchical" (host/local mesh).
  dense_precision: "fp32" | "bf16" | "int8" for the dense-gradient all-reduce; bf16 and int8
    carry an error-feedback residual per device in the train state.
  stochastic_rounding: int8 rounds stochastically (unbiased) instead of to nearest.
  block_size: values per int8 scale in the dense all-reduce.
  embedding_precision: rows of the embedding-gradient exchange ("fp32" | "bf16" | "fp16" |
    "int8", int8 scaled per row).
  embedding_forward_precision: the same for the forward exchange of looked-up rows.
  compact_ids: row IDs on the embedding exchanges as uint16 where the rows fit.
  """

  dense_allreduce: str = "psum"
  dense_precision: str = "fp32"
  stochastic_rounding: bool = False
  block_size: int = 256
  embedding_precision: str = "fp32"
  embedding_forward_precision: str = "fp32"
  compact_ids: bool = False

  def __post_init__(self):
    if self.dense_allreduce not in allreduce.METHODS:
      raise ValueError(f"config.comm.dense_allreduce={self.dense_allreduce!r}; expected one of "
                       f"{list(allreduce.METHODS)}")
    if self.dense_precision not in ("fp32", "bf16", "int8"):
      raise ValueError(f"config.comm.dense_precision={self.dense_precision!r}; expected fp32, "
                       "bf16 or int8")
    codec.check_precision(self.embedding_precision, "config.comm.embedding_precision")
    codec.check_precision(self.embedding_forward_precision,
                          "config.comm.embedding_forward_precision")
    if int(self.block_size) < 1:
      raise ValueError(f"config.comm.block_size={self.block_size}; must be >= 1")

  @classmethod
  def from_config(cls, cfg) -> "CommSpec":
    """From a ``config.comm`` ConfigDict/dict (None or missing keys: the defaults)."""
    cfg = dict(cfg or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise ValueError(f"config.comm has unknown fields {unknown}; known: {sorted(known)}")
    return cls(**cfg)

  @property
  def dense_is_default(self) -> bool:
    """The dense gradients reduce as in a plain jit step (XLA's psum, fp32)."""
    return self.dense_allreduce == "psum" and self.dense_precision == "fp32"

  @property
  def error_feedback(self) -> bool:
    return self.dense_precision != "fp32"
