"""The sharding planner: sizes and traffic decide, overrides win, budgets are enforced."""

from __future__ import annotations

import pytest

from jaxrec.embedding.planner import plan_sharding, table_bytes
from jaxrec.embedding.specs import FeatureSpec, SparseOptimizer, TableSpec

SGD = SparseOptimizer("sgd")


def _features(tables):
  return [FeatureSpec(f"f_{t.name}", t.name) for t in tables]


def test_auto_plan_by_size():
  tables = [TableSpec("tiny", 100, 16, SGD), TableSpec("huge", 4_000_000, 16, SGD),
            TableSpec("wide", 100_000, 512, SGD)] + [
                TableSpec(f"mid{i}", 200_000, 16, SGD) for i in range(6)]
  plan = plan_sharding(tables, _features(tables), num_devices=8, batch_size=1024)
  kinds = {p.table: p.kind for p in plan.placements}
  assert kinds["tiny"] == "data_parallel"
  assert kinds["huge"] == "row_wise"
  assert kinds["wide"] == "column_wise" and plan["wide"].column_shards == 4
  assert len(set(plan["wide"].devices)) == 4          # blocks on distinct devices
  assert all(kinds[f"mid{i}"] == "table_wise" for i in range(6))
  # Table-wise tables spread over devices rather than piling onto one; memory stays balanced.
  assert len({plan[f"mid{i}"].devices for i in range(6)}) >= 4
  load = plan.device_bytes()
  assert load.max() < 1.5 * load.mean(), load
  text = plan.describe()
  for col in ("table", "rows", "dim", "bytes", "type", "devices"):
    assert col in text.splitlines()[0]
  assert "4,000,000" in text and "row_wise" in text and "0-7" in text


def test_two_hosts_use_table_row_wise_and_one_device_replicates():
  tables = [TableSpec(f"t{i}", 1_000_000, 32, SGD) for i in range(2)]
  plan = plan_sharding(tables, _features(tables), num_devices=8, num_hosts=2,
                       memory_budget=200 << 20)
  assert [p.kind for p in plan.placements] == ["table_row_wise"] * 2
  assert {plan["t0"].devices, plan["t1"].devices} == {(0, 1, 2, 3), (4, 5, 6, 7)}
  one = plan_sharding(tables, _features(tables), num_devices=1)
  assert [p.kind for p in one.placements] == ["data_parallel"] * 2


def test_overrides_win_and_budget_errors_name_tables():
  tables = [TableSpec("small_rw", 10, 8, SGD, sharding="row_wise"),
            TableSpec("big_tw", 1_000_000, 64, SGD, sharding="table_wise"),
            TableSpec("cw", 1000, 32, SGD, sharding="column_wise")]
  plan = plan_sharding(tables, _features(tables), num_devices=8)
  assert [p.kind for p in plan.placements] == ["row_wise", "table_wise", "column_wise"]
  assert plan["cw"].column_shards == 4                 # dim 32 / min_column_dim 8
  with pytest.raises(ValueError, match="big_tw"):
    plan_sharding(tables, _features(tables), num_devices=8,
                  memory_budget=table_bytes(tables[1]) // 2)


def test_bad_specs_are_rejected_with_names():
  with pytest.raises(ValueError, match="'t'.*sharding"):
    TableSpec("t", 10, 8, sharding="diagonal")
  with pytest.raises(ValueError, match="'t'.*column_shards"):
    TableSpec("t", 10, 8, column_shards=3)
  with pytest.raises(ValueError, match="feature 'f' reads table 'nope'"):
    plan_sharding([TableSpec("t", 10, 8)], [FeatureSpec("f", "nope")], num_devices=1)
