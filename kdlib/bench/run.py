"""One benchmark run: build the variants and ceilings, time them interleaved, count FLOPs, write."""
from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdlib.bench.concurrent import processes_or_error, worth_running
from kdlib.bench.measure import (MATMUL_SIZE, Runner, check_int, load_average, machine_info,
                                 matmul_runner, measure, summarise)
from kdlib.bench.profile import profile_or_error
from kdlib.bench.render import render_markdown
from kdlib.bench.targets import compute_ratios
from kdlib.bench.typical import TYPICAL_WORKERS
from kdlib.bench.variants import BY_NAME, KD_BITS, PRESET, VARIANTS, make_context, same_steps
from kdlib.data import load_cifar100, resolve_data_root
from kdlib.fileio import write_json_atomic

FORMAT = 2
WARMUP_STEPS = 3  # un-timed steps before the windows (DataLoader workers start here)
# processes side by side, measured on a GPU: as many of these as the host's cores allow, each
# process a core and two kept for the parent and the system (on the H200's 16: up to 12)
CONCURRENCY_COUNTS = (1, 2, 4, 8, 12, 16)
CORES_KEPT = 2
COMPILED_JOBS_MAX = 8
CEILING_DTYPES = {"matmul_fp32": torch.float32, "matmul_bf16": torch.bfloat16}


def _check_settings(images: Tensor, names: list[str], batch_size: int, windows: int, steps: int,
                    warmup: int, workers: int, matmul_size: int, flops_probe_batch: int) -> None:
    for value, name in ((batch_size, "batch_size"), (windows, "windows"), (steps, "steps"),
                        (matmul_size, "matmul_size"), (flops_probe_batch, "flops_probe_batch")):
        check_int(value, name)
    check_int(warmup, "warmup", low=0)
    check_int(workers, "workers", low=0)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; accepted: {', '.join(BY_NAME)}")
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(f"images must be uint8 [N,3,32,32], got {images.dtype} "
                         f"{tuple(images.shape)}")
    for value, name in ((batch_size, "batch_size"), (flops_probe_batch, "flops_probe_batch")):
        if len(images) < value:
            raise ValueError(f"{name}={value} is larger than the {len(images)} images given")


def _variant_entry(name: str, times: dict[str, Any], runner: Runner, steps: int) -> dict[str, Any]:
    if "error" in times:
        return {"label": BY_NAME[name].label, "status": "failed", "error": times["error"],
                "info": runner.info}
    wall, cpu = times["wall"], times["cpu"]
    return {"label": BY_NAME[name].label, **summarise(wall, steps, runner.batch_size),
            "cpu_per_wall_windows": [c / w for c, w in zip(cpu, wall)],
            "warmup_s": times["warmup_s"], "info": runner.info}


def _ceiling_entry(times: dict[str, Any], runner: Runner, steps: int) -> dict[str, Any]:
    rates = [runner.flops_per_step * steps / w / 1e9 for w in times["wall"]]
    return {"status": "ok", **runner.info, "gflops": statistics.median(rates),
            "gflops_windows": rates,
            "cpu_per_wall_windows": [c / w for c, w in zip(times["cpu"], times["wall"])]}


def _add_flops(entry: dict[str, Any], per_image: float, batch_size: int,
               ceilings: dict[str, dict[str, Any]]) -> None:
    """FLOPs of the variant's step, and GFLOP/s = FLOPs per step / median step time."""
    per_step = per_image * batch_size
    gflops = per_step / (entry["step_ms"] / 1000.0) / 1e9
    entry.update(flops_per_image=per_image, flops_per_step=per_step, gflops=gflops,
                 of_ceiling={k: gflops / c["gflops"] for k, c in ceilings.items()})


PROFILE_STEPS = 20


