"""The variants: what one timed step of each is, built from the preset's :class:`RunConfig`.

kdlib's variants call the training step itself: :func:`kdlib.step.make_trainer` on the variant's
config, then :func:`kdlib.step.run_step` inside :func:`kdlib.step.frozen_teacher` on batches of
:func:`kdlib.data.train_batches`, with the learning rate of :func:`kdlib.schedules.lr_at`, as
:func:`kdlib.train.fit` runs it. The typical pipeline (d) comes from :mod:`kdlib.bench.typical`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kdlib.step  # run_step looked up per call: the step fit() runs, even when patched
from kdlib.bench.measure import Runner, count_flops
from kdlib.bench.typical import (TYPICAL_WORKERS, PILImageDataset, ResNet20, TypicalKDStep,
                                 endless, loader_info, typical_loader)
from kdlib.config import KD_METHODS, RunConfig
from kdlib.data import train_batches
from kdlib.device import pick_device
from kdlib.models import create_model
from kdlib.presets import build_config
from kdlib.schedules import lr_at

PRESET = "quick"  # kd_w4 is the step fit() runs for this preset
KD_BITS = 4
CUDAGRAPHS_MODE = "reduce-overhead"  # torch.compile's mode that replays CUDA graphs
COMPILE_WARMUP_STEPS = 5  # torch.compile compiles forward and backward in the first steps
KDLIB_PIPELINE = "kdlib.data.train_batches on device"
TYPICAL_PIPELINE = f"torch.utils.data.DataLoader over PIL images ({PILImageDataset.__name__})"


@dataclass
class Context:
    """What every variant is built from."""

    cfg: RunConfig  # the preset's config: batch size, seed, hyperparameters, switches
    images: Tensor  # uint8 [N,3,32,32], CPU
    labels: Tensor  # int64 [N], CPU
    images_dev: Tensor
    labels_dev: Tensor
    device: torch.device
    workers: int  # DataLoader workers of the typical pipeline


def make_context(images: Tensor, labels: Tensor, *, preset: str = PRESET, model: str = "resnet20",
                 batch_size: int | None = None, seed: int = 0,
                 device: str | torch.device | None = None,
                 workers: int = TYPICAL_WORKERS) -> Context:
    """The context of ``build_config(preset)`` (its batch size unless ``batch_size``), with
    the images (uint8 [N,3,32,32]) on the CPU and on the device."""
    sized = {} if batch_size is None else {"batch_size": batch_size}
    cfg = build_config(preset, model, overrides={"seed": seed, **sized})
    device = pick_device(device)
    images, labels = images.cpu(), labels.cpu()
    return Context(cfg, images, labels, images.to(device), labels.to(device), device, workers)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    build: Callable[[Context], Runner]
    flops: Callable[[Context, int], float] | None = None  # FLOPs per image of one step
    config: Callable[[RunConfig], RunConfig] | None = None  # kdlib's: its run config


def same_steps(names: list[str], base: RunConfig) -> dict[str, str]:
    """{name: earlier name} for kdlib variants whose run config equals an earlier one's (e.g.
    ``kd_w4_channels_last`` when the preset already trains channels_last): timed once."""
    first: dict[str, str] = {}
    same = {}
    for name in names:
        config = BY_NAME[name].config
        if config is not None:
            key = repr(sorted(config(base).to_dict().items()))
            same_as = first.setdefault(key, name)
            if same_as != name:
                same[name] = same_as
    return same


def variant_config(base: RunConfig, bits: int, kd: bool, switches: dict[str, Any]) -> RunConfig:
    """The preset's config as a run at ``bits`` (direct_kd from a 32-bit teacher if ``kd``)."""
    return base.replace(method="direct_kd" if kd else "individual", w_bits=bits, a_bits=bits,
                        **switches)


# ----------------------------------------------------------------------------- kdlib's step
def _model(cfg: RunConfig, bits: int) -> nn.Module:
    torch.manual_seed(cfg.seed)  # same seed -> same initial weights, as experiments builds them
    return create_model(cfg.model, num_classes=cfg.num_classes, w_bits=bits, a_bits=bits,
                        quantizer=cfg.quantizer, quantize_first_last=cfg.quantize_first_last)


def _fit_batches(images: Tensor, labels: Tensor,
                 cfg: RunConfig) -> Iterator[tuple[float, Tensor, Tensor]]:
    """(fractional epoch, x, y) over endless epochs of train_batches, drawn as fit() draws them."""
    steps = len(labels) // cfg.batch_size
    epoch = 0
    while True:
        batches = train_batches(images, labels, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                channels_last=cfg.channels_last)
        for i, (x, y) in enumerate(batches):
            yield epoch % cfg.epochs + i / steps, x, y
        epoch += 1


