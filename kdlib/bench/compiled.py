"""Whether torch.compile may train a preset's runs on this device: exact levels, and the speed.

A compiled run is only worth its compile time when its runs are long (the `paper` preset's 200
epochs), and only allowed if the quantizers' low-bit arithmetic stays exact
(:func:`kdlib.compile_check.check_levels`, which every compiled run also passes before it
trains). This part of a GPU benchmark records that check, and times compiled KD processes side
by side (as many as the eager ones found worth it, and 8), to set against the eager throughput,
and one process of the step replayed as CUDA graphs (``kd_w4_cudagraphs``: the same compiled
kernels, launched a graph at a time), to see how much of a host-bound step the launches are.
(The eager step replayed as a CUDA graph, eager's arithmetic, is :mod:`kdlib.bench.graphs`'s.)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


from kdlib.compile_check import check_levels, compile_for_check
from kdlib.quant.ste import COMPILED_DIVISION

# compiled processes not done compiling and timing by then count as failed: too slow to pay
# again at every lease (one process compiled in 41 s on the H200: kd_w4_compile's warmup_s in
# results/bench/NVIDIA_H200.json)
SIDE_BY_SIDE_TIMEOUT_S = 180.0
CUDAGRAPHS_TIMEOUT_S = 150.0  # one process: compile, record the graphs, time
# a grid whose runs train this many epochs or more may compile (paper's 200): shorter runs
# (gpu's 2 to 15) would pay the compile again for each run, for seconds of training
LONG_RUN_EPOCHS = 50


def compile_may_pay(preset: str, model: str | None = None) -> bool:
    """Whether ``preset``'s runs are long enough for torch.compile to be worth deciding on."""
    from kdlib.presets import build_config

    return build_config(preset, model).epochs >= LONG_RUN_EPOCHS


def measure_compiled(ctx, jobs: Sequence[int], *, seconds: float, preset: str, model: str,
                     log: Callable[[str], None],
                     compile_fn: Callable[[Callable], Callable] = compile_for_check
                     ) -> dict[str, Any]:
    """The ``compiled`` part of a GPU benchmark: :func:`check_levels`, compiled KD processes
    side by side at each count of ``jobs``, one process replayed as CUDA graphs
    (``{"error": ...}`` for a part that raised)."""
    from kdlib.bench.concurrent import processes_or_error
    from kdlib.bench.measure import error_entry

    log("bench: compiled quantizer levels")
    try:
        levels = check_levels(ctx.device, compile_fn=compile_fn)
    except Exception as exc:  # noqa: BLE001 - recorded: compile then stays off
        levels = error_entry(exc)
    run = dict(seconds=seconds, preset=preset, model=model, log=log)
    side_by_side = processes_or_error(
        ctx, "kd_w4_compile", jobs, timeout=SIDE_BY_SIDE_TIMEOUT_S,
        what=f"{', '.join(map(str, jobs))} compiled KD processes side by side", **run)
    graphs = processes_or_error(ctx, "kd_w4_cudagraphs", (1,), timeout=CUDAGRAPHS_TIMEOUT_S,
                                what="one KD process replayed as CUDA graphs", **run)
    return {"division": COMPILED_DIVISION, "levels": levels, "concurrency": side_by_side,
            "cudagraphs": graphs}


def compile_verdict(result: dict[str, Any], lease_s: float) -> dict[str, Any] | None:
    """Whether a grid of long runs (`paper`) should compile, by the README's rule: only if the
    compiled levels are exact, and the best count of compiled processes trains more images in a
    lease's ``lease_s`` of training, less the compile it pays again at every lease, than the best
    count of eager ones. ``{"pays": bool, "why": str}``; None before a compiled part exists."""
    from kdlib.bench.concurrent import worth_running

    compiled = result.get("compiled")
    if not compiled:
        return None
    if "error" in compiled:
        return {"pays": False, "why": f"the compiled part failed: {compiled['error']}"}
    if compiled.get("division") != COMPILED_DIVISION:
        return {"pays": False, "why": "its compiled part predates compiled graphs dividing the "
                                      "levels in float64: measured again in the spare time of a "
                                      "lease whose grid is done, else at paper's first lease"}
    levels, side = compiled.get("levels", {}), compiled.get("concurrency", {})
    if not levels.get("exact"):
        return {"pays": False, "why": "the compiled levels are not exact"}
    eager = result.get("concurrency") or {}
    if "error" in side or not side.get("by_jobs") or not eager.get("by_jobs"):
        return {"pays": False, "why": "compiled or eager processes side by side not measured"}
    k, e = worth_running(side), worth_running(eager)
    entry, eager_rate = side["by_jobs"][str(k)], eager["by_jobs"][str(e)]["images_per_s"]
    compile_s = entry.get("ready_s")
    if compile_s is None:  # measured before processes timed their start: one process's compile
        compile_s = (result.get("variants", {}).get("kd_w4_compile") or {}).get("warmup_s", lease_s)
    compiled_images = entry["images_per_s"] * max(lease_s - compile_s, 0.0)
    eager_images = eager_rate * lease_s
    return {"pays": compiled_images > eager_images,
            "why": f"{k} compiled processes {entry['images_per_s']:,.0f} img/s after "
                   f"{compile_s:.0f} s "
                   f"to compile: {compiled_images / 1e6:.1f} M images in {lease_s:.0f} s of "
                   f"training; {e} eager ones {eager_rate:,.0f} img/s: {eager_images / 1e6:.1f} M"}
