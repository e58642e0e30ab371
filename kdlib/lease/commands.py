"""``python -m kdlib lease``: the command line of a lent GPU's steps (see kdlib/lease/README.md).

``store`` and ``pack`` run on the device at the start and end of its calls and move files:
:func:`main_light` runs them without the imports of :mod:`kdlib.cli` (torch, pandas, the
trainers); ``store`` needs none of them, ``pack`` only torch, to name its device. The other
steps plan grids and import what they need when they run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from kdlib import lease
from kdlib.checkout import REPO_ROOT, default_results_dir


def main_light(argv: Sequence[str] | None = None) -> int:
    """``python -m kdlib lease store|pack`` (kdlib/__main__.py sends them here): the same
    arguments and errors as through :func:`kdlib.cli.main`, without its imports."""
    parser = argparse.ArgumentParser(prog="python -m kdlib")
    add_lease_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _model(args: argparse.Namespace) -> str:
    from kdlib.presets import preset_model  # lazy: imports torch (through the config)

    return preset_model(args.preset, args.model)


def _plan(args: argparse.Namespace, **grid):
    from kdlib.experiments import plan_grid  # lazy: imports torch
    from kdlib.presets import get_preset

    return plan_grid(preset=args.preset, model=_model(args),
                     **{"seeds": list(get_preset(args.preset).seeds), **grid})


def add_lease_parser(subparsers) -> None:
    """The ``lease`` command and its steps, on ``subparsers`` of a ``python -m kdlib`` parser."""
    command = subparsers.add_parser("lease", help="a lent GPU: prepare | store | go | pack | "
                                                  "receive | restore (kdlib/lease/README.md)")
    steps = command.add_subparsers(dest="step", required=True)
    for name, text in (("prepare", "here: pack data and weights into .lease/, print the calls"),
                       ("go", "there: data, benchmark, budgeted grid, files into --out")):
        step = steps.add_parser(name, help=text)
        step.add_argument("--preset", required=True,
                          help="the grid to fill (gpu's is complete: paper)")
        step.add_argument("--model", default=None, help="default: the preset's model")
        step.add_argument("--seeds", nargs="+", type=int, default=None,
                          help="default: the preset's seeds")
        step.add_argument("--chain", nargs="+", default=None,
                          help="TA chain, e.g. 32 16 8 4 2 1 (default: the preset's)")
        step.add_argument("--chain-methods", nargs="+", default=None, help="default: the preset's")
        step.add_argument("--methods", nargs="+", default=None, help="default: the preset's")
        step.add_argument("--results-dir", default=None, help="default: results/<preset>")
        step.add_argument("--minutes", type=float, default=8.5,
                          help="wall-clock of the last call's work (its timeout is 10 min)")
        step.add_argument("--jobs", type=_jobs, default="auto",
                          help="runs at once; auto: what the benchmark found worth it")
        step.add_argument("--bench-args", type=json.loads, default=None,
                          help="run_benchmark's keyword arguments as JSON (default: the "
                               "device benchmark, about 3 minutes on a GPU)")
    steps.choices["prepare"].add_argument(  # go reads the data its calls stored
        "--data-dir", default=None,
        help="folder holding cifar-100-python/ (default: $KDLIB_DATA, else ./data)")
    steps.choices["prepare"].add_argument(
        "--part-mib", type=float, default=None,
        help="data part size (default: the most that keeps a call under 64 MiB with the tree)")
    go_step = steps.choices["go"]
    pack_step = steps.add_parser("pack", help="there, after go: finished runs and GPU "
                                              "benchmarks into --out")
    pack_step.add_argument("--out", required=True, help="folder of the files to return ($OUT)")
    pack_step.add_argument("--preset", required=True, help="the grid's (named in the manifest)")
    pack_step.add_argument("--results-dir", default=None, help="default: results/<preset>")
    go_step.add_argument("--bench", choices=("auto", "always", "never"), default="auto",
                         help="auto: only if results/bench has no file of this device")
    go_step.add_argument("--device", default=None,
                         help="cpu | cuda (default: cuda when available)")
    go_step.add_argument("--seconds", type=float, default=None,
                         help="instead of --minutes (a follow-up call's time, computed in bash)")
    store = steps.add_parser("store", help="there: keep carried data parts and weight folders "
                                           "in /dev/shm")
    store.add_argument("paths", nargs="+", help="a data part or a folder of carried weights")
    store.add_argument("--call", type=int, default=None,
                       help="this call's number: also check that the stash holds what the "
                            "calls before it stored (.lease/stash.json)")
    restore = steps.add_parser("restore", help="here, for a lease that never ran: git's index "
                                               "as before `prepare`")
    restore.add_argument("--preset", default=None,
                         help="default: every results folder's checkpoints")
    restore.add_argument("--results-dir", default=None, help="default: results/<preset>")
    receive = steps.add_parser("receive", help="here: unpack the returned files into results/")
    receive.add_argument("folders", nargs="+", metavar="folder",
                         help="each returning call's folder of files, in the order of the calls")
    receive.add_argument("--bench-dir", default=None, help="default: results/bench")
    receive.add_argument("--partial", action="store_true",
                         help="receive a follow-up's return without the earlier one(s) it "
                              "builds on (lost)")
    receive.add_argument("--preset", default=None,
                         help="default: the one the returned files name (results/<preset>)")
    receive.add_argument("--results-dir", default=None, help="default: results/<preset>")
    receive.add_argument("--model", default=None, help="default: the preset's model")
    command.set_defaults(func=command_lease)


def command_lease(args: argparse.Namespace) -> int:
    """The steps of a lent GPU (see kdlib.lease): prepare and receive here, store and go there."""
    if args.step == "store":  # the first thing a device call runs: no preset, no results
        return _store(args)
    if args.step == "receive":  # the preset of the returns, not a default that may be another
        try:
            args.preset = lease.returned_preset([Path(f) for f in args.folders], args.preset)
        except ValueError as exc:
            print(f"lease receive: {exc}", file=sys.stderr)
            return 2
    results_dir = (Path(args.results_dir or default_results_dir(args.preset)).resolve()
                   if args.results_dir or args.preset else None)  # None: restore, every folder
    steps = {"prepare": _prepare, "restore": _restore, "pack": _pack, "go": _go,
             "receive": _receive}
    return steps[args.step](args, results_dir)


def _store(args: argparse.Namespace) -> int:
    try:
        lease.store([Path(p) for p in args.paths], call=args.call)
    except lease.StashIncomplete as exc:
        print(f"lease store: {exc}", file=sys.stderr)
        return lease.STASH_INCOMPLETE_EXIT
    return 0


def _prepare(args: argparse.Namespace, results_dir: Path) -> int:
    from kdlib.data import resolve_data_root

    grid = _lease_grid(args)
    plan = _plan(args, **grid)
    calls = lease.prepare(plan, data_root=resolve_data_root(args.data_dir),
                          results_dir=results_dir, repo_root=REPO_ROOT, minutes=args.minutes,
                          jobs=args.jobs, preset=args.preset, model=_model(args), grid=grid,
                          bench_args=args.bench_args, part_mib=args.part_mib)
    print(f"{len(calls)} device calls, one right after the other (the machine goes back "
          f"30 s after a call); written to {lease.LEASE_DIR}/{lease.CALLS_FILE}:")
    for i, call in enumerate(calls, 1):
        print(f"{i}. carry={json.dumps(call['carry'])} timeout_s={call['timeout_s']}\n"
              f"   {call['command']}")
    again = json.loads((REPO_ROOT / lease.LEASE_DIR / lease.AGAIN_FILE).read_text())
    print(f"{len(calls) + 1}. (if the last reply's lease has warm true and budget_left_s >= "
          f"{lease.AGAIN_MIN_S}: at once, the same grid for the time left on that machine; "
          f"in the same batch, first copy call {len(calls)}'s files_at: cp -r FILES_AT "
          f"{lease.LEASE_DIR}/back-{len(calls)}, as the tool may reuse the folder) "
          f"carry=[] timeout_s={again['timeout_s']}, {lease.AGAIN_LEFT} replaced by "
          f"budget_left_s (also in {lease.LEASE_DIR}/{lease.AGAIN_FILE}):\n"
          f"   {again['command']}")
    full = _plan(args)
    _note_unneeded_weights(full, results_dir, then=" (then prepare again: more room a call)")
    print(f"A call that exits {lease.STASH_INCOMPLETE_EXIT} found a fresh machine (the earlier "
          "calls' files are gone): it names the calls to make again.")
    print(f"then: python -m kdlib lease receive {lease.LEASE_DIR}/back-{len(calls)} "
          f"[FOLDER_OF_CALL_{len(calls) + 1}] --preset {args.preset}")
    return 0


def _restore(args: argparse.Namespace, results_dir: Path | None) -> int:
    checkpoints = ([results_dir / "checkpoints"] if results_dir is not None
                   else sorted(p for p in (REPO_ROOT / "results").glob("*/checkpoints")
                               if p.is_dir()))  # on disk all along, if out of the index
    _note_put_back(lease.unhide_after_lease(REPO_ROOT, also=checkpoints))
    print(f"{', '.join(os.path.relpath(c, REPO_ROOT) for c in checkpoints) or 'checkpoints'}"
          ": in git's index as committed")
    return 0


def _pack(args: argparse.Namespace, results_dir: Path) -> int:
    lease.pack(results_dir, Path(args.out), Path.cwd() / "results" / "bench", preset=args.preset)
    return 0


def _go(args: argparse.Namespace, results_dir: Path) -> int:
    log_path = results_dir / "logs" / f"lease-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:  # the lease's own lines also come back as a file
        print(message, flush=True)
        with open(log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    minutes = args.minutes if args.seconds is None else args.seconds / 60.0
    try:
        lease.go(preset=args.preset, model=_model(args), minutes=minutes, jobs=args.jobs,
                 results_dir=results_dir, repo_root=Path.cwd(), log=log,
                 bench=args.bench, device=args.device, bench_args=args.bench_args,
                 grid=_lease_grid(args))
    except lease.StashIncomplete as exc:  # the follow-up then skips its pack
        log(f"lease go: {exc}")
        return lease.STASH_INCOMPLETE_EXIT
    return 0


def _receive(args: argparse.Namespace, results_dir: Path) -> int:
    bench_dir = Path(args.bench_dir) if args.bench_dir else REPO_ROOT / "results" / "bench"
    try:
        lease.check_returns([Path(f) for f in args.folders], partial=args.partial)
    except ValueError as exc:
        print(f"lease receive: {exc}", file=sys.stderr)
        return 2
    finished, benches = 0, set()
    for folder in args.folders:  # in order: a later call's files replace an earlier one's
        benches |= {bench_dir / e["name"] for e in lease.read_manifest(Path(folder))["extra"]}
        counts = lease.receive(Path(folder), results_dir, bench_dir)
        finished += counts["finished_paused"]
        print(f"received {counts['records']} records and {counts['bench']} benchmark file(s) "
              f"from {folder} into {results_dir}")
    print("now: python -m kdlib readme")
    _note_compile_decisions(sorted(benches))
    if finished:
        print(f"{finished} paused run(s) finished: their checkpoints were deleted")
    plan = _plan(args)
    staged = lease.stage_for_next_lease(plan, results_dir, REPO_ROOT)
    if staged["added"]:  # checkpoints/ is ignored, and a later session is a fresh checkout
        size = sum(p.stat().st_size for p in staged["added"]) / lease.MIB
        print(f"staged in git: {len(staged['added'])} weight or checkpoint file(s) "
              f"({size:.1f} MiB) that the next lease's unfinished runs need; commit them "
              f"with the records: {_relative(staged['added'])}")
    if staged["removed"]:
        print(f"staged in git: the removal of {len(staged['removed'])} weight or checkpoint "
              f"file(s) no unfinished run needs any more: {_relative(staged['removed'])}")
    paused = lease.planned_paused(plan, results_dir)
    if paused:
        print(f"{len(paused)} paused run(s) continue next lease from their checkpoints "
              "(staged above): the next `lease prepare` carries them")
    _note_unneeded_weights(plan, results_dir)
    _note_put_back(lease.unhide_after_lease(REPO_ROOT))
    return 0


def _note_put_back(folders: Sequence[str]) -> None:
    """Say which folders `lease prepare` had hidden from the calls are in git's index again."""
    if folders:
        print(f"back in git's index: {', '.join(folders)} (hidden from the lease's calls, on "
              "disk all along)")


