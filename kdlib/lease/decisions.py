"""What a lease decides from the device's benchmark: what to measure there
(:func:`device_bench_args`, :func:`missing_parts`, :func:`complete_bench`), and how to train
the grid (:func:`auto_jobs`, :func:`replays_steps`, :func:`groups_weights`,
:func:`compile_undecided`, :func:`later_compile_parts`)."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the device benchmark: fit()'s steps, the bf16 mode, compile and the typical pipeline, in
# about two minutes on a GPU (plus its concurrent, compiled and profile parts, kdlib.bench.run)
DEVICE_BENCH = dict(variants=["fp32", "w4a4", "w1a1", "kd_w4", "kd_w4_nchw", "kd_w4_bf16",
                              "kd_w4_compile", "kd_w4_typical", "data_kdlib"],
                    windows=5, steps=50, concurrency_seconds=10.0)
FALLBACK_BENCH = dict(variants=["fp32", "w4a4", "kd_w4"], windows=3, steps=20, concurrency=())
# The seconds a lease gives its benchmark, from its start (issue 15: "≤ 3 min"): a later part
# that would not end within them waits for a later lease (all of a new GPU's parts in one
# lease: 5 to 7 minutes of a 15-minute session). A new benchmark's variants and 1, 2 and 4
# processes side by side, which the grid's estimates need, run whatever they take, as do the
# parts of NEVER_HELD_BACK.
BENCH_ALLOWANCE_S = 180.0
FIRST_COUNTS_MAX = 4  # processes side by side that a new benchmark measures before the grid
# What a later part takes on a GPU, to decide whether it fits: measured in the H200's lease 3
# (2026-12-04, its log) for the profile (13 s) and the counts of processes (47 s for 8 and 12),
# estimated for the replayed step, which no GPU has run yet.
PART_SECONDS = {"profile": 15.0, "graphs": 120.0}
COUNT_SECONDS = 24.0  # one more number of processes side by side
# Never held back: the grouped part's device check (about 20 s) decides how this lease's own
# grid quantizes its weights (652 operators a KD step grouped, 1,136 per layer, counted on the
# CPU), and a preset that needs the compiled part trains nothing before it (compile_undecided).
NEVER_HELD_BACK = ("grouped", "compiled")


def device_bench_args(preset: str, model: str | None = None,
                      bench_args: dict[str, Any] | None = None, device=None) -> dict[str, Any]:
    """run_benchmark's arguments for a lease of ``preset``: ``bench_args`` (default
    :data:`DEVICE_BENCH`), without the compiled variants, and so without the compiled part,
    for a preset whose runs are too short to compile (minutes of the lease it trains instead;
    a lease of a long-run preset measures that part, see :func:`missing_parts`). On a CUDA
    ``device``, the counts of processes side by side up to :data:`FIRST_COUNTS_MAX` unless
    ``bench_args`` names some (the larger ones are a later part, :func:`complete_bench`)."""
    import torch

    from kdlib.bench.compiled import compile_may_pay
    from kdlib.bench.measure import usable_cores
    from kdlib.bench.run import device_concurrency

    args = dict(DEVICE_BENCH if bench_args is None else bench_args)
    if "variants" in args and not compile_may_pay(preset, model):
        args["variants"] = [v for v in args["variants"] if "compile" not in v]
    if device is not None and torch.device(device).type == "cuda" and "concurrency" not in args:
        args["concurrency"] = [k for k in device_concurrency(usable_cores())
                               if k <= FIRST_COUNTS_MAX]
    return args


def compile_undecided(bench: dict[str, Any] | None, preset: str, model: str | None,
                      results_dir: Path) -> str | None:
    """Why a lease must not train ``preset`` yet, or None. ``compile`` is in the run id, so a
    grid of long runs (:func:`kdlib.bench.compiled.compile_may_pay`) whose benchmark says
    compiling pays, while the preset does not compile, would train runs that the switch then
    orphans: that is decided first, by hand, before its first run (later, its records stand).
    And a preset that compiles does not train where the benchmark found the compiled levels
    not exact (each run would refuse: :func:`kdlib.compile_check.require_exact_levels`)."""
    from kdlib.bench.compiled import compile_may_pay, compile_verdict
    from kdlib.budget import LEASE_TRAINING_MINUTES
    from kdlib.presets import build_config
    from kdlib.quant.ste import COMPILED_DIVISION

    if bench is None:
        return None
    if build_config(preset, model).compile:
        compiled = bench.get("compiled") or {}
        if compiled.get("division") != COMPILED_DIVISION:
            return None  # not measured with today's code: each run checks for itself
        levels = compiled.get("levels") or {}
        if levels.get("exact"):
            return None
        failed = compiled.get("error") or levels.get("error")
        found = f"could not check them ({failed})" if failed else "found them not exact"
        return (f"`{preset}` compiles, but this device's benchmark {found}: its runs train only "
                "where the compiled quantizer levels are exact (compile=False is another run id)")
    if not compile_may_pay(preset, model):
        return None
    if any((results_dir / "runs").glob("*.json")):
        return None
    verdict = compile_verdict(bench, 60.0 * LEASE_TRAINING_MINUTES)
    if not verdict or not verdict["pays"]:
        return None
    return (f"torch.compile pays for `{preset}` ({verdict['why']}) but the preset does not "
            f"compile: set compile=True in its preset (kdlib/presets.py) before its first run, "
            "then lease again")


# the compiled part of a benchmark (levels, compiled processes at 2 counts, the CUDA-graphs
# variant): about 4 minutes on the H200 (lease 3's log); measured in a grid's spare time only
# with this much left
SPARE_COMPILED_S = 300.0


def later_compile_parts(bench: dict[str, Any] | None, device, preset: str) -> list[str]:
    """The presets other than ``preset`` that have to decide on torch.compile before their
    first run (long runs; the preset does not compile yet) and whose compiled part the
    benchmark lacks: measured in the spare time of a lease whose grid is done, so that the
    decision is made here, by hand, before their first lease (which would otherwise spend
    its benchmark on it and then train nothing, :func:`compile_undecided`)."""
    from kdlib.bench.compiled import compile_may_pay
    from kdlib.presets import PRESETS, build_config

    if bench is None:
        return []
    return [name for name in PRESETS
            if name != preset and compile_may_pay(name) and not build_config(name).compile
            and "compiled" in missing_parts(bench, device, name)]


def replays_steps(bench: dict[str, Any] | None, preset: str, model: str | None = None) -> bool:
    """Whether a lease trains the preset's runs with ``cuda_graphs``: the benchmark's graphs
    part found the replayed step bit for bit eager's and faster side by side
    (:func:`kdlib.bench.graphs.graphs_verdict`), and the preset does not compile."""
    from kdlib.bench.graphs import graphs_verdict
    from kdlib.presets import build_config

    if bench is None or build_config(preset, model).compile:
        return False
    verdict = graphs_verdict(bench)
    return bool(verdict and verdict["use"])


def groups_weights(bench: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether a lease trains with the weights of all layers quantized together
    (``group_weights``, :mod:`kdlib.quant.grouped`), and why. Yes, unless the benchmark's device
    check found them differing from per-layer ones there, or failed to run: then per layer, the
    quantizer that the unit tests cross-check and that the first leases trained with."""
    part = (bench or {}).get("grouped") or {}
    check = {"error": part["error"]} if "error" in part else part.get("check")
    if check is None:
        return True, "no device check in the benchmark"
    if "error" in check:
        return False, f"the device check of grouped weights failed: {check['error']}"
    if not check.get("exact"):
        differ = [b for b, e in check.get("by_bits", {}).items()
                  if not (e["values"] and e["gradients"])]
        return False, f"grouped weights differ from per-layer ones here at {', '.join(differ)} bits"
    return True, "grouped weights equal per-layer ones here, bit for bit"


