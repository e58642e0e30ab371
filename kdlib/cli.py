"""Command line: ``python -m kdlib run|train|grid|bench|summary|readme|onnx|lease``.

``run`` executes the numbered notebooks with papermill, injecting the parameters; ``train``
trains one configured model; ``grid`` trains a preset's grid without notebooks; ``bench``
measures training throughput; ``summary`` prints the results table of a results folder;
``onnx`` measures how ONNX Runtime agrees with kdlib on a folder's packed models
(:mod:`kdlib.export.agreement`); ``readme`` rewrites the README's generated blocks; ``lease``
is :mod:`kdlib.lease.commands`.
Errors in what the user asked for print one line and exit non-zero; nothing is trained or
written before the configuration has been validated.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from kdlib import notebook_runs
from kdlib.bench import main as bench_main
from kdlib.checkout import REPO_ROOT, default_results_dir, shown_path
from kdlib.checks import format_bits, parse_bits
from kdlib.config import INIT_METHODS, KD_METHODS, METHODS
from kdlib.budget import Budget, RunTimer, load_bench
from kdlib.device import device_kind, pick_device
from kdlib.executors import (EXECUTORS, GridRunError, MissingExtraError, check_resources,
                             execute_processes, execute_ray, import_ray)
from kdlib.experiments import (check_methods, check_seeds, execute, plan_chain, plan_grid,
                               plan_students, plan_teacher)
from kdlib.lease.commands import add_lease_parser
from kdlib.presets import (CHAIN_METHODS, DEFAULT_PRESET, PRESETS, STUDENT_METHODS,
                           TEACHER_SCHEDULE_METHODS, build_config, get_preset, preset_model)
from kdlib.report import changed_blocks, render_readme, stale_readme_figures
from kdlib.results import load_records, load_results, summarise, untrained
from kdlib.run_order import unique_runs
from kdlib.tblog import TENSORBOARD_ENV

EXIT_USAGE, EXIT_FAILED = 2, 1
DATA_DIR_HELP = ("folder holding cifar-100-python/ (default: $KDLIB_DATA, else ./data; "
                 "downloaded when missing)")


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["epochs=3", "lr=0.05", "nesterov=False"]`` -> dict of Python literals (strings stay
    strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} is not KEY=VALUE (e.g. --set epochs=3)")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def model_of(args: argparse.Namespace) -> str:
    """--model, else the preset's model (quick_squeezenet trains SqueezeNet without being told)."""
    return preset_model(args.preset, args.model)


def notebook_parameters(args: argparse.Namespace, name: str, results_dir: Path) -> dict[str, Any]:
    params: dict[str, Any] = {
        "preset": args.preset, "model": model_of(args),
        "seeds": list(args.seeds or get_preset(args.preset).seeds),
        "data_dir": notebook_runs.seen_from_notebooks(args.data_dir) if args.data_dir else "",
        "results_dir": notebook_runs.seen_from_notebooks(results_dir),
        "overrides": parse_overrides(args.set), "device": args.device or "",
    }
    # The grid is the preset's unless the command line says otherwise (never the notebook's own
    # defaults, which are the smoke settings).
    spec = get_preset(args.preset)
    chain = [format_bits(*parse_bits(b)) for b in (args.chain or spec.chain)]
    if name == "02_ta_chain":
        params["chain"] = chain
        params["methods"] = list(args.chain_methods or spec.chain_methods)
    if name == "03_individual":
        params["bits"] = ([format_bits(*parse_bits(b)) for b in args.bits] if args.bits
                          else chain[1:])
        params["methods"] = list(args.methods or spec.methods)
    if name == "04_results":
        params = {k: params[k] for k in ("preset", "results_dir")}
    return params


def _announce_plan(what: str, plan: list, args: argparse.Namespace, results_dir: Path) -> None:
    """How much of the plan is already trained, so nobody waits for training that won't happen."""
    seeds = list(args.seeds or get_preset(args.preset).seeds)
    done = len(plan) - len(untrained(plan, results_dir))
    print(f"{what}: {len(plan)} runs (preset {args.preset}, seeds {seeds}); {done} already have "
          f"records in {results_dir / 'runs'} and are skipped, {len(plan) - done} to train"
          + (f". To retrain from scratch, delete {results_dir} or pass --results-dir"
             if done else ""), flush=True)


