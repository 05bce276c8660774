"""Ingest examples into a feature store as one atomic append.

  python -m jaxrec.data.ingest --input=day_0.gz,day_1.gz --store=/data/criteo_store
  python -m jaxrec.data.ingest --input='/data/raw/day_*' --store=gs://bucket/store --bad_rows=skip
  python -m jaxrec.data.ingest --input=synthetic --preset=small --num_examples=1000000 \\
      --store=/tmp/store                                   # day 1
  python -m jaxrec.data.ingest --input=synthetic --preset=small --start=1000000 \\
      --num_examples=1000000 --store=/tmp/store            # day 2: an append

The store is created on first use with the schema of the input (Criteo: label, I1..I13,
C1..C26; synthetic input adds the extra column ``teacher_prob``, the generator's true click
probability, so evaluation on the store can report the Bayes-optimal AUC; ``--teacher=false``
leaves it out); later appends must match it. Input is streamed (``--read_rows`` rows at a time), so
memory stays constant whatever the input size. The append commits only once everything is
written: a failure (a malformed row under ``--bad_rows=error``) or a kill leaves the store as
it was. Prints a summary and ends with one JSON line.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Iterator

from absl import app, flags

from jaxrec.data import criteo, synthetic
from jaxrec.data.batch import Batch
from jaxrec.data.store import (BAD_ROW_POLICIES, CODECS, DEFAULT_CHUNK_ROWS, FeatureSchema,
                               FeatureStore, RowOrigin, SchemaMismatchError, StoreError)

_PRESETS = ("kaggle", "small", "test")


def _synthetic_config(preset: str, seed: int, max_ids: str, min_bag: int
                      ) -> synthetic.SyntheticConfig:
  if preset not in _PRESETS:
    raise ValueError(f"--preset={preset!r}: expected one of {_PRESETS}")
  cards = {"kaggle": synthetic.CRITEO_KAGGLE_CARDINALITIES,
           "small": synthetic.small_config().cardinalities,
           "test": synthetic.small_config(scale=0.1).cardinalities}[preset]
  mids = None
  if max_ids:
    vals = [int(x) for x in max_ids.split(",")]
    if len(vals) == 1:
      vals = vals * len(cards)
    if len(vals) != len(cards):
      raise ValueError(f"--max_ids has {len(vals)} values for {len(cards)} sparse features")
    mids = tuple(vals)
  return synthetic.SyntheticConfig(seed=seed, cardinalities=tuple(cards), max_ids=mids,
                                   min_bag=min_bag)


TEACHER_COLUMN = "teacher_prob"


def synthetic_source(config: synthetic.SyntheticConfig, start: int, num_examples: int,
                     read_rows: int, teacher: bool = False
                     ) -> tuple[str, object, Iterator[tuple[Batch, RowOrigin, dict]]]:
  """(description, layout, (batch, origin, extras) stream) of examples [start, start + num);
  with ``teacher`` the extras hold the teacher's probability of each example."""
  stream = synthetic.SyntheticCriteo(config)
  name = f"synthetic(seed={config.seed})"

  def gen():
    for pos in range(start, start + num_examples, read_rows):
      stop = min(pos + read_rows, start + num_examples)
      batch, prob = stream.examples(pos, stop, with_prob=True)
      yield (batch, RowOrigin(name, pos, "example"),
             {TEACHER_COLUMN: prob} if teacher else {})
  return f"{name}[{start}:{start + num_examples}]", stream.layout, gen()


def criteo_source(paths: list[str], read_rows: int, has_label: bool, bad_rows: str,
                  reader_stats: list) -> Iterator[tuple[Batch, RowOrigin, dict]]:
  """Criteo rows file by file, each batch tagged with the file and line of its first row."""
  for path in paths:
    reader = criteo.CriteoReader(path, read_rows, has_label=has_label, bad_rows=bad_rows)
    reader_stats.append(reader.stats)
    done = 0
    for b in reader:
      reader_stats[-1] = reader.stats  # the reader replaces its stats when iteration starts
      # Under "error" no line was skipped, so good row i is line i + 1.
      yield b, (RowOrigin(path, done + 1, "line") if bad_rows == "error"
                else RowOrigin(path, done + 1, "good row")), {}
      done += b.size
    reader_stats[-1] = reader.stats


