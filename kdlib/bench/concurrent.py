"""k training processes at once on one device: does running runs side by side pay?

A ResNet-20 step at batch 128 is too small to fill a large GPU: kernel launches, not
arithmetic, bound it. Several runs at once overlap their launches. This measures the total
images/s of ``k`` processes, each running the same variant's step (the real training step),
all timed over the same window (they start together at a barrier), for each ``k`` asked for.
"""
from __future__ import annotations

import math
import queue as queue_module
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.multiprocessing as torch_mp
from torch import Tensor

from kdlib.device import sync

CONCURRENCY_IMAGES = 10_240  # images each concurrent process draws its batches from
CHECK_EVERY = 10  # steps between clock reads (each read synchronises the device)
# twice the processes must add at least 10% throughput to be worth it (k times: 1.1^log2 k):
# more processes side by side make each run slower, which a lease's deadline pays for in runs
# that no longer fit (on the H200, 12 processes ran 10% more images than 4, each at 0.37x)
GAIN_PER_DOUBLING = 1.10


def _worker(variant: str, images: Tensor, labels: Tensor, preset: str, model: str, device: str,
            warmup: int, seconds: float, barrier, queue) -> None:
    from kdlib.bench.variants import BY_NAME, make_context  # in the spawned process

    try:
        started = time.perf_counter()
        torch.set_num_threads(1)
        ctx = make_context(images, labels, preset=preset, model=model, device=device, workers=0)
        runner = BY_NAME[variant].build(ctx)
        for _ in range(max(warmup, runner.warmup_min)):
            runner.step()
        sync(ctx.device)
        ready_s = time.perf_counter() - started  # built and warmed up: compiled, if it compiles
        barrier.wait()
        start, steps = time.perf_counter(), 0
        while True:
            for _ in range(CHECK_EVERY):
                runner.step()
            steps += CHECK_EVERY
            sync(ctx.device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        runner.close()
        queue.put(("ok", steps * runner.batch_size / elapsed,
                   {"ready_s": ready_s, **_graph_notes(runner)}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        barrier.abort()
        queue.put(("error", f"{type(exc).__name__}: {exc}", {}))


def _graph_notes(runner) -> dict[str, int]:
    """For a step compiled to replay CUDA graphs: how many compiled graphs Inductor ran without
    them (say, for a mutated input), so a rate no faster than compiled can be told apart."""
    if "compile_mode" not in runner.info:
        return {}
    from torch._dynamo.utils import counters

    return {"cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def concurrent_throughput(images: Tensor, labels: Tensor, *, jobs: Sequence[int] = (1, 2, 4),
                          variant: str = "kd_w4", preset: str = "quick", model: str = "resnet20",
                          device: str | torch.device = "cpu", warmup: int = 3,
                          seconds: float = 10.0, timeout: float = 300.0) -> dict[str, Any]:
    """``{"variant", "seconds", "by_jobs": {k: {"images_per_s", "per_process", "ready_s", ...}}}``:
    for each k, k spawned processes each run ``variant``'s step for ``seconds`` after warming
    up; images/s is the sum over the processes, ``ready_s`` the slowest one's build and warm-up.
    How many are worth running is :func:`worth_running`'s, computed when read."""
    context = torch_mp.get_context("spawn")  # CUDA cannot be forked
    by_jobs: dict[str, dict[str, Any]] = {}
    for k in jobs:
        barrier, queue = context.Barrier(k), context.Queue()
        procs = [context.Process(target=_worker,
                                 args=(variant, images, labels, preset, model, str(device),
                                       warmup, seconds, barrier, queue))
                 for _ in range(k)]
        for p in procs:
            p.start()
        results = []
        try:
            for _ in procs:
                results.append(queue.get(timeout=timeout))
        except queue_module.Empty:
            raise RuntimeError(f"{k} concurrent {variant} processes: no result within "
                               f"{timeout:g} s") from None
        finally:  # all answered: a shared 30 s to exit; else none is waited for
            ends = time.monotonic() + (30.0 if len(results) == len(procs) else 0.0)
            for p in procs:
                p.join(timeout=max(ends - time.monotonic(), 0.0))
                if p.is_alive():
                    p.kill()
        errors = [detail for status, detail, _ in results if status != "ok"]
        if errors:
            raise RuntimeError(f"{k} concurrent {variant} processes failed: {errors[0]}")
        rates = [rate for _, rate, _ in results]
        notes: dict[str, float] = {}
        for _, _, note in results:  # the worst process's: its start, its graphs run without
            for key, value in note.items():
                notes[key] = max(notes.get(key, value), value)
        by_jobs[str(k)] = {"images_per_s": sum(rates), "per_process": rates, **notes}
    return {"variant": variant, "seconds": seconds, "by_jobs": by_jobs}


def processes_or_error(ctx, variant: str, counts: Sequence[int], *, seconds: float, preset: str,
                       model: str, what: str, log, timeout: float = 300.0,
                       warmup: int = 1) -> dict[str, Any]:
    """:func:`concurrent_throughput` of ``variant`` at ``counts`` on a benchmark context's first
    :data:`CONCURRENCY_IMAGES` images, or ``{"error": ...}``: a benchmark part records a
    failure and goes on."""
    from kdlib.bench.measure import error_entry

    log(f"bench: {what}")
    try:
        return concurrent_throughput(
            ctx.images[:CONCURRENCY_IMAGES], ctx.labels[:CONCURRENCY_IMAGES], jobs=tuple(counts),
            variant=variant, preset=preset, model=model, device=ctx.device, seconds=seconds,
            warmup=warmup, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - recorded
        log(f"bench: {what}: failed ({error_entry(exc)['error']})")
        return error_entry(exc)


def best_jobs(by_jobs: dict[str, dict[str, Any]]) -> int:
    """The most processes that add at least :data:`GAIN_PER_DOUBLING` per doubling over the
    best fewer processes did (a count that fails is skipped, a later one may still pay)."""
    best_k, best_rate = None, 0.0
    for k, entry in sorted(by_jobs.items(), key=lambda item: int(item[0])):
        if best_k is None or entry["images_per_s"] >= (
                GAIN_PER_DOUBLING ** math.log2(int(k) / best_k) * best_rate):
            best_k, best_rate = int(k), entry["images_per_s"]
    return best_k or 1


def worth_running(concurrency: dict[str, Any] | None) -> int:
    """How many processes side by side a benchmark's ``concurrency`` part is worth, by today's
    rule (:func:`best_jobs` over its counts, not the number stored when it was measured)."""
    by_jobs = (concurrency or {}).get("by_jobs")
    return best_jobs(by_jobs) if by_jobs else 1
