"""Tests for jaxrec.data.criteo: values, errors (file, line, field), bad-row policies,
batching, gzip and the unlabeled test.txt form.

Expected values are computed independently of the reader: dense with math.log1p, IDs by
calling feature_ids / missing_id on values chosen here.
"""

from __future__ import annotations

import gzip
import math
import random
import re

import numpy as np
import pytest

from jaxrec.data import criteo
from jaxrec.data.batch import Batch
from jaxrec.data.criteo import (CRITEO_DENSE_NAMES, CRITEO_LAYOUT, CriteoFormatError,
                                CriteoReader)
from jaxrec.data.hashing import feature_ids, missing_id

NAMES = ["label"] + list(CRITEO_DENSE_NAMES) + [f"C{i}" for i in range(1, 27)]


def make_row(label="1", ints=None, cats=None) -> list[str]:
  """A valid 40-field row as a list of strings; ``ints``/``cats`` override by index."""
  i_fields = [str(k) for k in range(13)]
  c_fields = [f"{k:08x}" for k in range(26)]
  for k, v in (ints or {}).items():
    i_fields[k] = v
  for k, v in (cats or {}).items():
    c_fields[k] = v
  return [label] + i_fields + c_fields


def write(path, rows, end="\n", final_newline=True, opener=open):
  text = end.join("\t".join(r) if isinstance(r, list) else r for r in rows)
  if final_newline:
    text += end
  with opener(path, "wt", newline="") as f:
    f.write(text)
  return str(path)


def expected_dense(field: str) -> np.float32:
  return np.float32(math.log1p(max(int(field), 0)) if field else 0.0)


def expected_id(f: int, field: str) -> np.uint64:
  return missing_id(f) if field == "" else feature_ids(f, np.uint64(int(field, 16)))


def read_all(reader) -> Batch:
  return Batch.concat(list(reader))


def check_rows(batch: Batch, rows, has_label=True):
  lab = 1 if has_label else 0
  assert batch.size == len(rows)
  for k, r in enumerate(rows):
    if has_label:
      assert batch.labels[k] == float(r[0])
    np.testing.assert_array_equal(batch.dense[k], [expected_dense(x) for x in r[lab:lab + 13]])
    np.testing.assert_array_equal(
        batch.ids[k], np.array([expected_id(f, x) for f, x in enumerate(r[lab + 13:])],
                               np.uint64))


def test_layout_constants():
  assert CRITEO_LAYOUT.names == tuple(f"C{i}" for i in range(1, 27))
  assert CRITEO_LAYOUT.is_one_hot and CRITEO_LAYOUT.num_columns == 26
  assert CRITEO_DENSE_NAMES == tuple(f"I{i}" for i in range(1, 14))


def test_valid_rows_parse_to_expected_values(tmp_path):
  rows = [
      make_row("1", ints={0: "5", 4: "", 12: "1234567"}, cats={0: "68fd1e64", 7: "", 25: "0"}),
      make_row("0", ints={1: "0", 2: "123456789012"}, cats={3: "ABCDEF12", 4: "f"}),
      make_row("0", ints={k: "" for k in range(13)}, cats={k: "" for k in range(26)}),
  ]
  path = write(tmp_path / "train.txt", rows)
  batch = read_all(CriteoReader(path, batch_size=8))
  assert batch.dense.dtype == np.float32 and batch.dense.shape == (3, 13)
  assert batch.ids.dtype == np.uint64 and batch.ids.shape == (3, 26)
  assert batch.mask.dtype == bool and batch.mask.all()
  assert batch.labels.dtype == np.float32
  np.testing.assert_array_equal(batch.labels, [1, 0, 0])
  check_rows(batch, rows)
  # Spot checks written out by hand.
  assert batch.dense[0, 0] == np.float32(math.log1p(5))
  assert batch.dense[0, 4] == 0
  assert batch.ids[0, 0] == feature_ids(0, np.uint64(0x68FD1E64))
  assert batch.ids[1, 3] == feature_ids(3, np.uint64(0xABCDEF12))
  assert batch.ids[1, 4] == feature_ids(4, np.uint64(15))