def auto_jobs(bench: dict[str, Any] | None, preset: str, model: str | None = None) -> int:
    """`--jobs auto`: as many runs at once as the benchmark found worth it for the preset's
    step: compiled processes for a preset that compiles, replaying ones where a lease replays
    steps (:func:`replays_steps`), eager ones otherwise (1 without a benchmark)."""
    from kdlib.bench.concurrent import worth_running
    from kdlib.presets import build_config

    if build_config(preset, model).compile:
        part = (bench or {}).get("compiled")
    elif replays_steps(bench, preset, model):
        part = bench["graphs"]
    else:
        part = bench
    return worth_running((part or {}).get("concurrency"))


def missing_parts(result: dict[str, Any], device, preset: str | None = None) -> dict[str, Any]:
    """What a benchmark measured before its parts existed lacks: ``{"profile": True}`` (again
    when profiled before the weights were quantized together), ``{"grouped": True}``
    (:mod:`kdlib.bench.grouped`) and, on a GPU, ``{"graphs": True}`` (the step replayed as a
    CUDA graph, :mod:`kdlib.bench.graphs`), ``{"concurrency": [counts]}`` of
    :func:`kdlib.bench.run.device_concurrency` it has not measured (none once measuring them
    failed) and ``{"compiled": True}`` (the compiled quantizers' levels and compiled processes
    side by side, :mod:`kdlib.bench.compiled`; again when measured with another
    ``COMPILED_DIVISION`` than today's; only for a ``preset`` whose runs are long enough to
    compile, :func:`kdlib.bench.compiled.compile_may_pay`, so that a `gpu` lease trains instead).
    ``preset=None``: every part."""
    import torch

    from kdlib.bench.compiled import compile_may_pay
    from kdlib.bench.run import device_concurrency
    from kdlib.quant.ste import COMPILED_DIVISION

    missing: dict[str, Any] = {}
    profile = result.get("profile")
    if profile is None or not (profile.get("grouped_weights") or "error" in profile):
        missing["profile"] = True  # none, or one of the weights quantized per layer
    if "grouped" not in result:
        missing["grouped"] = True
    if torch.device(device).type == "cuda" and "graphs" not in result:
        missing["graphs"] = True
    # measured before compiled graphs divided the levels as they do now: measured again
    compiled = result.get("compiled") or {}
    if (torch.device(device).type == "cuda" and compiled.get("division") != COMPILED_DIVISION
            and (preset is None or compile_may_pay(preset))):
        missing["compiled"] = True
    concurrency = result.get("concurrency") or {}
    tried = "error" in concurrency or "added_error" in concurrency  # an answer too: not again
    if torch.device(device).type == "cuda" and not tried:
        cores = (result.get("machine") or {}).get("usable_cores")
        counts = [k for k in device_concurrency(cores)
                  if str(k) not in concurrency.get("by_jobs", {})]
        if counts:
            missing["concurrency"] = counts
    return missing


