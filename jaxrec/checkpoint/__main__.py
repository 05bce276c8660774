"""Inspect and repair a run's snapshots.

  python -m jaxrec.checkpoint list --workdir=/tmp/run [--verify=checksum] [--json]
  python -m jaxrec.checkpoint rollback --workdir=/tmp/run (--to=STEP | --back=N)
  python -m jaxrec.checkpoint prune --workdir=/tmp/run
  python -m jaxrec.checkpoint verify --workdir=/tmp/run [--step=STEP]
  python -m jaxrec.checkpoint warm_start --workdir=/tmp/new --from=/tmp/run \
      --config=experiments/configs/dlrm_synthetic.py:tiny [--config.a.b=value ...] [--step=STEP]

``rollback`` makes a version the one training resumes from; newer versions are set aside in
``checkpoints/rolled_back/`` until ``prune``. ``warm_start`` reads a run's snapshot into a new
config (added tables fresh, removed ones ignored, reported) and writes it as the first version of
the new run, which then resumes from it. Do not rollback or prune while a job writes the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys


def _ckdir(args) -> str:
  from jaxrec.checkpoint.versions import checkpoint_dir
  return args.dir or checkpoint_dir(args.workdir)


def _when(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def cmd_list(args) -> int:
  from jaxrec.checkpoint.versions import list_versions
  vs = list_versions(_ckdir(args), verify=args.verify, include_rolled_back=True)
  current = [v for v in vs if not v.rolled_back and v.ok]
  if args.json:
    for v in vs:
      print(json.dumps({"step": v.step, "kind": v.kind, "chain": list(v.chain),
                        "status": v.status, "rolled_back": v.rolled_back, "bytes": v.bytes,
                        "data_position": v.data_position, "metrics": v.metrics,
                        "created": v.created, "resume": bool(current) and v is current[-1]}))
    return 0
  print(f"{'':2}{'step':>10}  {'kind':<12} {'size':>10}  {'written':<19}  {'data position':<24} "
        "status")
  for v in vs:
    if v.rolled_back or not v.ok:
      continue
    mark = "->" if v is current[-1] else ""
    pos = json.dumps(v.data_position) if v.data_position is not None else "-"
    kind = v.kind if v.kind == "full" else f"incr<-{v.chain[-2]}"
    print(f"{mark:2}{v.step:>10}  {kind:<12} {_human(v.bytes):>10}  {_when(v.created):<19}  "
          f"{pos:<24} {v.status}")
  bad = [v for v in vs if not v.rolled_back and not v.ok]
  for v in bad:
    print(f"  {v.step:>10}  not restorable: {v.status}")
  rb = [v for v in vs if v.rolled_back]
  if rb:
    print(f"rolled back (kept; `rollback --to=STEP` brings one back, `prune` deletes): "
          f"{', '.join(str(v.step) for v in rb)}")
  if not current:
    print("no restorable version")
  return 0


def cmd_rollback(args) -> int:
  from jaxrec.checkpoint.versions import list_versions, rollback
  d = _ckdir(args)
  before = {v.step for v in list_versions(d) if v.ok}
  step = rollback(d, to=args.to, back=args.back)
  after = {v.step for v in list_versions(d) if v.ok}
  print(f"training in {d} now resumes from version {step}; set aside: "
        f"{sorted(before - after) or 'nothing'} (see `list`; `prune` deletes them)")
  return 0


def cmd_prune(args) -> int:
  from jaxrec.checkpoint.versions import prune
  gone = prune(_ckdir(args))
  print(f"deleted {len(gone)} set-aside version(s)" + "".join(f"\n  {g}" for g in gone))
  return 0


def cmd_verify(args) -> int:
  from jaxrec.checkpoint.versions import list_versions
  vs = [v for v in list_versions(_ckdir(args), verify="checksum")
        if args.step is None or v.step == args.step]
  bad = [v for v in vs if not v.ok]
  for v in vs:
    print(f"version {v.step}: {v.status}")
  return 1 if bad or not vs else 0


def cmd_warm_start(args, overrides) -> int:
  from jaxrec.checkpoint import from_config
  from jaxrec.checkpoint.manager import Checkpointer
  from jaxrec.checkpoint.versions import checkpoint_dir
  src = args.src_dir or checkpoint_dir(args.src)
  dst = _ckdir(args)
  if os.path.abspath(src) == os.path.abspath(dst):
    raise SystemExit("warm_start: --from and --workdir must be different runs")
  config = from_config.load_config(args.config, overrides)
  run = from_config.build(config)
  old = Checkpointer(src, layouts=run.layouts, read_only=True)
  restored = old.restore(run.state, step=args.step, warm_start=True)
  for line in restored.report:
    print(f"warm start: {line}")
  new = Checkpointer(dst, layouts=run.layouts)
  pos = None if args.reset_data_position else restored.data_position
  meta = {"warm_start": {"from": os.path.abspath(src), "step": restored.step,
                         "report": restored.report}}
  new.save(restored.step, restored.state, data_position=pos, metadata=meta, force=True,
           full=True)
  new.wait_until_finished()
  print(json.dumps({"warm_started_from": os.path.abspath(src), "step": restored.step,
                    "into": dst, "data_position": pos, "report_lines": len(restored.report)}))
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxrec.checkpoint",
                              description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)

  def common(sp):
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--workdir", help="the run's workdir (snapshots in WORKDIR/checkpoints)")
    g.add_argument("--dir", help="the snapshot directory itself")

  sp = sub.add_parser("list", help="versions, newest restorable marked ->")
  common(sp)
  sp.add_argument("--verify", default="none", choices=("none", "size", "checksum"))
  sp.add_argument("--json", action="store_true")
  sp = sub.add_parser("rollback", help="resume from an older version")
  common(sp)
  g = sp.add_mutually_exclusive_group(required=True)
  g.add_argument("--to", type=int, help="version (step) to resume from")
  g.add_argument("--back", type=int, help="versions to go back from the newest")
  sp = sub.add_parser("prune", help="delete rolled-back versions")
  common(sp)
  sp = sub.add_parser("verify", help="check every file against the manifests")
  common(sp)
  sp.add_argument("--step", type=int)
  sp = sub.add_parser("warm_start", help="start a new config's run from an old run's snapshot")
  common(sp)
  g = sp.add_mutually_exclusive_group(required=True)
  g.add_argument("--from", dest="src", help="the old run's workdir")
  g.add_argument("--from_dir", dest="src_dir", help="the old run's snapshot directory")
  sp.add_argument("--config", required=True, help="path/to/config.py[:variant] of the new run")
  sp.add_argument("--step", type=int, help="version to start from (default: newest)")
  sp.add_argument("--reset_data_position", action="store_true",
                  help="start the new run's data from the beginning")
  args, rest = p.parse_known_args(argv)
  overrides = []
  for r in rest:
    if args.cmd == "warm_start" and r.startswith("--config."):
      overrides.append(r[len("--config."):])
    else:
      p.error(f"unrecognised argument {r}")
  if args.cmd == "warm_start":
    return cmd_warm_start(args, overrides)
  return {"list": cmd_list, "rollback": cmd_rollback, "prune": cmd_prune,
          "verify": cmd_verify}[args.cmd](args)


if __name__ == "__main__":
  sys.exit(main())
