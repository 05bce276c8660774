"""The part every embedding engine over a mesh shares (static and dynamic tables alike)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


class MeshEngine:
  """Subclasses set ``mesh``, ``axes`` (the mesh's axis names), ``num_devices`` and ``layout``
  (the batch's SparseLayout) and define ``state_specs``."""

  mesh: jax.sharding.Mesh
  axes: tuple[str, ...]
  num_devices: int

  def _check_batch_shape(self, ids):
    if ids.ndim != 3 or ids.shape[1] != self.layout.num_columns or ids.shape[2] != 2:
      raise ValueError(f"ids must be [batch, {self.layout.num_columns}, 2] uint32 (lo, hi) "
                       f"pairs for features {self.layout.names}; got shape {ids.shape}")
    if ids.shape[0] % self.num_devices:
      raise ValueError(f"batch size {ids.shape[0]} is not divisible by the {self.num_devices} "
                       "devices of the mesh")

  def state_specs(self):
    raise NotImplementedError

  def state_shardings(self):
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self.state_specs(),
                        is_leaf=lambda x: isinstance(x, P))

  @property
  def batch_sharding(self) -> NamedSharding:
    """How ids/mask/dense/labels are split: examples over every device."""
    return NamedSharding(self.mesh, P(self.axes))