# {option: (its attribute, the notebooks that read it)}; 04 reads only --preset and --results-dir
NOTEBOOK_OPTIONS = {"--seeds": ("seeds", ("01", "02", "03")),
                    "--set": ("set", ("01", "02", "03")), "--chain": ("chain", ("02", "03")),
                    "--chain-methods": ("chain_methods", ("02",)),
                    "--methods": ("methods", ("03",)), "--bits": ("bits", ("03",))}


def notebook_options(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Refuse an option that no selected notebook reads: `run --only 04 --bits 4` trained and
    showed nothing at 4 bits, silently."""
    ignored = [f"{flag} is read by notebook {' / '.join(readers)} only: add it to --only or "
               f"leave {flag} out" for flag, (name, readers) in NOTEBOOK_OPTIONS.items()
               if getattr(args, name) and not any(n.startswith(readers) for n in names)]
    if ignored:
        raise UserError("; ".join(ignored))


def command_run(args: argparse.Namespace) -> int:
    get_preset(args.preset)  # fail fast on an unknown preset
    known = notebook_runs.NOTEBOOKS
    unknown = [o for o in args.only or [] if not any(n.startswith(o) for n in known)]
    if unknown:
        raise UserError(f"--only {' '.join(unknown)} names no notebook; accepted: "
                        f"{', '.join(known)} or their first digits (01 ... 04)")
    names = [n for n in known if not args.only or any(n.startswith(o) for o in args.only)]
    notebook_options(args, names)
    notebook_runs.kernels_import_this_checkout()
    notebook_runs.kernels_read_the_commands_data_root()
    results_dir = Path(args.results_dir or default_results_dir(args.preset)).resolve()
    plan = _run_plan(args, names)
    if plan:  # 04 alone trains nothing
        _announce_plan(f"notebooks {' '.join(n[:2] for n in names)}", plan, args, results_dir)
    executed = results_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    log_path = notebook_runs.start_log(results_dir / "logs", echo=args.log_output)
    print(f"log: {log_path}", flush=True)
    if args.executor == "ray" and plan:
        _train_on_ray(plan, args, results_dir)  # the notebooks then find the records
    elif args.executor == "processes" and plan:
        execute_processes(plan, jobs=args.jobs, data_dir=args.data_dir,
                          results_dir=results_dir, device=args.device,
                          tensorboard=not args.no_tensorboard)
    for name in names:
        params = notebook_parameters(args, name, results_dir)
        print(f"== {name}  {json.dumps(params)}", flush=True)
        try:
            notebook_runs.execute(name, params, executed,
                                  progress_bar=not (args.log_output or args.no_progress))
        except notebook_runs.NotebookFailed as exc:
            print(f"error: notebook {name} failed: {exc} (executed copy: {exc.executed})",
                  file=sys.stderr)
            return EXIT_FAILED
    print(f"done: records in {results_dir / 'runs'}, executed notebooks in {executed}")
    return 0


def _check_starting_points(args: argparse.Namespace, results_dir: Path) -> None:
    """A method that starts from trained weights or distils needs their run ids: without them
    `finetune` would train from random weights under its name, and a KD method fail later."""
    needed = {"--init-id": args.method in INIT_METHODS and not args.init_id,
              "--teacher-id": args.method in KD_METHODS and not args.teacher_id}
    missing = [flag for flag, lacking in needed.items() if lacking]
    if missing:
        trained = sorted(p.stem for p in (results_dir / "runs").glob("*-teacher-*.json"))[:3]
        raise UserError(f"--method {args.method} starts from a trained model: pass "
                        f"{' and '.join(f'{flag} RUN_ID' for flag in missing)} (run ids are the "
                        f"names of {results_dir / 'runs'}/*.json"
                        + (f", e.g. the teacher {trained[0]}" if trained else "") + ")")


def command_train(args: argparse.Namespace) -> int:
    results_dir = Path(args.results_dir or default_results_dir(args.preset))
    _check_starting_points(args, results_dir)
    overrides = parse_overrides(args.set)
    if args.w_bits is not None:
        overrides["w_bits"] = args.w_bits
        overrides.setdefault("a_bits", args.w_bits)
    if args.a_bits is not None:
        overrides["a_bits"] = args.a_bits
    cfg = build_config(args.preset, model_of(args),
                       teacher=args.method in TEACHER_SCHEDULE_METHODS,
                       overrides=overrides, planned=dict(method=args.method, seed=args.seed,
                                                         teacher_id=args.teacher_id,
                                                         init_id=args.init_id))
    record = execute([cfg], data_dir=args.data_dir or None, results_dir=results_dir,
                     device=args.device or None, progress=not args.no_progress)[0]
    print(json.dumps({"run_id": record["run_id"], **record["metrics"]}, indent=1))
    return 0


def command_grid(args: argparse.Namespace) -> int:
    """Train a preset's whole grid without notebooks (dependencies first, finished runs skipped)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    results_dir = Path(args.results_dir or default_results_dir(args.preset)).resolve()
    plan = _grid_plan(args)
    _announce_plan("grid", plan, args, results_dir)
    budget = _grid_budget(args, results_dir)
    if args.executor == "ray":
        _train_on_ray(plan, args, results_dir)
    elif args.executor == "processes":
        execute_processes(plan, jobs=args.jobs, data_dir=args.data_dir, results_dir=results_dir,
                          device=args.device, threads=args.threads or 1,
                          tensorboard=not args.no_tensorboard, budget=budget)
    else:
        execute(plan, data_dir=args.data_dir, results_dir=results_dir, device=args.device,
                progress=not args.no_progress, budget=budget)
    print(f"done: records in {results_dir / 'runs'}")
    return 0


# {option: (its attribute, the executor that reads it, its default)}
EXECUTOR_OPTIONS = {"--jobs": ("jobs", "processes", 2), "--address": ("address", "ray", None),
                    "--cpus-per-run": ("cpus_per_run", "ray", 1),
                    "--gpus-per-run": ("gpus_per_run", "ray", 0.0),
                    "--max-retries": ("max_retries", "ray", 3)}
# grid's options that only --budget-min reads
BUDGET_OPTIONS = {"--no-span": "no_span", "--bench-dir": "bench_dir"}


def executor_options(args: argparse.Namespace) -> None:
    """Refuse an option that the chosen executor (or no budget) would silently ignore: `grid
    --jobs 4` without `--executor processes` trained one run at a time. Then fill in the
    executor options' defaults."""
    ignored = [f"{flag} is read by --executor {owner} only, not {args.executor}: add "
               f"--executor {owner} or leave {flag} out"
               for flag, (name, owner, _) in EXECUTOR_OPTIONS.items()
               if getattr(args, name) is not None and args.executor != owner]
    if args.executor == "ray" and getattr(args, "threads", None):
        ignored.append("--threads is not read by --executor ray: a Ray run's torch threads are "
                       "its --cpus-per-run")
    if args.executor == "ray" and getattr(args, "budget_min", None) is not None:
        ignored.append("--budget-min works with --executor serial or processes, not ray "
                       "(Ray takes no budget)")
    if getattr(args, "budget_min", 0) is None:
        ignored += [f"{flag} is read with --budget-min only: add --budget-min MINUTES or leave "
                    f"{flag} out" for flag, name in BUDGET_OPTIONS.items() if getattr(args, name)]
    if ignored:
        raise UserError("; ".join(ignored))
    for name, _, default in EXECUTOR_OPTIONS.values():
        if getattr(args, name) is None:
            setattr(args, name, default)
    # refused here, before `run` writes its log or `grid` sets the threads (torch raises)
    counts = {"--jobs": args.jobs if args.executor == "processes" else None,
              "--threads": getattr(args, "threads", None)}
    bad = [f"{flag} {n}" for flag, n in counts.items() if n is not None and n < 1]
    if bad:
        raise UserError(f"{' and '.join(bad)}: give a whole number >= 1")


def _grid_budget(args: argparse.Namespace, results_dir: Path) -> Budget | None:
    """--budget-min as a Budget whose estimates come from this folder's records and the
    newest benchmark of this device in --bench-dir."""
    if args.budget_min is None:
        return None
    if not args.budget_min > 0:
        raise UserError(f"--budget-min {args.budget_min}: give a positive number of minutes")
    kind = device_kind(pick_device(args.device))
    timer = RunTimer(kind, bench=load_bench(args.bench_dir or REPO_ROOT / "results" / "bench",
                                            kind),
                     jobs=args.jobs if args.executor == "processes" else 1)
    for record in load_records(results_dir):
        timer.add(record)
    print(f"budget: {args.budget_min:g} min on {kind}; estimates from {len(timer.records)} "
          f"record(s)" + (" and the benchmark" if timer.bench else ", no benchmark of this device"))
    return Budget(60.0 * args.budget_min, timer, span=not args.no_span)


def _grid_plan(args: argparse.Namespace) -> list:
    """`grid`'s plan: the preset's grid, with what the command line changes."""
    return plan_grid(preset=args.preset, model=model_of(args),
                     seeds=list(args.seeds or get_preset(args.preset).seeds),
                     chain=args.chain or None, chain_methods=args.chain_methods or None,
                     methods=args.methods or None, overrides=parse_overrides(args.set))


def _run_plan(args: argparse.Namespace, names: Sequence[str]) -> list:
    """What the selected notebooks train, each run once, dependencies first (the executor
    changes how the runs are trained, never which): 01 the teacher, 02 the chain methods along
    the chain, 03 the student methods at --bits (default: the chain's widths)."""
    spec = get_preset(args.preset)
    model, overrides = model_of(args), parse_overrides(args.set)
    chain = list(args.chain or spec.chain)
    chain_methods = check_methods(args.chain_methods or spec.chain_methods, CHAIN_METHODS,
                                  "notebook 02 / run_ta_chain")
    plan = []
    for s in check_seeds(args.seeds or spec.seeds):
        if "01_baseline" in names:
            plan.append(plan_teacher(args.preset, model, s, overrides))
        if "02_ta_chain" in names:
            plan += [cfg for m in chain_methods
                     for cfg in plan_chain(args.preset, model, s, chain, overrides, method=m)]
        if "03_individual" in names:
            plan += plan_students(args.preset, model, s, list(args.methods or spec.methods),
                                  args.bits or chain[1:], overrides)
    return unique_runs(plan)


def _train_on_ray(plan: list, args: argparse.Namespace, results_dir: Path) -> None:
    execute_ray(plan, data_dir=args.data_dir, results_dir=results_dir, device=args.device,
                address=args.address, cpus_per_run=args.cpus_per_run,
                gpus_per_run=args.gpus_per_run, max_retries=args.max_retries,
                tensorboard=not args.no_tensorboard)


def command_summary(args: argparse.Namespace) -> int:
    frame = load_results(args.results_dir)
    if frame.empty:
        raise UserError(f"no run records in {Path(args.results_dir) / 'runs'}")
    print(summarise(frame).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def command_onnx(args: argparse.Namespace) -> int:
    if args.images is not None and args.images < 1:
        raise UserError(f"--images {args.images}: give a number of test images >= 1")
    if args.method not in METHODS:
        raise UserError(f"--method {args.method!r} is unknown; accepted: {', '.join(METHODS)}")
    from kdlib.data import load_cifar100  # lazy, as the other commands' data
    try:
        from kdlib.export.agreement import RESULT_FILE, measure_committed, onnxruntime

        onnxruntime()
    except ImportError as exc:
        raise UserError(str(exc)) from exc
    images, labels = load_cifar100(args.data_dir, train=False)
    measure_committed(args.results_dir, images, labels, method=args.method, seed=args.seed,
                      limit=args.images)
    print(f"wrote {shown_path(Path(args.results_dir) / RESULT_FILE)}; `python -m kdlib readme` "
          "shows it")
    return 0


def command_readme(args: argparse.Namespace) -> int:
    readme = REPO_ROOT / "README.md"
    text = readme.read_text()
    updated = render_readme(text, args.results_dir, args.bench_dir)
    stale = "; ".join(f"{', '.join(p.name for p in paths)} of {shown_path(folder)} (python -m "
                      f"kdlib run --preset {folder.name} --only 04)"
                      for folder, paths in stale_readme_figures(updated, REPO_ROOT).items())
    stale = stale and f"figures the README shows were drawn from other records than now: {stale}"
    if args.check:
        if updated != text:
            raise UserError("README.md is out of date with the result files (blocks "
                            f"{', '.join(changed_blocks(text, updated))}): run python -m kdlib "
                            "readme")
        if stale:
            raise UserError(stale)
        print("README.md agrees with the result files")
        return 0
    if updated == text:
        print("README.md already agrees with the result files: unchanged")
    else:
        readme.write_text(updated)
        print(f"README.md updated from {args.results_dir} and {args.bench_dir}")
    if stale:
        print(f"warning: {stale}", file=sys.stderr)
    return 0


def command_bench(args: argparse.Namespace) -> int:
    return bench_main(args)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"{' | '.join(PRESETS)} (default: {DEFAULT_PRESET})")
    p.add_argument("--model", default=None,
                   help="registry name (default: the preset's, resnet20 but for "
                        "quick_squeezenet)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--results-dir", default=None, help="default: results/<preset>")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a RunConfig field, e.g. --set epochs=3 (repeatable)")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="write no TensorBoard scalars (default: results/<preset>/tb/<run_id> "
                        "when tensorboard is installed)")


def _executor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default="serial",
                   help="serial: one run after another here; processes: --jobs runs at "
                        "once here (several share a GPU); ray: every run as a Ray task "
                        "(pip install -e '.[ray]')")
    # default None: an option given to an executor that does not read it is refused
    # (executor_options), then the default is filled in
    p.add_argument("--address", default=None, help="ray: auto | HOST:PORT of a running "
                   "cluster (default: start Ray on this machine)")
    p.add_argument("--cpus-per-run", type=int, default=None,
                   help="ray: CPUs each run reserves, also its torch threads (default: 1)")
    p.add_argument("--gpus-per-run", type=float, default=None,
                   help="ray: GPUs each run reserves, e.g. 1 or 0.5 (default: 0)")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes: runs at once on this machine (default 2)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="ray: retries of a run whose worker died; it resumes from its "
                        "checkpoint (default: 3)")


