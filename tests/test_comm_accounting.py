"""HLO wire accounting against byte counts worked out by hand."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxrec.comm.accounting import collective_bytes
from jaxrec.distributed.mesh import make_mesh


def _compiled(mesh, f, x):
  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(mesh.axis_names),
                             out_specs=P(mesh.axis_names), check_vma=False))
  return fn.lower(x).compile()


# (collective on a per-device f32[64] = 256 B, expected kind, axis, wire bytes per device)
CASES = [
    (lambda x: jax.lax.psum(x, "local"), "all-reduce", "local", 2 * 3 / 4 * 256),
    (lambda x: jax.lax.psum(x, ("host", "local")), "all-reduce", "host,local", 2 * 7 / 8 * 256),
    (lambda x: jax.lax.psum_scatter(x, "local", tiled=True), "reduce-scatter", "local",
     3 / 4 * 256),
    (lambda x: jax.lax.all_gather(x.astype(jnp.int8), "host", tiled=True), "all-gather",
     "host", 1 / 2 * 128),
    (lambda x: jax.lax.all_to_all(x.reshape(4, 16), "local", 0, 0, tiled=True).reshape(-1),
     "all-to-all", "local", 3 / 4 * 256),
    # int16, not bf16: XLA:CPU widens bf16 collectives to f32 (jaxrec.comm bitcasts them).
    (lambda x: jax.lax.ppermute(x.astype(jnp.int16), "host", [(0, 1), (1, 0)]),
     "collective-permute", "host", 128),
]


@pytest.mark.parametrize("f,kind,axis,wire", CASES, ids=[c[1] + ":" + c[2] for c in CASES])
def test_single_collective_on_2x4(f, kind, axis, wire):
  mesh = make_mesh((2, 4))
  x = jnp.arange(8 * 64, dtype=jnp.float32)
  out = collective_bytes(_compiled(mesh, f, x), mesh)
  assert [o["kind"] for o in out["ops"]] == [kind]
  assert out["ops"][0]["axis"] == axis
  assert out["total"] == pytest.approx(wire)
  assert out["by_kind"] == {kind: pytest.approx(wire)}
  assert out["by_axis"] == {axis: pytest.approx(wire)}


def test_sum_of_several_and_tuple_operands():
  mesh = make_mesh((8,))

  def f(x):
    a = jax.lax.psum((x, 2 * x[:8]), "data")  # XLA may combine them into one tuple all-reduce
    b = jax.lax.all_to_all(x.reshape(8, 8), "data", 0, 0, tiled=True)
    return a[0] + a[1].sum() + b.reshape(-1)

  out = collective_bytes(_compiled(mesh, f, jnp.ones((8 * 64,), jnp.float32)), mesh)
  ar = 2 * 7 / 8 * (64 * 4 + 8 * 4)
  a2a = 7 / 8 * 64 * 4
  assert out["by_kind"]["all-reduce"] == pytest.approx(ar)
  assert out["by_kind"]["all-to-all"] == pytest.approx(a2a)
  assert out["total"] == pytest.approx(ar + a2a)
  assert out["by_axis"] == {"data": pytest.approx(ar + a2a)}


def test_text_forms_iota_groups_async_and_no_mesh():
  text = "\n".join([
      "%ar = f32[100]{0} all-reduce-start(%p), replica_groups=[2,4]<=[8], to_apply=%add",
      "%ard = f32[100]{0} all-reduce-done(%ar)",
      "%ag = (s8[10]{0}, s8[40]{0}) all-gather-start(%q), replica_groups=[4,2]<=[2,4]T(1,0), "
      "dimensions={0}",
      "%cp = (bf16[6]{0}, bf16[6]{0}, u32[], u32[]) collective-permute-start(%r), "
      "source_target_pairs={{0,1},{1,0}}",
      "%one = f32[7]{0} all-reduce(%s), replica_groups={{0},{1}}, to_apply=%add",
      # The named-mesh form XLA prints for GSPMD-inserted collectives.
      "%m = (f32[64]{0}, f32[16,4]{1,0}) all-reduce(%a, %b), channel_id=2, "
      "replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, use_global_device_ids=true",
      "%h = f32[10]{0} all-reduce(%c), replica_groups=mesh['x'=2,'y'=4] {'x'}, to_apply=%add",
  ])
  out = collective_bytes(text)
  assert [o["kind"] for o in out["ops"]] == ["all-reduce", "all-gather", "collective-permute",
                                            "all-reduce", "all-reduce", "all-reduce"]
  assert [o["group_size"] for o in out["ops"]] == [4, 2, 2, 1, 8, 2]
  assert out["by_kind"]["all-reduce"] == pytest.approx(  # the 1-device one moves nothing
      2 * 3 / 4 * 400 + 2 * 7 / 8 * (64 + 64) * 4 + 2 * 1 / 2 * 40)
  assert out["by_kind"]["all-gather"] == pytest.approx(1 / 2 * 40)
  assert out["by_kind"]["collective-permute"] == pytest.approx(12)
  assert out["buffer_total"] == pytest.approx(400 + 40 + 12 + 28 + 512 + 40)
  mesh = make_mesh((2, 4))
  named = collective_bytes(text, mesh)
  # [2,4]<=[8]: {0,1,2,3},{4,5,6,7} = "local"; [4,2]<=[2,4]T(1,0): {0,4},{1,5},... = "host";
  # mesh['x'=2,'y'=4] {'x'}: {0,4},{1,5},... = "host".
  assert [o["axis"] for o in named["ops"][:2]] == ["local", "host"]
  assert [o["axis"] for o in named["ops"][4:]] == ["host,local", "host"]


def test_counts_the_all_reduce_xla_inserts_for_an_auto_sharded_gradient():
  """A plain jit over a batch-split input: GSPMD's own gradient all-reduce is counted."""
  mesh = make_mesh((2, 4))
  from jax.sharding import NamedSharding
  w = jax.device_put(jnp.ones((32, 16)), NamedSharding(mesh, P()))
  x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P(("host", "local"))))
  g = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))),
              out_shardings=NamedSharding(mesh, P()))
  out = collective_bytes(g.lower(w, x).compile(), mesh)
  assert out["by_kind"] == {"all-reduce": pytest.approx(2 * 7 / 8 * 32 * 16 * 4)}
  assert out["by_axis"] == {"host,local": pytest.approx(2 * 7 / 8 * 32 * 16 * 4)}


def test_rejects_other_inputs():
  with pytest.raises(TypeError, match="HLO text"):
    collective_bytes(42)
