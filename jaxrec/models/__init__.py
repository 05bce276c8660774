"""The ranking-model zoo and its registry."""

from jaxrec.models.registry import build_model, register, MODELS