def expand_inputs(spec: str) -> list[str]:
  paths = []
  for part in [p for p in spec.split(",") if p]:
    matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    if not matches:
      raise FileNotFoundError(f"--input pattern {part!r} matches no file")
    paths += matches
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"--input file {p!r} does not exist")
  return paths


def ingest(input_spec: str, store_path: str, *, num_examples: int = 0, start: int = 0,
           preset: str = "small", seed: int = 0, max_ids: str = "", min_bag: int = 1,
           has_label: bool = True, bad_rows: str = "error", chunk_rows: int = DEFAULT_CHUNK_ROWS,
           codec: str = "zstd", read_rows: int = 65536, gc_grace_s: float = 3600.0,
           teacher: bool | None = None, log=print) -> dict:
  """Appends the input to the store (creating it if needed) and returns a summary.

  ``teacher``: store the synthetic teacher's probabilities as the extra column
  ``teacher_prob``; None: yes for a new store, and for an existing one whatever it holds."""
  reader_stats: list = []
  existing = FeatureStore(store_path)
  existing = existing.head().schema if existing.exists() else None
  has_teacher = existing is not None and TEACHER_COLUMN in existing.extra_names
  if input_spec == "synthetic":
    if num_examples < 1:
      raise ValueError("--input=synthetic needs --num_examples >= 1")
    if teacher is None:
      teacher = has_teacher if existing is not None else True
    desc, layout, rows = synthetic_source(
        _synthetic_config(preset, seed, max_ids, min_bag), start, num_examples, read_rows,
        teacher)
  else:
    if has_teacher:
      raise SchemaMismatchError(f"store {store_path!r} holds the synthetic teacher column "
                                f"{TEACHER_COLUMN!r}, which Criteo input cannot fill; ingest "
                                "Criteo data into a store of its own")
    teacher = False
    paths = expand_inputs(input_spec)
    desc = ",".join(paths) if len(paths) <= 3 else f"{paths[0]} .. {paths[-1]} ({len(paths)} files)"
    layout = criteo.CRITEO_LAYOUT
    rows = criteo_source(paths, read_rows, has_label, bad_rows, reader_stats)
  schema = FeatureSchema.from_layout(layout, criteo.NUM_DENSE, criteo.CRITEO_DENSE_NAMES,
                                     extra_names=(TEACHER_COLUMN,) if teacher else ())
  store = FeatureStore.create(store_path, schema, chunk_rows=chunk_rows, codec=codec,
                              exist_ok=True)
  if gc_grace_s >= 0:
    gc = store.collect_garbage(gc_grace_s)
    if gc["segments"]:
      log(f"removed {len(gc['segments'])} orphaned segment(s) of failed appends")
  before = store.head()
  t0 = time.perf_counter()
  last_log = t0
  with store.appender(source=desc, bad_rows=bad_rows) as app_:
    for batch, origin, extras in rows:
      app_.write(batch, origin, extras)
      now = time.perf_counter()
      if now - last_log > 10:
        log(f"  {app_.stats.rows_written:,} rows written "
            f"({app_.stats.rows_written / (now - t0):,.0f} rows/s)")
        last_log = now
  commit = app_.committed
  seconds = time.perf_counter() - t0
  summary = {
      "store": store_path, "input": desc, "version": commit.version,
      "previous_version": before.version, "rows_appended": app_.stats.rows_written,
      "rows_total": commit.num_rows, "segment": app_.segment_id,
      "rows_skipped_schema": app_.stats.rows_skipped,
      "skipped_by_reason": dict(app_.stats.skipped_by_reason),
      "rows_skipped_parse": sum(s.bad_rows for s in reader_stats),
      "seconds": seconds, "rows_per_s": app_.stats.rows_written / max(seconds, 1e-9),
  }
  for s in reader_stats:
    for k, v in s.bad_rows_by_reason.items():
      summary["skipped_by_reason"][k] = summary["skipped_by_reason"].get(k, 0) + v
  examples = [e for s in reader_stats for _, _, e in s.bad_row_examples]
  examples += app_.stats.skipped_examples
  if examples:
    summary["skipped_examples"] = examples[:10]
  return summary


