"""fit()'s step replayed as a CUDA graph (``cuda_graphs``, :class:`kdlib.step.GraphedStep`) on the
device the benchmark runs on: the same bits as eager steps, and the speed.

Three things, about two minutes on a GPU:

* :func:`check_graph_step`: KD 4-bit steps of the preset's config, eager twice and replayed
  once, from the same seed on the same batches, with cuDNN's deterministic algorithms (so
  that eager repeats itself bit for bit: its default weight-gradient kernels sum in a
  run-dependent order); the replayed run's weights, buffers and losses must equal eager's,
  raw bits.
* a ``torch.profiler`` summary of 20 replayed steps (:mod:`kdlib.bench.profile`): with the
  launches gone, whether the GPU's own work now bounds the step;
* ``kd_w4_graphs`` processes side by side (:func:`kdlib.bench.concurrent.concurrent_throughput`),
  the count a grid of replayed runs is worth.

:func:`graphs_verdict` turns both into the rule ``lease go`` follows: a grid's runs replay
their steps when the check is equal and the best count of replaying processes trains more
images a second than the best count of eager ones.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from kdlib.bench.measure import same_bits

GRAPH_JOBS = (1, 2, 4, 8)  # replaying processes side by side
GRAPHS_TIMEOUT_S = 120.0  # a count of processes to start, warm up, capture and time
CHECK_IMAGES = 1024  # random images the check's batches are drawn from
PROFILE_STEPS = 20


@contextlib.contextmanager
def deterministic_cudnn() -> Iterator[None]:
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a
                 if a[k].is_floating_point()), default=0.0)


def check_graph_step(device: str | torch.device, *, steps: int = 8, preset: str = "gpu",
                     model: str | None = None, capture=None) -> dict[str, Any]:
    """``{"equal", "eager_repeatable", "steps", "max_abs_diff"}`` for ``steps`` KD 4-bit steps
    (the first :data:`kdlib.step.GRAPH_WARMUP_STEPS` of them eager in every run).
    ``capture``: how to capture (default: the device's; an emulated one on a CPU, for tests)."""
    from kdlib.data import train_batches
    from kdlib.models import create_model
    from kdlib.presets import build_config
    from kdlib.schedules import lr_at
    from kdlib.step import (GRAPH_WARMUP_STEPS, GraphedStep, capture_for, frozen_teacher,
                            make_trainer, run_step)

    device = torch.device(device)
    capture = capture or capture_for(device)
    if capture is None:
        raise ValueError(f"check_graph_step needs a CUDA device (got {device}) or a capture")
    cfg = build_config(preset, model, overrides={"method": "direct_kd", "w_bits": 4, "a_bits": 4,
                                                 "cuda_graphs": False, "compile": False})
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (CHECK_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, cfg.num_classes, (CHECK_IMAGES,), generator=gen)
    images, labels = images.to(device), labels.to(device)

    def build(bits: int):
        torch.manual_seed(cfg.seed)
        return create_model(cfg.model, num_classes=cfg.num_classes, w_bits=bits, a_bits=bits,
                            quantizer=cfg.quantizer, quantize_first_last=cfg.quantize_first_last)

    def train(graphed: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        trainer = make_trainer(build(4), cfg, teacher=build(32), device=device)
        step = trainer.graphed = GraphedStep(trainer, capture) if graphed else None
        losses = []
        batches = train_batches(images, labels, cfg.batch_size, seed=cfg.seed, epoch=0,
                                channels_last=cfg.channels_last)
        per_epoch = CHECK_IMAGES // cfg.batch_size
        with frozen_teacher(trainer):
            for i, (x, y) in zip(range(steps), batches):
                loss, _, _ = run_step(trainer, x, y, lr_at(i / per_epoch, cfg))
                losses.append(loss.clone())
        if step is not None:
            step.check_replayed()  # eager steps in its place would compare equal
        state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
        return state, [t.cpu() for t in losses]

    if steps <= GRAPH_WARMUP_STEPS:  # all eager: "equal" would compare eager with eager
        raise ValueError(f"steps={steps}: the first {GRAPH_WARMUP_STEPS} steps run eagerly "
                         "before the capture, so none would be replayed")
    if steps > CHECK_IMAGES // cfg.batch_size:
        raise ValueError(f"steps={steps} is more than one epoch of the check's "
                         f"{CHECK_IMAGES} images at batch {cfg.batch_size}")
    with deterministic_cudnn():
        first, first_losses = train(graphed=False)
        second, second_losses = train(graphed=False)
        replayed, replayed_losses = train(graphed=True)

    def same(a, b, la, lb) -> bool:
        return (a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
                and all(same_bits(x, y) for x, y in zip(la, lb)))

    return {"equal": same(first, replayed, first_losses, replayed_losses),
            "eager_repeatable": same(first, second, first_losses, second_losses),
            "steps": steps, "max_abs_diff": _max_abs_diff(first, replayed)}


def measure_graphs(ctx, *, seconds: float, preset: str, model: str,
                   log: Callable[[str], None], jobs: Sequence[int] = GRAPH_JOBS) -> dict[str, Any]:
    """The ``graphs`` part of a GPU benchmark: :func:`check_graph_step`, a profile of the
    replayed step and ``kd_w4_graphs`` processes side by side at each count of ``jobs``
    (``{"error": ...}`` for what raised)."""
    from kdlib.bench.concurrent import processes_or_error
    from kdlib.bench.measure import error_entry
    from kdlib.bench.profile import profile_or_error

    log("bench: the replayed step against eager steps, bit for bit")
    try:
        check = check_graph_step(ctx.device, preset=preset, model=model)
    except Exception as exc:  # noqa: BLE001 - recorded: the grid then stays eager
        check = error_entry(exc)
    profile = profile_or_error(ctx, PROFILE_STEPS, log, variant="kd_w4_graphs")
    side = processes_or_error(
        ctx, "kd_w4_graphs", jobs, seconds=seconds, preset=preset, model=model,
        timeout=GRAPHS_TIMEOUT_S, log=log,
        what=f"{', '.join(map(str, jobs))} KD processes replaying CUDA graphs side by side")
    return {"check": check, "profile": profile, "concurrency": side}


def graphs_verdict(result: dict[str, Any]) -> dict[str, Any] | None:
    """Whether a grid's runs should replay their steps as CUDA graphs on the benchmark's device:
    ``{"use": bool, "why": str}``; None before a graphs part exists."""
    from kdlib.bench.concurrent import worth_running

    graphs = result.get("graphs")
    if not graphs:
        return None
    if "error" in graphs:
        return {"use": False, "why": f"the graphs part failed: {graphs['error']}"}
    check, side = graphs.get("check") or {}, graphs.get("concurrency") or {}
    if "error" in check:
        return {"use": False, "why": f"the check failed: {check['error']}"}
    if not check.get("equal"):
        detail = ("" if check.get("eager_repeatable")
                  else "; eager steps did not repeat themselves either")
        return {"use": False, "why": f"the replayed steps differ from eager ones (at most "
                                     f"{check.get('max_abs_diff', float('nan')):.3g}){detail}"}
    eager = result.get("concurrency") or {}
    if "error" in side or not side.get("by_jobs") or not eager.get("by_jobs"):
        return {"use": False, "why": "replaying or eager processes side by side not measured"}
    k, e = worth_running(side), worth_running(eager)
    rate, eager_rate = (side["by_jobs"][str(k)]["images_per_s"],
                        eager["by_jobs"][str(e)]["images_per_s"])
    return {"use": rate > eager_rate,
            "why": f"{k} replaying processes {rate:,.0f} img/s against {e} eager ones "
                   f"{eager_rate:,.0f} img/s, the same bits"}
