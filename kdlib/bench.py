"""Training throughput: kdlib's steps against a typical research pipeline, side by side.

``python -m kdlib bench`` (``make bench``) times, in one process, on real CIFAR-100 training
batches (batch 128, after warm-up; median of ``windows`` timed windows of ``steps`` steps):

========================  ========================================================================
variant                   one training step
========================  ========================================================================
``fp32``         (a)      32-bit ResNet-20, CE, SGD (momentum 0.9, Nesterov, wd 5e-4) step
``w4a4``         (b)      the same at 4-bit DoReFa weights and activations
``w1a1``         (b)      the same at 1 bit
``kd_w4``        (c)      4-bit student distilled from a 32-bit teacher *as kdlib.train does it*:
                          teacher in ``eval()`` under ``torch.inference_mode()`` with
                          :func:`~kdlib.quant.freeze_quantized_weights`, :func:`~kdlib.losses.kd_loss`,
                          metrics accumulated on the device (no host sync per step)
``kd_w4_typical`` (d)     the same KD step *as typical public research code does it*: a
                          ``torch.utils.data.DataLoader`` (2 workers) over a torchvision-style
                          dataset of PIL images (RandomCrop(32, padding=4), RandomHorizontalFlip,
                          ToTensor, Normalize), NCHW float32 eager, teacher in ``eval()`` but
                          *without* ``no_grad`` (its logits ``.detach()``-ed), weights quantized
                          afresh every step (no freeze), KL as
                          ``kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') * T^2``, and a
                          ``loss.item()`` per step for the running-loss meter
``data_kdlib``            only the batches of (c), no model: what the data pipeline delivers
``data_typical``          only the batches of (d) (DataLoader, PIL, 2 workers), no model
``kd_w4_bf16``            (CUDA only) (c) under bf16 autocast
``kd_w4_compile``         (CUDA only) (c) with ``torch.compile`` of student and teacher
``kd_w4_bf16_compile``    (CUDA only) both
========================  ========================================================================

Every variant's time includes getting its batch: kdlib's variants draw from
:func:`kdlib.data.train_batches` over uint8 tensors already on the device (shuffle, crop,
flip and normalise as batched tensor ops); the typical one from its DataLoader (then ``.to``).
The models are the same kdlib models in every variant, so (c)/(d) measures the pipeline and the
step's conventions, not two different quantizer implementations. With a 32-bit teacher,
freezing the teacher's quantized weights changes nothing (there is nothing to quantize); it
matters for teacher-assistant links whose teacher is itself quantized.

The variants are built first, all warmed up, and then timed in interleaved rounds (window k of
every variant before window k+1), so that a change of load on a shared machine hits every
variant alike; the process's CPU time per wall second of each window is recorded too (about the
number of busy threads; lower means the process was waiting or crowded out).

Ratios (all from the median step times of the same run): (c)/(d) speed-up (target >= 3x),
quantization overhead 4-bit/32-bit and 1-bit/32-bit step time (target <= 1.3x), KD overhead
(c)/(b, 4-bit) step time (target <= 1.4x), and, without a target, the data pipelines alone
(typical / kdlib time per batch). Achieved GFLOP/s of (a): the FLOPs of one
forward + backward of the 32-bit ResNet-20 (counted with ``torch.utils.flop_counter``: conv /
matmul FLOPs only, BatchNorm, ReLU, the loss and the optimizer are not counted) divided by its
median step time, next to a float32 matmul ceiling measured in the same run.

The result goes to ``<out>/<hostname>.json`` (written atomically), and a markdown table to
stdout; :func:`render_markdown` makes the README's table from such a file.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.config import RunConfig

__all__ = [
    "BATCH_SIZE", "WARMUP_STEPS", "TYPICAL_WORKERS", "VARIANTS", "TARGETS", "INFO_RATIOS",
    "PILImageDataset", "typical_transform", "typical_loader",
    "machine_info", "count_train_flops", "matmul_ceiling", "time_window", "measure",
    "compute_ratios",
    "run_benchmark", "render_markdown", "main",
]

FORMAT = 1
BATCH_SIZE = 128
WARMUP_STEPS = 3  # un-timed steps before the windows (DataLoader workers start here)
COMPILE_WARMUP_STEPS = 3  # at least this many for torch.compile variants (compilation)
TYPICAL_WORKERS = 2
MODEL = "resnet20"
KD_BITS = 4
MATMUL_SIZE = 2048
MATMUL_REPS = 7
_CFG = RunConfig()  # optimiser and KD hyperparameters: the library defaults
KD_TEMPERATURE = _CFG.kd_temperature
KD_ALPHA = _CFG.kd_alpha
SKIPPED_NO_CUDA = "skipped: no CUDA"


# ============================================================================ typical pipeline
def typical_transform():
    """The torchvision transform of typical CIFAR training code, with CIFAR-100's mean/std."""
    from torchvision import transforms as T

    from kdlib.data import CIFAR100_MEAN, CIFAR100_STD

    return T.Compose([
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])