def run_benchmark(images: Tensor, labels: Tensor, *, preset: str = PRESET, model: str = "resnet20",
                  batch_size: int | None = None, windows: int = 5, steps: int = 10,
                  warmup: int = WARMUP_STEPS, device: str | torch.device | None = None,
                  variants: list[str] | None = None, workers: int = TYPICAL_WORKERS, seed: int = 0,
                  data_source: str = "", matmul_size: int = MATMUL_SIZE, flops_probe_batch: int = 8,
                  concurrency: Sequence[int] | None = None, concurrency_seconds: float = 10.0,
                  profile_steps: int | None = None, grouped: bool = True,
                  later_parts: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the variants on ``images`` (uint8 [N,3,32,32], CPU) / ``labels``; the result dict.

    Every variant starts from ``build_config(preset)`` (batch size: the preset's unless
    ``batch_size``). ``variants``: names from :data:`VARIANTS` (default all). The fp32 and bf16
    matmul ceilings are always timed, in the same interleaved windows. ``concurrency``: numbers
    of processes to run the KD step side by side (default on CUDA :func:`device_concurrency`
    of the host's cores, none on a CPU, whose cores one run already uses); see
    :mod:`kdlib.bench.concurrent`. On CUDA, with ``kd_w4`` among the variants, the graphs part
    (:func:`graphs_part`), and with ``kd_w4_compile`` the compiled part (:func:`compiled_part`).
    ``profile_steps``: steps of the KD step under
    ``torch.profiler`` (:mod:`kdlib.bench.profile`; default 20 on CUDA, none on a CPU).
    ``grouped``: with ``kd_w4`` among the variants, the grouped-weights part
    (:mod:`kdlib.bench.grouped`). ``later_parts=False``: the variants and the concurrency only,
    the grouped, graphs, compiled and profile parts left to
    :func:`kdlib.lease.decisions.complete_bench`, which a lease gives the time it has left for
    its benchmark. Everything shrinks for tests.
    """
    names = list(variants) if variants is not None else [v.name for v in VARIANTS]
    ctx = make_context(images, labels, preset=preset, model=model, batch_size=batch_size, seed=seed,
                       device=device, workers=workers)
    base, device = ctx.cfg, ctx.device
    _check_settings(images, names, base.batch_size, windows, steps, warmup, workers, matmul_size,
                    flops_probe_batch)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    result: dict[str, Any] = {
        "format": FORMAT,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": {"batch_size": base.batch_size, "windows": windows, "steps": steps,
                     "warmup": warmup, "data": data_source or f"{len(ctx.images)} images",
                     "preset": preset, "model": base.model, "kd_bits": KD_BITS,
                     "typical_workers": workers, "flops_probe_batch": flops_probe_batch,
                     "statistic": "median over windows", "variant_order": names,
                     "schedule": "warm-up of every variant, then round-robin windows (window k of "
                                 "every variant and ceiling before window k+1); un-timed re-warm "
                                 "steps before each later window (DataLoader: its prefetched "
                                 "batches + 1)"},
        "load_average_start": load_average(),
    }
    same = same_steps(names, base)
    timed = [n for n in names if n not in same]
    runners: dict[str, Runner] = {}
    try:
        for name in timed:
            runners[name] = BY_NAME[name].build(ctx)
        for name, dtype in CEILING_DTYPES.items():
            runners[name] = matmul_runner(device, dtype, matmul_size)
        times = measure(runners, windows=windows, steps=steps, warmup=warmup, device=device,
                        log=log)
    finally:
        for runner in runners.values():
            runner.close()
    ceilings = {n: _ceiling_entry(times[n], runners[n], steps) for n in CEILING_DTYPES}
    measured = {n: _variant_entry(n, times[n], runners[n], steps) for n in timed}
    del runners
    for name, entry in measured.items():
        if BY_NAME[name].flops is not None and entry["status"] == "ok":
            _add_flops(entry, BY_NAME[name].flops(ctx, flops_probe_batch), base.batch_size,
                       ceilings)
    result["variants"] = {n: measured[n] if n in measured else
                          {**measured[same[n]], "label": BY_NAME[n].label, "same_as": same[n]}
                          for n in names}
    result["ceilings"] = ceilings
    result["ratios"] = compute_ratios(result["variants"], ceilings)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if concurrency is None and device.type == "cuda":
        concurrency = device_concurrency(result["machine"].get("usable_cores"))
    if concurrency:  # the variants' numbers stand without it
        result["concurrency"] = processes_or_error(
            ctx, "kd_w4", concurrency, seconds=concurrency_seconds, preset=preset, model=model,
            what=f"{', '.join(map(str, concurrency))} concurrent KD processes", log=log,
            warmup=max(warmup, 1))
    if not later_parts:
        result["load_average_end"] = load_average()
        return result
    if grouped and "kd_w4" in names:
        result["grouped"] = grouped_part(ctx, result["settings"], log)
    if device.type == "cuda" and "kd_w4" in names:
        result["graphs"] = graphs_part(result, ctx, preset=preset, model=model, log=log)
    if device.type == "cuda" and "kd_w4_compile" in names:
        result["compiled"] = compiled_part(result, ctx, preset=preset, model=model, log=log)
    if profile_steps is None:
        profile_steps = PROFILE_STEPS if device.type == "cuda" else 0
    if profile_steps:
        result["profile"] = profile_or_error(ctx, profile_steps, log)
    result["load_average_end"] = load_average()
    return result


def device_concurrency(cores: int | None) -> tuple[int, ...]:
    """The numbers of processes side by side to measure on a GPU whose host has ``cores``."""
    room = max((cores or 1) - CORES_KEPT, 1)
    return tuple(k for k in CONCURRENCY_COUNTS if k <= room) or (1,)


def add_concurrency(result: dict[str, Any], counts: Sequence[int], ctx, *, preset: str,
                    model: str, log: Callable[[str], None]) -> dict[str, Any]:
    """``result``'s concurrency with ``counts`` measured now and merged in (each new entry dated:
    the others came from an earlier machine of the same kind). The seconds per count are the
    earlier measurement's."""
    old = result.get("concurrency") or {}
    new = processes_or_error(ctx, "kd_w4", counts, seconds=old.get("seconds", 10.0),
                             preset=preset, model=model, log=log,
                             what=f"{', '.join(map(str, counts))} concurrent KD processes, added")
    if "error" in new:  # the earlier counts stand, the failure is noted
        return {**old, "added_error": new["error"]}
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    by_jobs = {**old.get("by_jobs", {}),
               **{k: {**entry, "date": date} for k, entry in new["by_jobs"].items()}}
    by_jobs = dict(sorted(by_jobs.items(), key=lambda item: int(item[0])))
    old = {k: v for k, v in old.items() if k != "best_jobs"}  # stored before it was derived
    return {**old, "variant": old.get("variant", new["variant"]),
            "seconds": old.get("seconds", new["seconds"]), "by_jobs": by_jobs}


def compiled_part(result: dict[str, Any], ctx, *, preset: str, model: str,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """:func:`kdlib.bench.compiled.measure_compiled` at the eager step's worth-it process count
    and at :data:`COMPILED_JOBS_MAX` (no more: each process compiles at once, on the same
    cores; a compiled step leans less on the host, so more of them may pay)."""
    from kdlib.bench.compiled import measure_compiled  # lazy: torch.compile

    concurrency = result.get("concurrency") or {}
    counts = sorted({min(worth_running(concurrency), COMPILED_JOBS_MAX), COMPILED_JOBS_MAX})
    return measure_compiled(ctx, counts,
                            seconds=concurrency.get("seconds", 10.0), preset=preset, model=model,
                            log=log)


def graphs_part(result: dict[str, Any], ctx, *, preset: str, model: str,
                log: Callable[[str], None]) -> dict[str, Any]:
    """:func:`kdlib.bench.graphs.measure_graphs`, as long a window per count as the eager
    processes side by side had."""
    from kdlib.bench.graphs import measure_graphs

    seconds = (result.get("concurrency") or {}).get("seconds", 10.0)
    return measure_graphs(ctx, seconds=seconds, preset=preset, model=model, log=log)


def grouped_part(ctx, settings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """:func:`kdlib.bench.grouped.measure_grouped` with the benchmark's windows and steps."""
    from kdlib.bench.grouped import measure_grouped

    return measure_grouped(ctx, windows=settings.get("windows", 5), steps=settings.get("steps", 10),
                           warmup=settings.get("warmup", WARMUP_STEPS), log=log)


def bench_file_name(result: dict[str, Any]) -> str:
    """``<gpu>.json`` for a GPU benchmark (the card decides), ``<host>-<processor>.json`` for a
    CPU one: machines of one host name (every VM here is ``vm``) keep one file each instead of
    overwriting the last one's."""
    machine = result["machine"]
    if machine.get("gpu"):
        return f"{_safe_name(machine['gpu'])}.json"
    cpu = machine.get("cpu_model")
    return f"{_safe_name(machine['host'])}{'-' + _safe_name(cpu) if cpu else ''}.json"


def _safe_name(text: str) -> str:
    """``text`` with what a file name should not hold as ``_``, runs of them as one."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return "_".join(part for part in safe.split("_") if part) or "host"


def main(args: argparse.Namespace) -> int:
    """``python -m kdlib bench``: measure, write ``<out>/`` :func:`bench_file_name`, print the
    table."""
    windows = check_int(getattr(args, "windows", 5), "windows")
    steps = check_int(getattr(args, "steps", 10), "steps")
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None:
        check_int(batch_size, "batch_size")
    warmup = getattr(args, "warmup", None)
    root = resolve_data_root(getattr(args, "data_dir", None))
    images, labels = load_cifar100(root, train=True)
    result = run_benchmark(
        images, labels, batch_size=batch_size, windows=windows, steps=steps,
        warmup=WARMUP_STEPS if warmup is None else warmup,
        device=getattr(args, "device", None) or None, variants=getattr(args, "variants", None),
        data_source=f"CIFAR-100 training set, {len(images)} images",
        matmul_size=getattr(args, "matmul_size", None) or MATMUL_SIZE)
    result["settings"]["data_root"] = str(root)
    out = Path(getattr(args, "out", None) or "results/bench")
    path = out / bench_file_name(result)
    write_json_atomic(path, result)
    print(render_markdown(result))
    print(f"\nwritten: {path}", file=sys.stderr)
    return 0