def test_empty_fields_map_to_missing_id_and_zero(tmp_path):
  path = write(tmp_path / "train.txt", [make_row(ints={3: ""}, cats={k: "" for k in range(26)})])
  batch = read_all(CriteoReader(path, batch_size=1))
  assert batch.dense[0, 3] == 0
  for f in range(26):
    assert batch.ids[0, f] == missing_id(f)
  assert len(set(batch.ids[0].tolist())) == 26  # missing IDs differ between features


def test_same_hex_in_two_features_gets_different_ids(tmp_path):
  path = write(tmp_path / "train.txt", [make_row(cats={k: "68fd1e64" for k in range(26)})])
  ids = read_all(CriteoReader(path, batch_size=1)).ids[0]
  assert len(set(ids.tolist())) == 26
  assert ids[0] == feature_ids(0, np.uint64(0x68FD1E64))
  assert ids[9] == feature_ids(9, np.uint64(0x68FD1E64))


def test_distinct_values_in_one_feature_do_not_collide(tmp_path):
  values = [f"{v:08x}" for v in range(0, 1 << 32, 9_999_991)]  # ~430 values
  path = write(tmp_path / "train.txt", [make_row(cats={5: v}) for v in values])
  ids = read_all(CriteoReader(path, batch_size=64)).ids[:, 5]
  assert len(set(ids.tolist())) == len(values)


@pytest.mark.parametrize("text", ["0", "7", "c", "F", "00000001", "123456789", "0123456789abcdef",
                                  "FFFFFFFFFFFFFFFe", "aBcDeF"])
def test_hex_of_any_length_1_to_16(tmp_path, text):
  path = write(tmp_path / "train.txt", [make_row(cats={2: text})])
  batch = read_all(CriteoReader(path, batch_size=1))
  assert batch.ids[0, 2] == feature_ids(2, np.uint64(int(text, 16)))


def test_negative_integers_clamp_to_zero(tmp_path):
  row = make_row(ints={0: "-1", 1: "-2147483648", 2: "-0", 3: "-99999999999999999999", 4: "3"})
  path = write(tmp_path / "train.txt", [row])
  dense = read_all(CriteoReader(path, batch_size=1)).dense[0]
  np.testing.assert_array_equal(dense[:4], 0)
  assert dense[4] == np.float32(math.log1p(3))


@pytest.mark.parametrize("text", ["99999999", "100000000", "4294967296", "1234567890123456",
                                  "12345678901234567890123"])
def test_long_integers(tmp_path, text):
  path = write(tmp_path / "train.txt", [make_row(ints={6: text})])
  dense = read_all(CriteoReader(path, batch_size=1)).dense[0]
  assert dense[6] == np.float32(math.log1p(int(text)))


# (row, line number, field) for each kind of malformed row; the bad row is the 3rd line.
def _bad(label="1", ints=None, cats=None, cut=None, extra=None):
  row = make_row(label, ints, cats)
  if cut is not None:
    row = row[:cut]
  if extra is not None:
    row = row + extra
  return row