class PILImageDataset(torch.utils.data.Dataset):
    """A torchvision-CIFAR-style dataset built in memory from uint8 ``[N,3,32,32]`` images.

    Like ``torchvision.datasets.CIFAR100`` it keeps an ``[N,32,32,3]`` uint8 numpy array and a
    list of int targets, and ``__getitem__`` makes a PIL image and runs ``transform`` on it.
    (``torchvision.datasets.CIFAR100`` itself is not used: its md5 check refuses valid copies
    whose bytes differ from the official archive.)
    """

    def __init__(self, images_u8: Tensor, labels: Tensor, transform=None):
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
            raise ValueError(f"images_u8 must be uint8 [N,3,H,W], got {images_u8.dtype} "
                             f"{tuple(images_u8.shape)}")
        if len(labels) != len(images_u8):
            raise ValueError(f"{len(labels)} labels for {len(images_u8)} images")
        self.data = np.ascontiguousarray(images_u8.cpu().permute(0, 2, 3, 1).numpy())
        self.targets = [int(t) for t in labels.cpu().tolist()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def typical_loader(images_u8: Tensor, labels: Tensor, batch_size: int = BATCH_SIZE, *,
                   workers: int = TYPICAL_WORKERS, seed: int = 0,
                   pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """``DataLoader(PILImageDataset(..., typical_transform()), shuffle=True, num_workers=workers)``."""
    dataset = PILImageDataset(images_u8, labels, typical_transform())
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))


def _loader_info(loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    transform = loader.dataset.transform
    steps = getattr(transform, "transforms", [transform])
    return {"class": f"{type(loader).__module__}.{type(loader).__qualname__}",
            "dataset": type(loader.dataset).__name__, "num_workers": loader.num_workers,
            "batch_size": loader.batch_size, "pin_memory": loader.pin_memory,
            "prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers,
            "transforms": [repr(t) for t in steps]}


def _endless(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:  # a new epoch (and new workers, as in typical code) whenever one ends
        yield from loader


# ============================================================================ kdlib pipeline
def _device_batches(images: Tensor, labels: Tensor, batch_size: int, seed: int) -> Iterator:
    from kdlib.data import train_batches

    epoch = 0
    while True:
        yield from train_batches(images, labels, batch_size, seed=seed, epoch=epoch)
        epoch += 1


# ============================================================================ the steps
@dataclass
class _Context:
    images: Tensor  # uint8 [N,3,32,32], CPU
    labels: Tensor  # int64 [N], CPU
    images_dev: Tensor
    labels_dev: Tensor
    device: torch.device
    batch_size: int
    seed: int
    workers: int


@dataclass
class _Runner:
    step: Callable[[], None]
    close: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)
    warmup_min: int = 0  # at least this many warm-up steps (torch.compile)
    rewarm: int = 1  # un-timed steps before each later window (see measure)
    batch_size: int = BATCH_SIZE


def _model(ctx: _Context, bits: int) -> nn.Module:
    from kdlib.models import create_model

    torch.manual_seed(ctx.seed)
    return create_model(MODEL, w_bits=bits, a_bits=bits).to(ctx.device)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=_CFG.lr, momentum=_CFG.momentum,
                           nesterov=bool(_CFG.nesterov and _CFG.momentum > 0),
                           weight_decay=_CFG.weight_decay)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_step(bits: int) -> Callable[[_Context], _Runner]:
    def build(ctx: _Context) -> _Runner:
        from kdlib.losses import ce_loss

        model = _model(ctx, bits).train()
        opt = _optimizer(model)
        batches = _device_batches(ctx.images_dev, ctx.labels_dev, ctx.batch_size, ctx.seed)
        loss_sum = torch.zeros((), device=ctx.device)
        correct = torch.zeros((), dtype=torch.int64, device=ctx.device)

        def step() -> None:
            x, y = next(batches)
            logits = model(x)
            loss = ce_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # what fit() accumulates per step, on the device
                loss_sum.add_(loss.detach())
                correct.add_((logits.detach().argmax(dim=1) == y).sum())

        return _Runner(step, batches.close, {"pipeline": "kdlib.data.train_batches on device",
                                             "w_bits": bits, "a_bits": bits},
                       batch_size=ctx.batch_size)
    return build