def _switches(cfg: RunConfig, teacher_bits: int | None) -> dict[str, Any]:
    return {"precision": cfg.precision, "channels_last": cfg.channels_last, "compile": cfg.compile,
            "cuda_graphs": cfg.cuda_graphs, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
            "teacher_bits": teacher_bits}


def _kdlib_runner(cfg: RunConfig, ctx: Context) -> Runner:
    kd = cfg.method in KD_METHODS
    trainer = kdlib.step.make_trainer(_model(cfg, cfg.w_bits), cfg,
                                      teacher=_model(cfg, 32) if kd else None, device=ctx.device)
    stack = contextlib.ExitStack()
    stack.enter_context(kdlib.step.frozen_teacher(trainer))
    batches = _fit_batches(ctx.images_dev, ctx.labels_dev, cfg)
    stack.callback(batches.close)

    graphed = trainer.graphed

    def step() -> None:
        epoch, x, y = next(batches)
        kdlib.step.run_step(trainer, x, y, lr_at(epoch, cfg))
        if graphed is not None:
            graphed.check_replayed()

    info = {"step": "kdlib.step.run_step inside kdlib.step.frozen_teacher (what fit() runs)",
            "pipeline": KDLIB_PIPELINE, "switches": _switches(cfg, 32 if kd else None),
            "kd_mode": trainer.mode, "run_config": cfg.to_dict()}
    # a compiled step compiles in its first steps; a replayed one runs eager ones, then captures
    warmup_min = (COMPILE_WARMUP_STEPS if cfg.compile
                  else kdlib.step.GRAPH_WARMUP_STEPS + 1 if trainer.graphed is not None else 0)
    return Runner(step, stack.close, info, batch_size=cfg.batch_size, trainer=trainer,
                  warmup_min=warmup_min)


def _kdlib_flops(cfg: RunConfig, ctx: Context, probe: int) -> float:
    """FLOPs per image of one step, counted on a ``probe``-image step of a fresh trainer
    (eager: compiling changes how, not what, is computed)."""
    runner = _kdlib_runner(cfg.replace(compile=False, batch_size=probe), ctx)
    try:
        return count_flops(runner.step) / probe
    finally:
        runner.close()


def _kdlib(name: str, label: str, bits: int, kd: bool, **switches: Any) -> Variant:
    def config(base: RunConfig) -> RunConfig:
        return variant_config(base, bits, kd, switches)

    return Variant(name, label, lambda ctx: _kdlib_runner(config(ctx.cfg), ctx),
                   lambda ctx, probe: _kdlib_flops(config(ctx.cfg), ctx, probe), config)


def _cudagraphs_runner(ctx: Context) -> Runner:
    """fit()'s KD 4-bit step with student and teacher compiled in ``reduce-overhead`` mode:
    Inductor's kernels replayed as CUDA graphs, one launch per graph instead of one per kernel
    (the host-bound step's lever). The same kernels as ``kd_w4_compile``, so the same arithmetic;
    benchmark-only, since ``compile`` in a run's config means the default mode."""
    cfg = variant_config(ctx.cfg, KD_BITS, True, {"compile": False})
    runner = _kdlib_runner(cfg, ctx)
    trainer = runner.trainer
    trainer.forward = torch.compile(trainer.model, mode=CUDAGRAPHS_MODE, dynamic=False)
    teacher = torch.compile(trainer.teacher, mode=CUDAGRAPHS_MODE, dynamic=False)
    # the teacher's logits live in its graph's output memory, which the student's graph may
    # reuse before the loss reads them (the H200 raised "accessing tensor output of CUDAGraphs
    # that has been overwritten" at a logits layer, also with step marks): a copy of its own
    trainer.teacher_forward = lambda x: teacher(x).clone()
    runner.info["switches"] = {**runner.info["switches"], "compile": True}
    runner.info["compile_mode"] = CUDAGRAPHS_MODE
    runner.warmup_min = COMPILE_WARMUP_STEPS
    step = runner.step

    def step_marked() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead
        step()

    runner.step = step_marked
    return runner


# ----------------------------------------------------------------------------- typical step
def _typical_step(cfg: RunConfig, device: torch.device) -> TypicalKDStep:
    torch.manual_seed(cfg.seed)
    student = ResNet20(cfg.num_classes, bits=cfg.w_bits).to(device)
    teacher = ResNet20(cfg.num_classes).to(device)
    return TypicalKDStep(student, teacher, lr=cfg.lr, momentum=cfg.momentum,
                         nesterov=bool(cfg.nesterov and cfg.momentum > 0),
                         weight_decay=cfg.weight_decay, temperature=cfg.kd_temperature,
                         alpha=cfg.kd_alpha)