MALFORMED = {
    "too_few_fields": (_bad(cut=39), None, "expected 40 tab-separated fields, got 39"),
    "one_field": ("", None, "expected 40 tab-separated fields, got 1"),
    "too_many_fields": (_bad(extra=["x"]), None, "expected 40 tab-separated fields, got 41"),
    "non_numeric_int": (_bad(ints={4: "abc"}), "I5", "'abc' is not an integer"),
    "float_int": (_bad(ints={0: "1.5"}), "I1", "'1.5' is not an integer"),
    "lone_minus": (_bad(ints={12: "-"}), "I13", "'-' is not an integer"),
    "space_in_int": (_bad(ints={2: " 3"}), "I3", "' 3' is not an integer"),
    "label_2": (_bad(label="2"), "label", "'2' is not 0 or 1"),
    "label_empty": (_bad(label=""), "label", "'' is not 0 or 1"),
    "label_01": (_bad(label="01"), "label", "'01' is not 0 or 1"),
    "non_hex": (_bad(cats={11: "68fd1e6g"}), "C12", "'68fd1e6g' is not a hex string"),
    "hex_17_digits": (_bad(cats={0: "1" * 17}), "C1", "is not a hex string of 1 to 16"),
    "non_ascii_hex": (_bad(cats={25: "é"}), "C26", "'é' is not a hex string"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_row_raises_with_file_line_and_field(tmp_path, kind):
  bad, field, reason = MALFORMED[kind]
  path = write(tmp_path / "train.txt", [make_row(), make_row("0"), bad, make_row()])
  reader = CriteoReader(path, batch_size=1)
  seen = []
  with pytest.raises(CriteoFormatError) as info:
    for b in reader:
      seen.append(b)
  e = info.value
  assert e.path == path and e.line == 3 and e.field == field
  prefix = f"{path}:3: " + (f"field {field}: " if field else "")
  assert str(e).startswith(prefix), str(e)
  assert reason in str(e)
  assert isinstance(e, ValueError)
  assert len(seen) == 2  # the rows before the bad one came through first
  assert reader.stats.rows_read == 3


def test_39_fields_hint_at_has_label(tmp_path):
  path = write(tmp_path / "test.txt", [make_row()[1:]])
  with pytest.raises(CriteoFormatError, match="has_label=False"):
    list(CriteoReader(path, batch_size=1))


def test_first_bad_field_of_a_row_is_named(tmp_path):
  path = write(tmp_path / "train.txt", [make_row(ints={7: "x"}, cats={0: "zz"})])
  with pytest.raises(CriteoFormatError) as info:
    list(CriteoReader(path, batch_size=1))
  assert info.value.field == "I8"


def test_error_line_counts_across_chunks_and_files(tmp_path):
  a = write(tmp_path / "a.txt", [make_row()] * 50)
  b = write(tmp_path / "b.txt", [make_row()] * 30 + [_bad(ints={0: "x"})] + [make_row()] * 5)
  reader = CriteoReader([a, b], batch_size=16, chunk_bytes=1000)  # ~4 lines a chunk
  seen = 0
  with pytest.raises(CriteoFormatError) as info:
    for batch in reader:
      seen += batch.size
  assert (info.value.path, info.value.line, info.value.field) == (b, 31, "I1")
  assert seen == 80  # 80 good rows before it = 5 full batches
  assert reader.stats.rows_read == 81


def test_skip_policy_skips_and_counts_bad_rows(tmp_path):
  good = [make_row(str(k % 2), ints={0: str(k)}) for k in range(8)]
  rows = [good[0], _bad(cut=10), good[1], _bad(ints={4: "abc"}), good[2], good[3],
          _bad(label="x"), _bad(cats={0: "nothex"}), good[4], _bad(ints={1: "1e3"}),
          _bad(extra=["1"]), good[5], good[6], good[7]]
  path = write(tmp_path / "train.txt", rows)
  reader = CriteoReader(path, batch_size=3, bad_rows="skip", max_bad_examples=3)
  batches = list(reader)
  assert [b.size for b in batches] == [3, 3, 2]
  check_rows(Batch.concat(batches), good)
  st = reader.stats
  assert st.rows_read == len(rows) and st.bad_rows == 6 and st.rows_yielded == 8
  assert dict(st.bad_rows_by_reason) == {"field_count": 2, "integer": 2, "label": 1,
                                         "categorical": 1}
  assert [(p, line) for p, line, _ in st.bad_row_examples] == [(path, 2), (path, 4), (path, 7)]
  assert st.bad_row_examples[1][2] == f"{path}:4: field I5: 'abc' is not an integer"


def test_skip_policy_on_an_all_bad_chunk(tmp_path):
  path = write(tmp_path / "train.txt", ["garbage"] * 20 + [make_row()])
  reader = CriteoReader(path, batch_size=4, bad_rows="skip", chunk_bytes=64)
  assert sum(b.size for b in reader) == 1
  assert reader.stats.bad_rows == 20 and reader.stats.bad_rows_by_reason["field_count"] == 20
  assert len(reader.stats.bad_row_examples) == 10  # the default cap


def test_batches_span_files_and_remainder(tmp_path):
  rows = [make_row(str(k % 2), ints={0: str(k)}, cats={0: f"{k:x}"}) for k in range(23)]
  paths = [write(tmp_path / "f0.txt", rows[:7]), write(tmp_path / "f1.txt", rows[7:8]),
           write(tmp_path / "f2.txt", rows[8:])]
  reader = CriteoReader(paths, batch_size=5)
  batches = list(reader)
  assert [b.size for b in batches] == [5, 5, 5, 5, 3]
  check_rows(Batch.concat(batches), rows)  # order kept across file boundaries
  assert reader.stats.files_read == 3 and reader.stats.rows_read == 23

  reader = CriteoReader(paths, batch_size=5, drop_remainder=True)
  batches = list(reader)
  assert [b.size for b in batches] == [5, 5, 5, 5]
  check_rows(Batch.concat(batches), rows[:20])
  assert reader.stats.rows_dropped == 3


def test_batch_larger_than_chunks_and_reiteration(tmp_path):
  rows = [make_row(ints={0: str(k)}) for k in range(40)]
  path = write(tmp_path / "train.txt", rows)
  reader = CriteoReader(path, batch_size=16, chunk_bytes=300)  # about one line a chunk
  for _ in range(2):  # a second pass starts over and resets the stats
    batches = list(reader)
    assert [b.size for b in batches] == [16, 16, 8]
    check_rows(Batch.concat(batches), rows)
    assert reader.stats.rows_read == 40


def test_gzip_input(tmp_path):
  rows = [make_row(str(k % 2), ints={1: str(k * 7)}, cats={3: f"{k * 12345:08x}"})
          for k in range(11)]
  gz = write(tmp_path / "day_0.gz", rows, opener=gzip.open)
  renamed = tmp_path / "day_1"  # gzip is recognised by its bytes, not its name
  renamed.write_bytes((tmp_path / "day_0.gz").read_bytes())
  check_rows(read_all(CriteoReader([gz], batch_size=4)), rows)
  check_rows(read_all(CriteoReader([gz, str(renamed)], batch_size=4)), rows + rows)


def test_gzip_error_line_numbers(tmp_path):
  gz = write(tmp_path / "train.txt.gz", [make_row()] * 4 + [_bad(label="3")], opener=gzip.open)
  with pytest.raises(CriteoFormatError) as info:
    list(CriteoReader(gz, batch_size=2))
  assert (info.value.line, info.value.field) == (5, "label")


def test_unlabeled_test_txt_form(tmp_path):
  """has_label=False reads 39-field rows; labels are NaN so they cannot be trained on."""
  rows = [make_row(ints={0: str(k)})[1:] for k in range(5)]
  path = write(tmp_path / "test.txt", rows)
  batch = read_all(CriteoReader(path, batch_size=2, has_label=False))
  assert np.isnan(batch.labels).all() and batch.labels.dtype == np.float32
  check_rows(batch, rows, has_label=False)

  path = write(tmp_path / "labelled.txt", [make_row()])
  with pytest.raises(CriteoFormatError, match="got 40.*has_label=True") as info:
    list(CriteoReader(path, batch_size=2, has_label=False))
  assert info.value.field is None


def test_unlabeled_field_names(tmp_path):
  path = write(tmp_path / "test.txt", [make_row(ints={0: "q"})[1:]])
  with pytest.raises(CriteoFormatError) as info:
    list(CriteoReader(path, batch_size=2, has_label=False))
  assert info.value.field == "I1"


def test_crlf_and_missing_final_newline(tmp_path):
  rows = [make_row(str(k % 2), cats={25: f"{k:x}"}) for k in range(3)]
  path = write(tmp_path / "train.txt", rows, end="\r\n", final_newline=False)
  check_rows(read_all(CriteoReader(path, batch_size=2)), rows)


def test_empty_file(tmp_path):
  path = write(tmp_path / "train.txt", [], final_newline=False)
  reader = CriteoReader(path, batch_size=2)
  assert list(reader) == [] and reader.stats.rows_read == 0


def test_overlong_line_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setattr(criteo, "_MAX_LINE_BYTES", 1000)
  path = tmp_path / "train.txt"
  path.write_text("\t".join(make_row()) + "\n" + "x" * 5000)
  with pytest.raises(CriteoFormatError, match="no line end") as info:
    list(CriteoReader(str(path), batch_size=1, chunk_bytes=256))
  assert info.value.line == 2


def test_argument_errors(tmp_path):
  path = write(tmp_path / "train.txt", [make_row()])
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    CriteoReader([path, str(tmp_path / "nope.txt")], batch_size=1)
  with pytest.raises(ValueError, match="bad_rows"):
    CriteoReader(path, batch_size=1, bad_rows="ignore")
  with pytest.raises(ValueError, match="batch_size"):
    CriteoReader(path, batch_size=0)


# A slow, obvious reference, to check the vectorised parser on random (partly broken) rows.
def _reference(line: str):
  fs = line.split("\t")
  if len(fs) != 40:
    return ("field_count", None)
  if fs[0] not in ("0", "1"):
    return ("label", "label")
  for j, s in enumerate(fs[1:14]):
    if s and not re.fullmatch(r"-?[0-9]+", s):
      return ("integer", NAMES[1 + j])
  for j, s in enumerate(fs[14:]):
    if s and not re.fullmatch(r"[0-9a-fA-F]{1,16}", s):
      return ("categorical", NAMES[14 + j])
  return fs


def _random_field(rng: random.Random, dense: bool) -> str:
  r = rng.random()
  if r < 0.15:
    return ""
  if r < 0.96:
    if dense:
      return str(rng.randint(-10**rng.randint(1, 11), 10**rng.randint(1, 20)))
    return "".join(rng.choice("0123456789abcdefABCDEF") for _ in range(rng.choice(
        [8] * 8 + list(range(1, 17)))))
  return rng.choice(["-", "1.5", "x", "+4", " 1", "0x1f", "é", "\x01", "1" * 17, "--2"])


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_random_rows(tmp_path, seed):
  rng = random.Random(seed)
  lines = []
  for _ in range(400):
    fs = ([rng.choice(["0", "1"] * 30 + ["2", ""])] + [_random_field(rng, True) for _ in range(13)]
          + [_random_field(rng, False) for _ in range(26)])
    r = rng.random()
    lines.append("\t".join(fs[:-1] if r < 0.02 else fs + ["1"] if r < 0.04 else fs))
  path = write(tmp_path / "train.txt", lines)
  reader = CriteoReader(path, batch_size=rng.randint(1, 50), bad_rows="skip",
                        chunk_bytes=rng.choice([500, 5000, 1 << 20]), max_bad_examples=10**6)
  got = read_all(reader)
  refs = [_reference(line) for line in lines]
  check_rows(got, [r for r in refs if isinstance(r, list)])
  bad = [(k + 1, r) for k, r in enumerate(refs) if isinstance(r, tuple)]
  assert [line for _, line, _ in reader.stats.bad_row_examples] == [k for k, _ in bad]
  for (_, _, msg), (_, (_, field)) in zip(reader.stats.bad_row_examples, bad):
    assert (f"field {field}:" in msg) if field else ("tab-separated" in msg)
