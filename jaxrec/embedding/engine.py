"""The part every embedding engine over a mesh shares (static and dynamic tables alike)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


class MeshEngine:
  """Subclasses set ``mesh`` and ``axes`` (the mesh's axis names) and define ``state_specs``."""

  mesh: jax.sharding.Mesh
  axes: tuple[str, ...]

  def state_specs(self):
    raise NotImplementedError

  def state_shardings(self):
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self.state_specs(),
                        is_leaf=lambda x: isinstance(x, P))

  @property
  def batch_sharding(self) -> NamedSharding:
    """How ids/mask/dense/labels are split: examples over every device."""
    return NamedSharding(self.mesh, P(self.axes))