def _plan_options(p: argparse.ArgumentParser, chain_methods: str, methods: str) -> None:
    """What `run` and `grid` plan: seeds, chain and methods (help texts differ: `run` names the
    notebook that reads each)."""
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="default: the preset's seeds")
    p.add_argument("--chain", nargs="+", default=None, help="TA chain, e.g. 32 16 8 4 2 1")
    p.add_argument("--chain-methods", nargs="+", default=None, help=chain_methods)
    p.add_argument("--methods", nargs="+", default=None, help=methods)


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="execute notebooks 01-04 with papermill")
    _common_options(run)
    _executor_options(run)
    _plan_options(run, f"notebook 02, any of: {' '.join(CHAIN_METHODS)} (default: all)",
                  f"notebook 03, any of: {' '.join(STUDENT_METHODS)} (default: all)")
    run.add_argument("--bits", nargs="+", default=None,
                     help="student bit widths for notebook 03 (default: the chain's widths "
                          "after its teacher, --chain's too)")
    run.add_argument("--only", nargs="+", default=None, help="run only these notebooks, e.g. 01 04")
    run.add_argument("--log-output", action="store_true",
                     help="stream cell output to the log (and no progress bar)")
    run.add_argument("--no-progress", action="store_true",
                     help="no papermill progress bar (for logs)")
    run.set_defaults(func=command_run)