def _kd_step(bf16: bool = False, compile: bool = False) -> Callable[[_Context], _Runner]:
    """(c): the KD step of kdlib.train.fit (kd_mode='hinton')."""
    def build(ctx: _Context) -> _Runner:
        from kdlib.losses import kd_loss
        from kdlib.quant import freeze_quantized_weights, unfreeze_quantized_weights

        student = _model(ctx, KD_BITS).train()
        teacher = _model(ctx, 32).eval()
        freeze_quantized_weights(teacher)
        s_fwd = torch.compile(student) if compile else student
        t_fwd = torch.compile(teacher) if compile else teacher
        opt = _optimizer(student)
        batches = _device_batches(ctx.images_dev, ctx.labels_dev, ctx.batch_size, ctx.seed)
        loss_sum = torch.zeros((), device=ctx.device)
        correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
        autocast = dict(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=bf16)

        def step() -> None:
            x, y = next(batches)
            with torch.inference_mode(), torch.autocast(**autocast):
                t_logits = t_fwd(x)
            with torch.autocast(**autocast):
                logits = s_fwd(x)
            loss = kd_loss(logits, t_logits, y, KD_TEMPERATURE, KD_ALPHA)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                loss_sum.add_(loss.detach())
                correct.add_((logits.detach().argmax(dim=1) == y).sum())

        def close() -> None:
            batches.close()
            unfreeze_quantized_weights(teacher)

        info = {"pipeline": "kdlib.data.train_batches on device", "student_bits": KD_BITS,
                "teacher_bits": 32, "teacher": "eval, inference_mode, freeze_quantized_weights",
                "loss": "kdlib.losses.kd_loss", "bf16": bf16, "compile": compile,
                "kd_temperature": KD_TEMPERATURE, "kd_alpha": KD_ALPHA}
        return _Runner(step, close, info, warmup_min=COMPILE_WARMUP_STEPS if compile else 0,
                       batch_size=ctx.batch_size)
    return build


def _typical_kd_step(ctx: _Context) -> _Runner:
    """(d): the same KD step the way typical public research code writes it."""
    student = _model(ctx, KD_BITS).train()
    teacher = _model(ctx, 32)
    teacher.eval()  # eval() yes, but no torch.no_grad(): the forward records an autograd graph
    opt = _optimizer(student)
    loader = typical_loader(ctx.images, ctx.labels, ctx.batch_size, workers=ctx.workers,
                            seed=ctx.seed, pin_memory=ctx.device.type == "cuda")
    batches = _endless(loader)
    t = KD_TEMPERATURE
    meter = {"sum": 0.0, "n": 0}  # the AverageMeter of typical training loops

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        t_logits = teacher(x).detach()
        logits = student(x)
        ce = F.cross_entropy(logits, y)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(t_logits / t, dim=1),
                      reduction="batchmean") * t * t
        loss = (1.0 - KD_ALPHA) * ce + KD_ALPHA * kd
        opt.zero_grad()
        loss.backward()
        opt.step()
        meter["sum"] += loss.item() * x.size(0)  # one host sync per step
        meter["n"] += x.size(0)

    info = {"pipeline": "torch.utils.data.DataLoader over PIL images", "loader": _loader_info(loader),
            "student_bits": KD_BITS, "teacher_bits": 32,
            "teacher": "eval, no no_grad (logits detached), weights not frozen",
            "loss": "F.kl_div(log_softmax(s/T), softmax(t/T), 'batchmean')*T^2 + CE",
            "loss_item_per_step": True, "kd_temperature": KD_TEMPERATURE, "kd_alpha": KD_ALPHA}
    in_flight = loader.num_workers * (loader.prefetch_factor or 0)  # batches prefetched at most
    return _Runner(step, batches.close, info, rewarm=in_flight + 1, batch_size=ctx.batch_size)


