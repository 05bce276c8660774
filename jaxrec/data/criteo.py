"""A streaming reader for the Criteo click logs (Kaggle ``train.txt``/``test.txt``, Terabyte
``day_N``), plain or gzipped, that yields :class:`~jaxrec.data.batch.Batch` objects.

Each line is ``label \\t I1..I13 \\t C1..C26``: integer fields may be empty or negative,
categorical fields are hex strings (usually 8 digits) or empty. The Kaggle ``test.txt`` form
drops the label (39 fields; pass ``has_label=False``).

Transforms: ``I -> float32(log(1 + max(x, 0)))`` with empty -> 0; ``C -> feature_ids(f,
int(hex, 16))`` with empty -> ``missing_id(f)``, so every categorical slot holds a real ID and
``mask`` is all True.

Parsing works on byte chunks of whole lines (1 MiB, about 4k lines, by default) and is
vectorised with numpy over the chunk: delimiter positions give every field's byte span, and
each field's first 8 bytes are checked and decoded as one uint64 (SWAR). No per-field Python
objects are made, so memory stays constant; one core parses a few hundred thousand rows/s.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import os
import re
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from jaxrec.data.batch import Batch, SparseLayout
from jaxrec.data.hashing import feature_ids, missing_id

NUM_DENSE = 13
NUM_SPARSE = 26
CRITEO_DENSE_NAMES = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
CRITEO_SPARSE_NAMES = tuple(f"C{i}" for i in range(1, NUM_SPARSE + 1))
CRITEO_LAYOUT = SparseLayout.one_hot(CRITEO_SPARSE_NAMES)

BAD_ROW_POLICIES = ("error", "skip")
# Reasons a row can be bad; keys of ReaderStats.bad_rows_by_reason.
REASON_FIELD_COUNT = "field_count"
REASON_LABEL = "label"
REASON_INTEGER = "integer"
REASON_CATEGORICAL = "categorical"

_TAB, _NL, _MINUS = 9, 10, ord("-")
_MAX_HEX_DIGITS = 16  # a uint64
# Integers with more digits are parsed one by one in Python: rare, and past float64 precision.
_MAX_FAST_INT_DIGITS = 16
_INT_RE = re.compile(rb"-?[0-9]+")
_PAD = b"\0" * 16  # lets every field's 8-byte (or 16-byte) word be read past the chunk's end

# SWAR ("SIMD within a register"): a field's first 8 bytes are read as one little-endian
# uint64 and all 8 characters are checked and decoded at once with whole-word arithmetic.
_U64 = np.uint64
_HIGH = _U64(0x8080808080808080)
_ZEROS = _U64(0x3030303030303030)  # eight ASCII "0"
_n = np.arange(9)
# Right-aligning n characters: keep the low n bytes, shift them to the top, fill below
# with "0"; leading zeros change neither a decimal nor a hex value.
_KEEP = np.array([(1 << (8 * n)) - 1 for n in _n], np.uint64)
_SHIFT = np.array([8 * (8 - n) for n in _n], np.uint64)  # a shift by 64 gives 0 in numpy
_FILL = np.array([0x3030303030303030 & ((1 << (8 * (8 - n))) - 1) for n in _n], np.uint64)
_POW10 = 10.0 ** np.arange(_MAX_FAST_INT_DIGITS + 1)
del _n


def _align8(word: np.ndarray, n: np.ndarray) -> np.ndarray:
  """Right-aligns the first ``n`` (0..8) characters of each word, "0"-padded on the left."""
  return ((word & _KEEP[n]) << _SHIFT[n]) | _FILL[n]


def _bytes_in(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
  """0x80 in each byte of ``x`` that lies in [lo, hi], else 0 (bytes must be < 0x80)."""
  ge_lo = x + _U64((0x80 - lo) * 0x0101010101010101)
  gt_hi = x + _U64((0x7F - hi) * 0x0101010101010101)
  return ge_lo & ~gt_hi & _HIGH


def _decimal8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(value, ok) of 8 right-aligned ASCII decimal digits per word."""
  ok = ((x & _HIGH) == 0) & (_bytes_in(x, 0x30, 0x39) == _HIGH)
  v = x - _ZEROS
  # Pairwise combine digits, then pairs, then quads (simdjson's parse_eight_digits).
  v = ((v * _U64(10)) + (v >> _U64(8))) & _U64(0x00FF00FF00FF00FF)
  v = ((v * _U64(100)) + (v >> _U64(16))) & _U64(0x0000FFFF0000FFFF)
  v = ((v * _U64(10000)) + (v >> _U64(32))) & _U64(0x00000000FFFFFFFF)
  return v, ok