def _add_grid(sub: argparse._SubParsersAction) -> None:
    grid = sub.add_parser("grid",
                          help="train the whole grid without notebooks (then `run` shows it)")
    _common_options(grid)
    _executor_options(grid)
    _plan_options(grid, "default: the preset's", "default: the preset's")
    grid.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    grid.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    grid.add_argument("--budget-min", type=float, default=None,
                      help="start a run only if its estimated time fits in what is left of this "
                           "many minutes (estimates: finished runs here, else --bench-dir); a run "
                           "longer than the whole budget trains whole epochs until it ends and "
                           "resumes from its checkpoint next call")
    grid.add_argument("--no-span", action="store_true",
                      help="with --budget-min: never start a run that cannot finish in this call")
    grid.add_argument("--bench-dir", default=None,
                      help="with --budget-min: benchmark files for the time estimates "
                           "(default: results/bench)")
    grid.set_defaults(func=command_grid)


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train one model from the shell")
    _common_options(train)
    train.add_argument("--method", default="individual",
                       help=" | ".join(METHODS) + " (default: individual)")
    train.add_argument("--w-bits", type=int, default=None, help="default: 32")
    train.add_argument("--a-bits", type=int, default=None, help="default: same as --w-bits")
    train.add_argument("--seed", type=int, default=0, help="default: 0")
    train.add_argument("--teacher-id", default=None, help="run id of the teacher (KD methods)")
    train.add_argument("--init-id", default=None, help="run id whose weights initialise this run")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    train.set_defaults(func=command_train)