def _typical_batches(ctx: Context, cfg: RunConfig) -> tuple[Iterator, dict[str, Any], int]:
    """Endless DataLoader batches, its description, and how many batches it prefetches."""
    loader = typical_loader(ctx.images, ctx.labels, cfg.batch_size, workers=ctx.workers,
                            seed=cfg.seed, pin_memory=ctx.device.type == "cuda")
    return endless(loader), loader_info(loader), loader.num_workers * (loader.prefetch_factor or 0)


def _typical_runner(ctx: Context) -> Runner:
    cfg = variant_config(ctx.cfg, KD_BITS, True, {})
    kd_step = _typical_step(cfg, ctx.device)
    batches, loader, in_flight = _typical_batches(ctx, cfg)

    def step() -> None:
        x, y = next(batches)
        kd_step(x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True))

    info = {"step": "kdlib.bench.typical.TypicalKDStep", "pipeline": TYPICAL_PIPELINE,
            "loader": loader, "switches": {"precision": "fp32", "channels_last": False,
                                           "compile": False, "w_bits": KD_BITS, "a_bits": KD_BITS,
                                           "teacher_bits": 32},
            "teacher": "eval, no no_grad (logits detached), weights quantized every step",
            "loss_item_per_step": True, "kd_temperature": cfg.kd_temperature,
            "kd_alpha": cfg.kd_alpha}
    return Runner(step, batches.close, info, batch_size=cfg.batch_size, rewarm=in_flight + 1,
                  trainer=kd_step)


def _typical_flops(ctx: Context, probe: int) -> float:
    kd_step = _typical_step(variant_config(ctx.cfg, KD_BITS, True, {}), ctx.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(probe, 3, 32, 32, generator=gen).to(ctx.device)
    y = torch.randint(0, ctx.cfg.num_classes, (probe,), generator=gen).to(ctx.device)
    return count_flops(lambda: kd_step(x, y)) / probe


# ----------------------------------------------------------------------------- data only
def _data_kdlib(ctx: Context) -> Runner:
    batches = _fit_batches(ctx.images_dev, ctx.labels_dev, ctx.cfg)
    info = {"pipeline": KDLIB_PIPELINE, "switches": {"channels_last": ctx.cfg.channels_last}}
    return Runner(lambda: next(batches), batches.close, info, batch_size=ctx.cfg.batch_size)


def _data_typical(ctx: Context) -> Runner:
    batches, loader, in_flight = _typical_batches(ctx, ctx.cfg)

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)

    info = {"pipeline": TYPICAL_PIPELINE, "loader": loader, "switches": {"channels_last": False}}
    return Runner(step, batches.close, info, batch_size=ctx.cfg.batch_size, rewarm=in_flight + 1)


VARIANTS: tuple[Variant, ...] = (
    _kdlib("fp32", "(a) 32-bit step", 32, kd=False),
    _kdlib("w4a4", "(b) 4-bit step (DoReFa w4a4)", 4, kd=False),
    _kdlib("w1a1", "(b) 1-bit step (DoReFa w1a1)", 1, kd=False),
    _kdlib("kd_w4", "(c) KD 4-bit ← 32-bit, fit()'s step", KD_BITS, kd=True),
    _kdlib("kd_w4_nchw", "(c) in NCHW", KD_BITS, kd=True, channels_last=False),
    _kdlib("kd_w4_channels_last", "(c) in channels_last", KD_BITS, kd=True, channels_last=True),
    _kdlib("kd_w4_bf16", "(c) in the bf16 mode", KD_BITS, kd=True, precision="bf16"),
    _kdlib("kd_w4_compile", "(c) + torch.compile", KD_BITS, kd=True, compile=True),
    _kdlib("kd_w4_bf16_compile", "(c) bf16 mode + torch.compile", KD_BITS, kd=True,
           precision="bf16", compile=True),
    Variant("kd_w4_typical", "(d) KD 4-bit ← 32-bit, typical pipeline", _typical_runner,
            _typical_flops),
    Variant("data_kdlib", "data only: batches of (c)", _data_kdlib),
    Variant("data_typical", "data only: batches of (d)", _data_typical),
)
# timed only on a GPU, in the compiled and graphs parts (kdlib.bench.compiled, .graphs): CUDA
# graphs need CUDA
GPU_VARIANTS: tuple[Variant, ...] = (
    Variant("kd_w4_cudagraphs", "(c) + torch.compile, CUDA graphs (reduce-overhead)",
            _cudagraphs_runner),
    _kdlib("kd_w4_graphs", "(c) replayed as a CUDA graph (cuda_graphs)", KD_BITS, kd=True,
           cuda_graphs=True),
)
BY_NAME = {v.name: v for v in (*VARIANTS, *GPU_VARIANTS)}