def _data_only(typical: bool) -> Callable[[_Context], _Runner]:
    """Only the batches of (c) or (d), no model: what the data pipeline alone can deliver."""
    def build(ctx: _Context) -> _Runner:
        if typical:
            loader = typical_loader(ctx.images, ctx.labels, ctx.batch_size, workers=ctx.workers,
                                    seed=ctx.seed, pin_memory=ctx.device.type == "cuda")
            batches = _endless(loader)

            def step() -> None:
                x, y = next(batches)
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)

            in_flight = loader.num_workers * (loader.prefetch_factor or 0)
            return _Runner(step, batches.close, {"pipeline": "torch.utils.data.DataLoader over PIL "
                                                 "images", "loader": _loader_info(loader)},
                           rewarm=in_flight + 1, batch_size=ctx.batch_size)
        batches = _device_batches(ctx.images_dev, ctx.labels_dev, ctx.batch_size, ctx.seed)
        return _Runner(lambda: next(batches), batches.close,
                       {"pipeline": "kdlib.data.train_batches on device"}, batch_size=ctx.batch_size)
    return build


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    build: Callable[[_Context], _Runner]
    cuda_only: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", "(a) 32-bit step", _plain_step(32)),
    Variant("w4a4", "(b) 4-bit step (DoReFa w4a4)", _plain_step(4)),
    Variant("w1a1", "(b) 1-bit step (DoReFa w1a1)", _plain_step(1)),
    Variant("kd_w4", "(c) KD 4-bit ← 32-bit, kdlib", _kd_step()),
    Variant("kd_w4_typical", "(d) KD 4-bit ← 32-bit, typical pipeline", _typical_kd_step),
    Variant("data_kdlib", "data only: batches of (c)", _data_only(typical=False)),
    Variant("data_typical", "data only: batches of (d)", _data_only(typical=True)),
    Variant("kd_w4_bf16", "(c) + bf16 autocast", _kd_step(bf16=True), cuda_only=True),
    Variant("kd_w4_compile", "(c) + torch.compile", _kd_step(compile=True), cuda_only=True),
    Variant("kd_w4_bf16_compile", "(c) + bf16 + torch.compile", _kd_step(bf16=True, compile=True),
            cuda_only=True),
)
_BY_NAME = {v.name: v for v in VARIANTS}

# name -> (what, numerator variant, denominator variant, comparison, target). Every value is a
# ratio of median step times (numerator / denominator).
TARGETS: dict[str, tuple[str, str, str, str, float]] = {
    "kd_speedup_vs_typical": ("KD step speed-up, kdlib (c) vs typical pipeline (d)",
                              "kd_w4_typical", "kd_w4", ">=", 3.0),
    "quant_overhead_w4": ("quantization overhead, 4-bit / 32-bit step time", "w4a4", "fp32", "<=", 1.3),
    "quant_overhead_w1": ("quantization overhead, 1-bit / 32-bit step time", "w1a1", "fp32", "<=", 1.3),
    "kd_overhead_w4": ("KD overhead, KD 4-bit (c) / plain 4-bit step time", "kd_w4", "w4a4", "<=", 1.4),
}
# Informational ratios (no target), same definition.
INFO_RATIOS: dict[str, tuple[str, str, str]] = {
    "data_speedup_vs_typical": ("data pipeline alone, kdlib vs typical (time per batch, typical / "
                                "kdlib; it bounds (c)/(d) where the model step is short, e.g. on a GPU)",
                                "data_typical", "data_kdlib"),
}


