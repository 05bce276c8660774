"""name -> constructor, so configs pick a model by name."""

from __future__ import annotations

from typing import Callable

from flax import nnx

MODELS: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str):
  def deco(fn):
    if name in MODELS:
      raise ValueError(f"model {name!r} registered twice")
    MODELS[name] = fn
    return fn
  return deco


def build_model(name: str, **kwargs) -> nnx.Module:
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
  return MODELS[name](**kwargs)


@register("dlrm")
def _dlrm(**kw):
  from jaxrec.models.dlrm import DLRM
  return DLRM(**kw)


@register("dcnv2")
def _dcnv2(**kw):
  from jaxrec.models.dcnv2 import DCNv2
  return DCNv2(**kw)


@register("deepfm")
def _deepfm(**kw):
  from jaxrec.models.deepfm import DeepFM
  return DeepFM(**kw)


@register("wide_deep")
def _wide_deep(**kw):
  from jaxrec.models.wide_deep import WideDeep
  return WideDeep(**kw)


@register("mmoe")
def _mmoe(**kw):
  from jaxrec.models.mmoe import MMoE
  return MMoE(**kw)