def _hex8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(value, ok) of 8 right-aligned ASCII hex digits (either case) per word."""
  digit = _bytes_in(x, 0x30, 0x39)
  letter = _bytes_in(x | _U64(0x2020202020202020), 0x61, 0x66)  # | 0x20 folds A-F to a-f
  ok = ((x & _HIGH) == 0) & ((digit | letter) == _HIGH)
  v = (x & _U64(0x0F0F0F0F0F0F0F0F)) + (letter >> _U64(7)) * _U64(9)  # one nibble a byte
  # Byte 0 holds the most significant digit: merge neighbours into 8-, 16-, 32-bit lanes.
  v = ((v & _U64(0x00FF00FF00FF00FF)) << _U64(4)) | ((v >> _U64(8)) & _U64(0x00FF00FF00FF00FF))
  v = ((v & _U64(0x0000FFFF0000FFFF)) << _U64(8)) | ((v >> _U64(16)) & _U64(0x0000FFFF0000FFFF))
  v = ((v & _U64(0x00000000FFFFFFFF)) << _U64(16)) | (v >> _U64(32))
  return v, ok


class CriteoFormatError(ValueError):
  """A malformed Criteo row. ``line`` is 1-based; ``field`` is "label", "I1".."I13",
  "C1".."C26", or None when the row has the wrong number of fields."""

  def __init__(self, path: str, line: int, field: str | None, reason: str):
    self.path = path
    self.line = line
    self.field = field
    self.reason = reason
    where = f"{path}:{line}: " + (f"field {field}: " if field is not None else "")
    super().__init__(where + reason)


@dataclasses.dataclass
class ReaderStats:
  """Counters of one pass over the files (reset each time iteration starts).

  rows_read counts every line consumed, good or bad; rows_dropped counts good rows left out
  by ``drop_remainder``.
  """

  rows_read: int = 0
  bad_rows: int = 0
  bad_rows_by_reason: dict[str, int] = dataclasses.field(
      default_factory=collections.Counter)
  # The first few bad rows as (path, line, message), in file order.
  bad_row_examples: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
  rows_yielded: int = 0
  rows_dropped: int = 0
  files_read: int = 0


_GZIP_MAGIC = b"\x1f\x8b"
# A "line" longer than this is not Criteo text (real lines are under 1 KiB); stop rather than
# buffer an unbounded amount of memory looking for its end.
_MAX_LINE_BYTES = 16 << 20


def _open(path: str) -> BinaryIO:
  # Sniff the magic bytes rather than trust the suffix: a renamed .gz is still gzip.
  with open(path, "rb") as f:
    is_gzip = f.read(2) == _GZIP_MAGIC
  return gzip.open(path, "rb") if is_gzip else open(path, "rb")


class _LineTooLong(Exception):
  pass


def _iter_chunks(f: BinaryIO, chunk_bytes: int) -> Iterator[bytes]:
  """Yields byte chunks that each end with b"\\n" and hold only whole lines (CRLF -> LF).

  A final line without a newline gets one; a line longer than ``chunk_bytes`` is read whole.
  """
  tail = b""
  while True:
    data = f.read(chunk_bytes)
    if not data:
      break
    data = tail + data
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    if len(tail) > _MAX_LINE_BYTES:
      raise _LineTooLong()
    if cut:
      yield _crlf_to_lf(data[:cut])
  if tail:
    yield _crlf_to_lf(tail + b"\n")


def _crlf_to_lf(blob: bytes) -> bytes:
  # Chunks end at b"\n", so a b"\r\n" pair is never split across two chunks.
  return blob.replace(b"\r\n", b"\n") if b"\r" in blob else blob


def _text(buf: np.ndarray, start: int, end: int) -> str:
  return buf[start:end].tobytes().decode("utf-8", "backslashreplace")


@dataclasses.dataclass
class _Chunk:
  """One parsed chunk: a Batch of its good rows plus where its bad rows are."""

  batch: Batch
  good_lines: np.ndarray  # chunk-relative line index of each row of ``batch``
  bad: list[tuple[int, str, str | None, str]]  # (line index, reason kind, field, message)
  num_lines: int


class CriteoReader:
  """Streams Criteo files as Batches of ``batch_size`` rows.

  Args:
    paths: one path or a sequence; gzip files (detected by their magic bytes) are
      decompressed on the fly. Batches run across file boundaries, in the order given.
    batch_size: rows per Batch.
    has_label: False for the 39-field Kaggle ``test.txt`` form; labels are then NaN, so an
      unlabeled file cannot be trained on by accident (the loss becomes NaN at once).
    bad_rows: "error" raises CriteoFormatError at the first malformed row (the full
      batches of rows before it are yielded first); "skip" drops malformed rows and counts
      them in ``stats`` (``bad_rows``, ``bad_rows_by_reason``, ``bad_row_examples``).
    drop_remainder: drop the last batch if it is smaller than ``batch_size``.
    chunk_bytes: bytes parsed at a time (Criteo lines are about 250 bytes); 1 MiB keeps the
      numpy temporaries in cache, which beats larger chunks by a third.
    max_bad_examples: how many bad rows ``stats.bad_row_examples`` keeps.

  Iterating again starts from the first file and resets ``stats``.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int,
               *, has_label: bool = True, bad_rows: str = "error",
               drop_remainder: bool = False, chunk_bytes: int = 1 << 20,
               max_bad_examples: int = 10):
    if isinstance(paths, (str, os.PathLike)):
      paths = [paths]
    self.paths = [os.fspath(p) for p in paths]
    if not self.paths:
      raise ValueError("CriteoReader: no input paths given")
    for p in self.paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(f"CriteoReader: input file {p!r} does not exist")
    if batch_size < 1:
      raise ValueError(f"CriteoReader: batch_size must be >= 1, got {batch_size}")
    if bad_rows not in BAD_ROW_POLICIES:
      raise ValueError(f"CriteoReader: bad_rows must be one of {BAD_ROW_POLICIES}, "
                       f"got {bad_rows!r}")
    if chunk_bytes < 1:
      raise ValueError(f"CriteoReader: chunk_bytes must be >= 1, got {chunk_bytes}")
    self.batch_size = batch_size
    self.has_label = has_label
    self.bad_rows = bad_rows
    self.drop_remainder = drop_remainder
    self.chunk_bytes = chunk_bytes
    self.max_bad_examples = max_bad_examples
    self.num_fields = NUM_DENSE + NUM_SPARSE + (1 if has_label else 0)
    self.layout = CRITEO_LAYOUT
    self._missing_ids = np.array([missing_id(f) for f in range(NUM_SPARSE)], np.uint64)
    self.stats = ReaderStats()

  def __iter__(self) -> Iterator[Batch]:
    self.stats = ReaderStats()
    pending: list[Batch] = []
    num_pending = 0
    for path in self.paths:
      line_base = 0
      with _open(path) as f:
        chunks = _iter_chunks(f, self.chunk_bytes)
        while True:
          try:
            blob = next(chunks)
          except StopIteration:
            break
          except _LineTooLong:
            raise CriteoFormatError(
                path, line_base + 1, None,
                f"no line end within {_MAX_LINE_BYTES >> 20} MiB; is this a Criteo text "
                f"file (tab-separated, one example a line)?") from None
          chunk = self._parse_chunk(blob)
          first_error = self._account_bad_rows(path, line_base, chunk)
          line_base += chunk.num_lines
          good = chunk.batch
          if first_error is not None:
            # Keep only the rows before the bad one so the caller sees exactly those.
            good = good.slice(0, int(np.searchsorted(chunk.good_lines, chunk.bad[0][0])))
          if good.size:
            pending.append(good)
            num_pending += good.size
          if num_pending >= self.batch_size:
            merged = pending[0] if len(pending) == 1 else Batch.concat(pending)
            full = num_pending - num_pending % self.batch_size
            for start in range(0, full, self.batch_size):
              self.stats.rows_yielded += self.batch_size
              yield merged.slice(start, start + self.batch_size)
            pending = [merged.slice(full, num_pending)] if full < num_pending else []
            num_pending -= full
          if first_error is not None:
            raise first_error
      self.stats.files_read += 1
    if num_pending:
      if self.drop_remainder:
        self.stats.rows_dropped += num_pending
      else:
        self.stats.rows_yielded += num_pending
        yield pending[0] if len(pending) == 1 else Batch.concat(pending)

  def _account_bad_rows(self, path: str, line_base: int,
                        chunk: _Chunk) -> CriteoFormatError | None:
    """Updates stats; under "error" returns the error for the chunk's first bad row."""
    st = self.stats
    if not chunk.bad:
      st.rows_read += chunk.num_lines
      return None
    if self.bad_rows == "error":
      i, _, field, message = chunk.bad[0]
      st.rows_read += i + 1
      return CriteoFormatError(path, line_base + i + 1, field, message)
    st.rows_read += chunk.num_lines
    st.bad_rows += len(chunk.bad)
    for i, kind, field, message in chunk.bad:
      st.bad_rows_by_reason[kind] += 1
      if len(st.bad_row_examples) < self.max_bad_examples:
        st.bad_row_examples.append(
            (path, line_base + i + 1, str(CriteoFormatError(path, line_base + i + 1, field,
                                                            message))))
    return None

  def _parse_chunk(self, blob: bytes) -> _Chunk:
    """Parses whole lines (``blob`` ends with b"\\n") into a Batch of the good rows."""
    nf = self.num_fields
    lab = 1 if self.has_label else 0
    padded = blob + _PAD
    buf = np.frombuffer(padded, np.uint8)[:len(blob)]
    # words[p] = the 8 bytes starting at byte p, as one little-endian uint64.
    words = np.ndarray((len(blob) + 8,), "<u8", buffer=padded, strides=(1,))
    # One pass over the bytes: tab and newline are the only bytes <= 10 that can be
    # delimiters; other control bytes stay inside their field, which then fails to parse.
    delims = np.flatnonzero(buf <= _NL)
    kind = buf[delims]
    if kind.min(initial=_TAB) < _TAB:
      delims, kind = delims[kind >= _TAB], kind[kind >= _TAB]
    newlines = delims[kind == _NL]
    num_lines = len(newlines)
    line_starts = np.concatenate([[0], newlines[:-1] + 1])
    if len(delims) == num_lines * nf and np.array_equal(delims[nf - 1::nf], newlines):
      # Every line ends after exactly nf delimiters: nf fields each (the usual case).
      fields_per_line = np.full(num_lines, nf)
      count_ok = np.ones(num_lines, bool)
      lines = np.arange(num_lines)
      ends = delims.reshape(num_lines, nf)
    else:
      # A newline at position p is found at its own index in ``newlines``: its line.
      line_of_delim = np.searchsorted(newlines, delims)
      fields_per_line = np.bincount(line_of_delim, minlength=num_lines)
      count_ok = fields_per_line == nf
      lines = np.flatnonzero(count_ok)  # only these lines are split into fields
      ends = delims[count_ok[line_of_delim]].reshape(len(lines), nf)
    starts = np.empty_like(ends)
    starts[:, 0] = line_starts[lines]
    starts[:, 1:] = ends[:, :-1] + 1
    lens = ends - starts
    n = len(lines)
    field_bad = np.zeros((n, nf), bool)

    # Label: exactly "0" or "1".
    if self.has_label:
      first = words[starts[:, 0]] & _U64(0xFF)
      field_bad[:, 0] = (lens[:, 0] != 1) | ((first != ord("0")) & (first != ord("1")))
      labels = (first == ord("1")).astype(np.float32)
    else:
      labels = np.full(n, np.nan, np.float32)

    # Integers: optional "-" then at least one digit; empty -> 0; negatives clamp to 0.
    d_starts = starts[:, lab:lab + NUM_DENSE]
    d_lens = lens[:, lab:lab + NUM_DENSE]
    neg = (d_lens > 0) & ((words[d_starts] & _U64(0xFF)) == _MINUS)
    num_digits = d_lens - neg
    d_starts = d_starts + neg
    value, ok = _decimal8(_align8(words[d_starts], np.minimum(num_digits, 8)))
    ok &= (num_digits > 0) | (d_lens == 0)
    value = value.astype(np.float64)
    long_ = np.nonzero(num_digits > 8)
    if len(long_[0]):
      s, nd = d_starts[long_], num_digits[long_]
      fast = nd <= _MAX_FAST_INT_DIGITS
      hi, hi_ok = _decimal8(words[s])
      lo, lo_ok = _decimal8(_align8(words[s + 8], np.clip(nd - 8, 0, 8)))
      value[long_] = hi * _POW10[np.minimum(nd - 8, _MAX_FAST_INT_DIGITS)] + lo
      ok[long_] = hi_ok & lo_ok & fast
      for r, c in zip(*(i[~fast] for i in long_)):  # past 16 digits: rare, one at a time
        raw = buf[starts[r, lab + c]:ends[r, lab + c]].tobytes()
        ok[r, c] = _INT_RE.fullmatch(raw) is not None
        value[r, c] = float(raw) if ok[r, c] else 0.0  # float() of a huge number is inf
    field_bad[:, lab:lab + NUM_DENSE] = ~ok
    dense = np.log1p(np.where(neg, 0.0, value)).astype(np.float32)

    # Categoricals: 1 to 16 hex digits as a uint64; empty -> missing_id.
    c_starts = starts[:, lab + NUM_DENSE:]
    c_lens = lens[:, lab + NUM_DENSE:]
    word = words[c_starts]
    short = np.nonzero(c_lens != 8)  # most values have exactly 8 digits: no aligning
    word[short] = _align8(word[short], np.minimum(c_lens[short], 8))
    raw, ok = _hex8(word)
    long_ = np.nonzero(c_lens > 8)
    if len(long_[0]):
      s, nd = c_starts[long_], c_lens[long_]
      hi, hi_ok = _hex8(words[s])
      lo, lo_ok = _hex8(_align8(words[s + 8], np.clip(nd - 8, 0, 8)))
      raw[long_] = (hi << (_U64(4) * (np.minimum(nd, 16) - 8).astype(np.uint64))) | lo
      ok[long_] = hi_ok & lo_ok & (nd <= _MAX_HEX_DIGITS)
    field_bad[:, lab + NUM_DENSE:] = ~ok
    ids = np.empty(c_starts.shape, np.uint64)
    for f in range(NUM_SPARSE):
      ids[:, f] = feature_ids(f, raw[:, f])
    empty = np.nonzero(c_lens == 0)
    ids[empty] = self._missing_ids[empty[1]]

    row_ok = ~field_bad.any(axis=1)
    bad: list[tuple[int, str, str | None, str]] = []
    if n < num_lines or not row_ok.all():
      bad = self._describe_bad_rows(buf, fields_per_line, count_ok, lines, row_ok,
                                    field_bad, starts, ends)
      dense, ids, labels = dense[row_ok], ids[row_ok], labels[row_ok]
    batch = Batch(dense=dense, ids=ids, mask=np.ones(ids.shape, bool), labels=labels)
    return _Chunk(batch=batch, good_lines=lines[row_ok], bad=bad, num_lines=num_lines)

  def _describe_bad_rows(self, buf, fields_per_line, count_ok, lines, row_ok, field_bad,
                         starts, ends) -> list[tuple[int, str, str | None, str]]:
    """(line index, reason kind, field name, message) for every bad line, in line order.

    Only the first rows, the ones a caller can show, get a message; the rest get "".
    """
    names = (("label",) if self.has_label else ()) + CRITEO_DENSE_NAMES + CRITEO_SPARSE_NAMES
    lab = 1 if self.has_label else 0
    nf = self.num_fields
    # (line index, row in ``lines`` or -1 for a field-count error)
    found = sorted([(int(i), -1) for i in np.flatnonzero(~count_ok)]
                   + [(int(lines[r]), int(r)) for r in np.flatnonzero(~row_ok)])
    want = 1 if self.bad_rows == "error" else self.max_bad_examples
    out = []
    for j, (i, r) in enumerate(found):
      if r < 0:
        got = int(fields_per_line[i])
        msg = f"expected {nf} tab-separated fields, got {got}"
        if self.has_label and got == nf - 1:
          msg += " (for the 39-field test.txt form pass has_label=False)"
        elif not self.has_label and got == nf + 1:
          msg += " (for labelled 40-field rows pass has_label=True)"
        out.append((i, REASON_FIELD_COUNT, None, msg))
        continue
      c = int(np.argmax(field_bad[r]))  # the first bad field of the row
      kind = (REASON_LABEL if c < lab else
              REASON_INTEGER if c < lab + NUM_DENSE else REASON_CATEGORICAL)
      msg = ""
      if j < want:
        value = _text(buf, int(starts[r, c]), int(ends[r, c]))
        msg = {
            REASON_LABEL: f"{value!r} is not 0 or 1",
            REASON_INTEGER: f"{value!r} is not an integer",
            REASON_CATEGORICAL: f"{value!r} is not a hex string of 1 to 16 digits",
        }[kind]
      out.append((i, kind, names[c], msg))
    return out