def part_seconds(name: str, missing: dict[str, Any]) -> float:
    """About how long the missing part ``name`` takes on a GPU (:data:`PART_SECONDS`)."""
    if name == "concurrency":
        return COUNT_SECONDS * len(missing["concurrency"])
    return PART_SECONDS[name]


def complete_bench(result: dict[str, Any], bench_dir: Path, data_root: Path, device, *,
                   preset: str, model: str, steps: int | None = None,
                   seconds: float | None = None, log: Callable[[str], None] = print) -> Path:
    """A benchmark measured before it had a part gets it, in place, in this order: the
    grouped-weights part, the profile, the replayed step, the larger counts of processes side
    by side, the compiled part (minutes). ``seconds``: a part that would not end within them
    (:func:`part_seconds`, from this call's start) is left for a later lease, and the parts
    after it that fit still go; those of :data:`NEVER_HELD_BACK` always go."""
    from kdlib.bench.run import (PROFILE_STEPS, add_concurrency, bench_file_name, compiled_part,
                                 graphs_part, grouped_part, profile_or_error)
    from kdlib.bench.measure import error_entry
    from kdlib.bench.variants import make_context
    from kdlib.data import load_cifar100
    from kdlib.fileio import write_json_atomic
    from kdlib.quant.ste import COMPILED_DIVISION

    started = time.monotonic()  # loading the data counts too
    missing = missing_parts(result, device, preset)
    images, labels = load_cifar100(data_root, train=True, download=False)
    preset = result.get("settings", {}).get("preset", preset)
    ctx = make_context(images, labels, preset=preset, model=model, device=device, workers=0)
    # the short parts first, the compiled part (minutes) last, at the process count just
    # chosen; the file is written after each, so a lease cut short keeps what it measured
    parts = {
        "grouped": lambda r: grouped_part(ctx, r.get("settings", {}), log),
        "profile": lambda r: profile_or_error(ctx, steps or PROFILE_STEPS, log),
        "graphs": lambda r: graphs_part(r, ctx, preset=preset, model=model, log=log),
        "concurrency": lambda r: add_concurrency(r, missing["concurrency"], ctx, preset=preset,
                                                 model=model, log=log),
        "compiled": lambda r: compiled_part(r, ctx, preset=preset, model=model, log=log),
    }
    path = bench_dir / bench_file_name(result)
    for name, measure in parts.items():
        if name not in missing:
            continue
        if seconds is not None and name not in NEVER_HELD_BACK:
            left = seconds - (time.monotonic() - started)
            if part_seconds(name, missing) > left:
                log(f"bench: the {name} part (about {part_seconds(name, missing):.0f} s) waits "
                    f"for a later lease: {max(left, 0):.0f} s of the benchmark's allowance left")
                continue
        try:
            value = measure(result)
        except Exception as exc:  # noqa: BLE001 - the grid after it matters more than one part
            log(f"bench: the {name} part failed ({type(exc).__name__}: {exc}); the rest goes on")
            if name == "concurrency":
                continue  # the counts measured before stand
            # recorded as failed, so later leases neither wait for it nor measure it again
            value = {**error_entry(exc), **({"division": COMPILED_DIVISION}
                                            if name == "compiled" else {})}
        result = {**result, name: value}
        write_json_atomic(path, result)
    return path
