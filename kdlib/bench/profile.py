"""What bounds one training step: a ``torch.profiler`` trace of a few steps, summarised.

The benchmark says how fast a step is; this says why. Over ``steps`` steps after warm-up it
counts the kernel launches the host issues, the time the device spends in kernels, and the
host's wall time. A device busy for a small fraction of the wall time, with the host thread
busy all along, is bound by launching (Python and the CUDA runtime), not by arithmetic or
memory: fewer, larger kernels (torch.compile, CUDA graphs) or more runs side by side help
there, faster kernels do not. On a CPU there is no device time: the top operators by host
time are reported.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from kdlib.device import sync

# a CUDA graph's replay is one launch (kdlib.step.GraphedStep), however many kernels it holds
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                 "cudaGraphLaunch", "cuGraphLaunch")
HOST_BOUND_BELOW = 0.5  # device busy under half the wall time: the host is what the step waits on
TOP = 8


def _self_device_us(event: Any) -> float:
    # torch >= 2.4 names it self_device_time_total; older ones self_cuda_time_total
    return float(getattr(event, "self_device_time_total", None)
                 or getattr(event, "self_cuda_time_total", 0.0) or 0.0)


def _is_device_event(event: Any) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def device_kernels(events) -> list[Any]:
    """The events of kernels the device ran. Not a ``record_function`` range's device-side
    copy (``is_user_annotation``: "Optimizer.step#SGD.step" spans the update's kernels, which
    are counted themselves), as torch's own profiler table leaves them out."""
    return [e for e in events if _is_device_event(e) and _self_device_us(e) > 0
            and not getattr(e, "is_user_annotation", False)]


def profile_runner(step, device: torch.device, *, steps: int = 20,
                   warmup: int = 3) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step`` (one training step each) on ``device``."""
    for _ in range(warmup):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        cpu_start = time.process_time()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in LAUNCH_EVENTS)
    kernels = device_kernels(events)
    device_us = sum(_self_device_us(e) for e in kernels)
    wall_ms = 1000.0 * wall / steps
    out: dict[str, Any] = {"steps": steps, "wall_ms_per_step": wall_ms,
                           "host_cpu_per_wall": cpu / wall if wall > 0 else None,
                           "kernel_launches_per_step": launches / steps}
    if device.type == "cuda":
        busy_ms = device_us / 1000.0 / steps
        out.update(device_busy_ms_per_step=busy_ms, device_busy_fraction=busy_ms / wall_ms,
                   bound="host (kernel launches)" if busy_ms / wall_ms < HOST_BOUND_BELOW
                   else "device (kernels)")
        ranked = sorted(kernels, key=_self_device_us, reverse=True)[:TOP]
        out["top"] = [{"name": e.key[:120], "ms_per_step": _self_device_us(e) / 1000.0 / steps,
                       "calls_per_step": e.count / steps} for e in ranked]
    else:
        ranked = sorted((e for e in events if e.self_cpu_time_total > 0),
                        key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
        out["bound"] = "host (no device)"
        out["top"] = [{"name": e.key[:120], "ms_per_step": e.self_cpu_time_total / 1000.0 / steps,
                       "calls_per_step": e.count / steps} for e in ranked]
    return out


def profile_variant(ctx, variant: str = "kd_w4", *, steps: int = 20,
                    warmup: int = 3) -> dict[str, Any]:
    """:func:`profile_runner` on one benchmark variant's step (built from ``ctx``)."""
    from kdlib.bench.variants import BY_NAME

    runner = BY_NAME[variant].build(ctx)
    try:
        result = profile_runner(runner.step, ctx.device, steps=steps,
                                warmup=max(warmup, runner.warmup_min))
    finally:
        runner.close()
    # profiled since its DoReFa weights were quantized together (kdlib.quant.grouped)
    return {"variant": variant, "batch_size": runner.batch_size, "grouped_weights": True, **result}


def profile_or_error(ctx, steps: int, log, variant: str = "kd_w4") -> dict[str, Any]:
    """:func:`profile_variant`, or ``{"error": ...}``: the timings stand without it."""
    from kdlib.bench.measure import error_entry

    log(f"bench: profiling {steps} {variant} steps")
    try:
        return profile_variant(ctx, variant, steps=steps)
    except Exception as exc:  # noqa: BLE001 - recorded
        log(f"bench: the profile failed ({error_entry(exc)['error']})")
        return error_entry(exc)