FLAGS = flags.FLAGS


def define_flags():
  # Only when run as a program: importing ingest() must not claim flag names.
  flags.DEFINE_string("input", None, "comma-separated Criteo files or globs, or 'synthetic'")
  flags.DEFINE_string("store", None, "store path (local directory or TensorStore kvstore URL)")
  flags.DEFINE_integer("num_examples", 0, "synthetic: examples to generate")
  flags.DEFINE_integer("start", 0, "synthetic: index of the first example (day 2 starts where "
                       "day 1 ended)")
  flags.DEFINE_enum("preset", "small", list(_PRESETS), "synthetic: vocabulary sizes")
  flags.DEFINE_integer("seed", 0, "synthetic: stream seed")
  flags.DEFINE_string("max_ids", "", "synthetic: max IDs per feature (one int, or one per "
                      "feature); empty = one-hot")
  flags.DEFINE_enum("teacher", "auto", ["auto", "true", "false"], "synthetic: store the "
                    "teacher's click probability as extra column teacher_prob (auto: yes for a "
                    "new store, else as the store has it)")
  flags.DEFINE_integer("min_bag", 1, "synthetic: shortest multi-hot bag (0 allows empty bags)")
  flags.DEFINE_bool("has_label", True, "Criteo: False for the 39-field test.txt form")
  flags.DEFINE_enum("bad_rows", "error", list(BAD_ROW_POLICIES),
                    "malformed rows: stop with file:line (error) or drop and count (skip)")
  flags.DEFINE_integer("chunk_rows", DEFAULT_CHUNK_ROWS, "rows per chunk (new stores only)")
  flags.DEFINE_enum("codec", "zstd", list(CODECS), "chunk compression (new stores only)")
  flags.DEFINE_integer("read_rows", 65536, "rows read from the input at a time (memory bound)")
  flags.DEFINE_float("gc_grace_s", 3600.0, "delete segments of failed appends older than this "
                     "first; < 0 skips")


def main(argv):
  del argv
  if not FLAGS.input or not FLAGS.store:
    raise app.UsageError("--input and --store are required")
  try:
    summary = ingest(FLAGS.input, FLAGS.store, num_examples=FLAGS.num_examples,
                     start=FLAGS.start, preset=FLAGS.preset, seed=FLAGS.seed,
                     max_ids=FLAGS.max_ids, min_bag=FLAGS.min_bag, has_label=FLAGS.has_label,
                     bad_rows=FLAGS.bad_rows, chunk_rows=FLAGS.chunk_rows, codec=FLAGS.codec,
                     read_rows=FLAGS.read_rows, gc_grace_s=FLAGS.gc_grace_s,
                     teacher={"auto": None, "true": True, "false": False}[FLAGS.teacher])
  except (StoreError, criteo.CriteoFormatError, FileNotFoundError, ValueError) as e:
    print(f"ingest failed; the store is unchanged: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"appended {summary['rows_appended']:,} rows from {summary['input']} to "
        f"{summary['store']} as version {summary['version']} ({summary['rows_total']:,} rows in "
        f"all) in {summary['seconds']:.1f}s ({summary['rows_per_s']:,.0f} rows/s); skipped "
        f"{summary['rows_skipped_parse'] + summary['rows_skipped_schema']:,} bad rows")
  for e in summary.get("skipped_examples", [])[:5]:
    print(f"  skipped: {e}")
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