def _results_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", default=str(default_results_dir(DEFAULT_PRESET)),
                   help=f"default: results/{DEFAULT_PRESET}")


def _add_reports(sub: argparse._SubParsersAction) -> None:
    """The commands that read a results folder: summary, readme, onnx."""
    summary = sub.add_parser("summary", help="print mean ± std over seeds per method × bits")
    _results_dir_option(summary)
    summary.set_defaults(func=command_summary)

    readme = sub.add_parser("readme", help="re-render the README's results and benchmark blocks")
    _results_dir_option(readme)
    readme.add_argument("--bench-dir", default=str(REPO_ROOT / "results" / "bench"),
                        help="default: results/bench")
    readme.add_argument("--check", action="store_true", help="only check, exit 2 if out of date")
    readme.set_defaults(func=command_readme)

    onnx = sub.add_parser("onnx", help="how ONNX Runtime's logits agree with kdlib's on a "
                                       "results folder's packed models (all test images)")
    _results_dir_option(onnx)
    onnx.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    onnx.add_argument("--method", default="ta_chain",
                      help="whose models, beside the teacher's (default: ta_chain)")
    onnx.add_argument("--seed", type=int, default=0, help="default: 0 (the committed models)")
    onnx.add_argument("--images", type=int, default=None,
                      help="only the first N test images (default: all 10,000)")
    onnx.set_defaults(func=command_onnx)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="training throughput, ours vs a typical pipeline")
    bench.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    bench.add_argument("--out", default=str(REPO_ROOT / "results" / "bench"),
                       help="default: results/bench")
    bench.add_argument("--windows", type=int, default=5,
                       help="timed windows, the median reported (default: 5)")
    bench.add_argument("--steps", type=int, default=10, help="steps per timed window (default: 10)")
    bench.add_argument("--device", default=None,
                       help="cpu | cuda (default: cuda when available)")
    bench.add_argument("--variants", nargs="+", default=None, help="only these (default: all)")
    bench.set_defaults(func=command_bench)


def build_parser() -> argparse.ArgumentParser:
    summary = __doc__.split("\n")[0].replace("``", "`")  # the docstring's RST, as plain text
    parser = argparse.ArgumentParser(prog="python -m kdlib", description=summary)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_grid, _add_train, _add_reports, _add_bench, add_lease_parser):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_tensorboard", False):
        os.environ[TENSORBOARD_ENV] = "0"  # also seen by the notebooks' kernels
    try:
        if hasattr(args, "executor"):
            executor_options(args)
        if getattr(args, "executor", "serial") == "ray":
            import_ray()  # fail before planning or training anything
            check_resources(args.cpus_per_run, args.gpus_per_run, args.max_retries, args.device)
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, PermissionError, MissingExtraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GridRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
