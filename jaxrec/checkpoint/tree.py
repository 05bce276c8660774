"""Pytrees as flat ``{"a/b/0/c": leaf}`` dicts: the form every snapshot is written in.

A flat dict keyed by path strings is what lets a snapshot outlive the code that wrote it: a
restore matches leaves by name, so a warm start into a changed model keeps what still fits and a
dynamic layout (embedding stacks, hash shards) can be rebuilt under a prefix.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np

SEP = "/"


def _key_str(k) -> str:
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(keypath) -> str:
  """``(GetAttrKey('emb'), DictKey('tables'), DictKey('s0'))`` -> ``"emb/tables/s0"``."""
  return SEP.join(_key_str(k) for k in keypath)


def flatten(tree) -> tuple[dict[str, Any], Any]:
  """(``{path: leaf}`` in tree order, treedef). Paths must be unique (they are for any pytree
  whose keys contain no ``/``)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat: dict[str, Any] = {}
  for kp, leaf in leaves:
    p = path_str(kp)
    if p in flat:
      raise ValueError(f"two leaves of the state have the same checkpoint path {p!r}; a dict key "
                       "contains '/' (rename it)")
    flat[p] = leaf
  return flat, treedef


def unflatten(treedef, paths: Iterable[str], flat: dict[str, Any]):
  """Inverse of ``flatten``: ``paths`` in the treedef's leaf order."""
  return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])


def under(path: str, prefix: str) -> bool:
  return prefix == "" or path == prefix or path.startswith(prefix + SEP)


def rel(path: str, prefix: str) -> str:
  return path[len(prefix) + 1:] if prefix else path


def is_key_array(x) -> bool:
  dt = getattr(x, "dtype", None)
  return dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def shape_dtype(x) -> dict:
  """JSON description of a leaf: shape and dtype (PRNG keys by their impl)."""
  if is_key_array(x):
    return {"shape": list(x.shape), "dtype": f"key<{jax.random.key_impl(x)}>",
            "data_shape": list(jax.random.key_data(x).shape)}
  return {"shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype if not hasattr(x, "dtype")
                                                    else np.dtype(x.dtype))}


def nbytes(x) -> int:
  if is_key_array(x):
    return int(jax.random.key_data(x).nbytes)
  return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