def _note_compile_decisions(benches: Sequence[Path]) -> None:
    """Print what a received benchmark decided about torch.compile for each preset
    (:func:`kdlib.lease.compile_undecided`): a long grid that does not compile yet whose switch
    is to be set by hand before its first run, or a compiling one whose levels it found
    inexact."""
    from kdlib.presets import PRESETS

    for path in benches:
        bench = json.loads(path.read_text())
        for name in PRESETS:
            why = lease.compile_undecided(bench, name, None, default_results_dir(name))
            if why:
                print(f"{path.name}: {why}")


def _note_unneeded_weights(plan, results_dir: Path, then: str = "") -> None:
    """Print the `git rm` for committed weight files no unfinished run of ``plan`` (the
    preset's whole grid) needs any more."""
    unneeded = lease.unneeded_committed_weights(plan, results_dir, REPO_ROOT)
    if unneeded:  # every call carries the tracked tree: keep it small
        size = sum(p.stat().st_size for p in unneeded) / lease.MIB
        print(f"no unfinished run needs {len(unneeded)} committed weight file(s) any more "
              f"({size:.1f} MiB that every device call carries): git rm {_relative(unneeded)}"
              f"{then}")


def _relative(paths: Sequence[Path]) -> str:
    """``paths`` relative to the working directory, for a command to copy."""
    return " ".join(os.path.relpath(p, Path.cwd()) for p in paths)


def _lease_grid(args: argparse.Namespace) -> dict[str, list]:
    """The grid arguments given on the command line (the preset's for the others)."""
    grid = {"seeds": args.seeds, "chain": args.chain, "chain_methods": args.chain_methods,
            "methods": args.methods}
    return {k: list(v) for k, v in grid.items() if v}


def _jobs(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give 'auto' or an integer >= 1")
    return jobs