# ============================================================================ measuring
def time_window(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """Run ``steps`` steps; (wall seconds, CPU seconds of this process) they took."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(runners: dict[str, _Runner], *, windows: int, steps: int, warmup: int,
            device: torch.device, log: Callable[[str], None] = lambda msg: None
            ) -> dict[str, dict[str, list[float]]]:
    """Time every runner: warm-up, then ``windows`` rounds of one window per runner.

    Windows are interleaved (round-robin: window 1 of every variant, then window 2, ...), so a
    change of machine load during the run hits every variant alike and the ratios stay fair on a
    shared machine. From the second round on, each window is preceded by ``runner.rewarm``
    un-timed steps (the typical DataLoader has batches prefetched while the others ran: those
    are drained first). Returns ``{name: {"wall": [s, ...], "cpu": [s, ...]}}``.
    """
    for name, runner in runners.items():
        for _ in range(max(warmup, runner.warmup_min)):
            runner.step()
        _sync(device)
        log(f"bench: warmed up {name}")
    out: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runners}
    for w in range(windows):
        for name, runner in runners.items():
            for _ in range(runner.rewarm if w > 0 else 0):
                runner.step()
            wall, cpu = time_window(runner.step, steps, device)
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
        log(f"bench: window {w + 1}/{windows}: " + ", ".join(
            f"{n} {steps * r.batch_size / out[n]['wall'][-1]:.0f} img/s" for n, r in runners.items()))
    return out


def _summarise(seconds: list[float], steps: int, batch_size: int) -> dict[str, Any]:
    ips = [steps * batch_size / s for s in seconds]
    ms = [1000.0 * s / steps for s in seconds]
    return {"status": "ok", "images_per_s": statistics.median(ips), "images_per_s_windows": ips,
            "step_ms": statistics.median(ms), "step_ms_windows": ms}


def count_train_flops(batch_size: int = BATCH_SIZE, device: str | torch.device = "cpu",
                      probe_batch: int = 8) -> dict[str, Any]:
    """FLOPs of one forward + backward of the 32-bit ResNet-20, scaled to ``batch_size``.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` on ``probe_batch`` images (conv and
    matmul FLOPs are linear in the batch): conv / linear FLOPs only.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from kdlib.models import create_model

    device = torch.device(device)
    model = create_model(MODEL).to(device).train()
    x = torch.randn(probe_batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (probe_batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        logits = model(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    train = counter.get_total_flops()
    return {"forward_per_image": forward / probe_batch, "train_per_image": train / probe_batch,
            "train_per_step": train / probe_batch * batch_size, "batch_size": batch_size,
            "method": "torch.utils.flop_counter.FlopCounterMode, forward + backward of the "
                      f"32-bit {MODEL}; conv/linear FLOPs only"}


def matmul_ceiling(device: str | torch.device = "cpu", size: int = MATMUL_SIZE,
                   reps: int = MATMUL_REPS) -> dict[str, Any]:
    """Median GFLOP/s of ``size x size`` float32 matmuls (one warm-up, then ``reps`` timed)."""
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    out = torch.empty(size, size, device=device)
    inner = 1 if device.type == "cpu" else 20  # a GPU matmul is too short to time alone
    torch.mm(a, b, out=out)
    _sync(device)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        _sync(device)
        rates.append(2.0 * size**3 * inner / (time.perf_counter() - start) / 1e9)
    return {"size": size, "dtype": "float32", "gflops": statistics.median(rates),
            "gflops_windows": rates,
            "tf32": bool(device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Host, CPU model, cores, versions, threads and device of this process."""
    import torchvision

    device = torch.device(device)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info = {"host": socket.gethostname(), "cpu_model": _cpu_model(), "cores": os.cpu_count(),
            "usable_cores": usable, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "device": str(device), "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    return info


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def compute_ratios(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The :data:`TARGETS` and :data:`INFO_RATIOS` ratios from the variants' median step times
    (value None if not measured; ``met`` None if not measured or without a target)."""
    out = {}
    specs = ([(k, *v) for k, v in TARGETS.items()]
             + [(k, *v, None, None) for k, v in INFO_RATIOS.items()])
    for key, what, num, den, op, target in specs:
        a, b = variants.get(num, {}), variants.get(den, {})
        value = None
        if a.get("status") == "ok" and b.get("status") == "ok":
            value = a["step_ms"] / b["step_ms"]
        met = None
        if value is not None and target is not None:
            met = value >= target if op == ">=" else value <= target
        out[key] = {"what": what, "value": value, "numerator": num, "denominator": den,
                    "definition": f"step_ms[{num}] / step_ms[{den}]", "target": target, "op": op,
                    "met": met}
    return out


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= 1")
    return value


def run_benchmark(images: Tensor, labels: Tensor, *, batch_size: int = BATCH_SIZE,
                  windows: int = 5, steps: int = 10, warmup: int = WARMUP_STEPS,
                  device: str | torch.device | None = None, variants: list[str] | None = None,
                  workers: int = TYPICAL_WORKERS, seed: int = 0, data_source: str = "",
                  matmul_size: int = MATMUL_SIZE, matmul_reps: int = MATMUL_REPS,
                  flops_probe_batch: int = 8, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the variants on ``images`` (uint8 [N,3,32,32], CPU) / ``labels``; the result dict.

    ``variants``: names from :data:`VARIANTS` (default all; CUDA-only ones are recorded as
    ``"skipped: no CUDA"`` off CUDA). Every argument shrinks for tests.
    """
    from kdlib.train import pick_device

    for value, name in ((batch_size, "batch_size"), (windows, "windows"), (steps, "steps"),
                        (matmul_size, "matmul_size"), (matmul_reps, "matmul_reps"),
                        (flops_probe_batch, "flops_probe_batch")):
        _check_positive_int(value, name)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} is invalid; expected an integer >= 0")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r} is invalid; expected an integer >= 0")
    names = list(variants) if variants is not None else [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; accepted: {', '.join(_BY_NAME)}")
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(f"images must be uint8 [N,3,32,32], got {images.dtype} {tuple(images.shape)}")
    if len(images) < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(images)} images given")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = pick_device(device)
    images, labels = images.cpu(), labels.cpu()
    ctx = _Context(images, labels, images.to(device), labels.to(device), device, batch_size,
                   seed, workers)

    result: dict[str, Any] = {
        "format": FORMAT,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": {"batch_size": batch_size, "windows": windows, "steps": steps,
                     "warmup": warmup, "data": data_source or f"{len(images)} images",
                     "model": MODEL, "kd_bits": KD_BITS, "typical_workers": workers,
                     "statistic": "median over windows",
                     "schedule": "warm-up of every variant, then round-robin windows (window k of "
                                 "every variant before window k+1); un-timed re-warm steps before "
                                 "each later window (DataLoader: its prefetched batches + 1)"},
        "load_average_start": _load_average(),
        "variants": {},
    }
    runners: dict[str, _Runner] = {}
    try:
        for name in names:
            variant = _BY_NAME[name]
            if variant.cuda_only and device.type != "cuda":
                result["variants"][name] = {"label": variant.label, "status": SKIPPED_NO_CUDA}
                log(f"bench: {name}: {SKIPPED_NO_CUDA}")
                continue
            runners[name] = variant.build(ctx)
        times = measure(runners, windows=windows, steps=steps, warmup=warmup, device=device, log=log)
    finally:
        for runner in runners.values():
            runner.close()
    for name in names:
        if name in runners:
            wall, cpu = times[name]["wall"], times[name]["cpu"]
            entry = {"label": _BY_NAME[name].label, **_summarise(wall, steps, batch_size),
                     "cpu_per_wall_windows": [c / w for c, w in zip(cpu, wall)],
                     "config": runners[name].info}
            result["variants"][name] = entry
    result["variants"] = {n: result["variants"][n] for n in names}  # the variants' own order
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()

    result["ratios"] = compute_ratios(result["variants"])
    flops = count_train_flops(batch_size, device, probe_batch=flops_probe_batch)
    ceiling = matmul_ceiling(device, matmul_size, matmul_reps)
    fp32 = result["variants"].get("fp32", {})
    achieved = (flops["train_per_step"] / (fp32["step_ms"] / 1000.0) / 1e9
                if fp32.get("status") == "ok" else None)
    result["flops"] = {**flops, "achieved_gflops_fp32": achieved, "matmul": ceiling,
                       "fraction_of_matmul": None if achieved is None else achieved / ceiling["gflops"]}
    result["load_average_end"] = _load_average()
    return result


# ============================================================================ report
def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render_markdown(result: dict[str, Any]) -> str:
    """The benchmark as markdown: table of variants, ratios with targets, machine and settings."""
    m, s = result.get("machine", {}), result.get("settings", {})
    variants = result.get("variants", {})
    fp32 = variants.get("fp32", {})
    fp32_ms = fp32.get("step_ms") if fp32.get("status") == "ok" else None
    lines = ["| variant | images/s (median) | ms/step | images/s, all windows | step time vs (a) |",
             "|---|---:|---:|---|---:|"]
    order = [v.name for v in VARIANTS if v.name in variants] + [n for n in variants if n not in _BY_NAME]
    for name in order:  # the JSON file has its keys sorted: show the variants in their own order
        v = variants[name]
        label = v.get("label", name)
        if v.get("status") != "ok":
            lines.append(f"| {label} `{name}` | {v.get('status', 'n/a')} | | | |")
            continue
        windows = " ".join(f"{x:.0f}" for x in v.get("images_per_s_windows", []))
        rel = "n/a"
        if fp32_ms:
            digits = 2 if v["step_ms"] >= fp32_ms / 10 else 3
            rel = f"{v['step_ms'] / fp32_ms:.{digits}f}×"
        lines.append(f"| {label} `{name}` | {v['images_per_s']:.0f} | {v['step_ms']:.1f} | "
                     f"{windows} | {rel} |")
    lines.append("")
    ratios = result.get("ratios", {})
    for key in [k for k in TARGETS if k in ratios] + [k for k in ratios if k not in TARGETS]:
        r = ratios[key]
        value = "n/a" if r.get("value") is None else f"{r['value']:.2f}×"
        if r.get("target") is None:
            lines.append(f"- {r['what']}: {value} (no target)")
            continue
        verdict = "not measured" if r.get("met") is None else ("**met**" if r["met"] else "**missed**")
        lines.append(f"- {r['what']}: {value} (target {r['op']} {r['target']:g}×) — {verdict}")
    f = result.get("flops", {})
    if f:
        mm = f.get("matmul", {})
        frac = f.get("fraction_of_matmul")
        lines.append(f"- achieved in (a): {_fmt(f.get('achieved_gflops_fp32'), '.1f')} GFLOP/s "
                     f"({_fmt(f.get('train_per_image', 0) / 1e6, '.0f')} MFLOP/image forward + backward) "
                     f"vs a {mm.get('size')}×{mm.get('size')} fp32 matmul ceiling of "
                     f"{_fmt(mm.get('gflops'), '.1f')} GFLOP/s "
                     f"({_fmt(None if frac is None else 100 * frac, '.0f')}%)")
    lines.append("")
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    load = result.get("load_average_start")
    load_txt = f"; load average {load[0]:.2f} at start" if load else ""
    lines.append(
        f"Measured on host `{m.get('host')}`: {m.get('cpu_model')}, {m.get('cores')} cores "
        f"({m.get('threads')} torch threads){gpu}, device {m.get('device')}, torch {m.get('torch')}, "
        f"{result.get('date', '?')}{load_txt}. Batch {s.get('batch_size')}, median of "
        f"{s.get('windows')} windows × {s.get('steps')} steps after {s.get('warmup')} warm-up steps, "
        f"interleaved across variants, on {s.get('data')}; data loading included in every "
        f"variant. `make bench` reproduces it.")
    return "\n".join(lines)


# ============================================================================ entry point
def _safe_host(host: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in host) or "host"


def main(args: argparse.Namespace) -> int:
    """``python -m kdlib bench``: measure, write ``<out>/<host>.json``, print the table."""
    from kdlib.data import load_cifar100, resolve_data_root
    from kdlib.fileio import write_json_atomic

    windows = _check_positive_int(getattr(args, "windows", 5), "windows")
    steps = _check_positive_int(getattr(args, "steps", 10), "steps")
    batch_size = _check_positive_int(getattr(args, "batch_size", None) or BATCH_SIZE, "batch_size")
    warmup = getattr(args, "warmup", None)
    warmup = WARMUP_STEPS if warmup is None else warmup
    root = resolve_data_root(getattr(args, "data_dir", None))
    images, labels = load_cifar100(root, train=True)
    result = run_benchmark(
        images, labels, batch_size=batch_size, windows=windows, steps=steps, warmup=warmup,
        device=getattr(args, "device", None) or None, variants=getattr(args, "variants", None),
        data_source=f"CIFAR-100 training set, {len(images)} images",
        matmul_size=getattr(args, "matmul_size", None) or MATMUL_SIZE)
    result["settings"]["data_root"] = str(root)
    out = Path(getattr(args, "out", None) or "results/bench")
    path = out / f"{_safe_host(result['machine']['host'])}.json"
    write_json_atomic(path, result)
    print(render_markdown(result))
    print(f"\nwritten: {path}", file=sys.stderr)
    return 0
