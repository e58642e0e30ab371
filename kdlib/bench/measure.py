"""Measuring: interleaved timing windows, FLOP counts, matmul ceilings and the machine."""
from __future__ import annotations

import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdlib.device import cpu_model, sync

MATMUL_SIZE = 2048
MATMUL_MAX_SECONDS = 0.25  # a slower product (e.g. bf16 without native support) is made smaller
MATMUL_MIN_SIZE = 256


@dataclass
class Runner:
    """One built variant: ``step()`` runs one step (getting its batch included)."""

    step: Callable[[], None]
    close: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 0  # images per step (0: not an image pipeline, e.g. a matmul)
    flops_per_step: float | None = None  # set where known before timing (matmuls)
    warmup_min: int = 0  # at least this many warm-up steps (compiling; a CUDA graph's capture)
    rewarm: int = 1  # un-timed steps before each later window (see measure)
    trainer: Any = None  # the objects behind the step, for inspection (never serialised)


def error_entry(exc: BaseException) -> dict[str, str]:
    """What a benchmark records in place of a measurement that raised (the rest stands)."""
    return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def check_int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {low}")
    return value


def time_window(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """Run ``steps`` steps; (wall seconds, CPU seconds of this process) they took."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(runners: dict[str, Runner], *, windows: int, steps: int, warmup: int,
            device: torch.device, log: Callable[[str], None] = lambda msg: None
            ) -> dict[str, dict[str, Any]]:
    """Time every runner: warm-up, then ``windows`` rounds of one window per runner.

    Windows are interleaved (round-robin: window 1 of every runner, then window 2, ...), so a
    change of machine load during the run hits every variant (and the matmul ceilings) alike.
    From the second round on, each window is preceded by ``runner.rewarm`` un-timed steps (the
    typical DataLoader has batches prefetched while the others ran: those are drained first).
    Returns ``{name: {"wall": [s, ...], "cpu": [s, ...], "warmup_s": s}}``.
    A runner whose warm-up raises is left out of the windows: ``{"error": "Type: message"}``
    (one variant that a torch version cannot compile must not cost the others their numbers).
    """
    out: dict[str, dict[str, Any]] = {name: {"wall": [], "cpu": []} for name in runners}
    failed: dict[str, dict[str, Any]] = {}
    for name, runner in runners.items():
        start = time.perf_counter()
        try:
            for _ in range(max(warmup, runner.warmup_min)):
                runner.step()
            sync(device)
        except Exception as exc:  # noqa: BLE001 - recorded, and the others go on
            failed[name] = error_entry(exc)
            log(f"bench: {name} failed in its warm-up ({failed[name]['error']})")
            continue
        out[name]["warmup_s"] = time.perf_counter() - start
        log(f"bench: warmed up {name} ({out[name]['warmup_s']:.1f} s)")
    runners = {n: r for n, r in runners.items() if n not in failed}
    for w in range(windows):
        for name, runner in runners.items():
            for _ in range(runner.rewarm if w > 0 else 0):
                runner.step()
            wall, cpu = time_window(runner.step, steps, device)
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
        log(f"bench: window {w + 1}/{windows}: " + ", ".join(
            f"{n} {steps * r.batch_size / out[n]['wall'][-1]:.0f} img/s" if r.batch_size else
            f"{n} {steps * r.flops_per_step / out[n]['wall'][-1] / 1e9:.0f} GFLOP/s"
            for n, r in runners.items()))
    return {**{n: t for n, t in out.items() if n not in failed}, **failed}


def summarise(seconds: list[float], steps: int, batch_size: int) -> dict[str, Any]:
    """Images/s and ms/step of every window, and their medians."""
    ips = [steps * batch_size / s for s in seconds]
    ms = [1000.0 * s / steps for s in seconds]
    return {"status": "ok", "images_per_s": statistics.median(ips), "images_per_s_windows": ips,
            "step_ms": statistics.median(ms), "step_ms_windows": ms}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``fn()`` runs, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (convolutions and matrix products, forward and backward; elementwise ops, normalisation,
    losses and optimizer updates are not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` hold the same raw bits (dtype, shape and every byte; -0.0 is not 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().reshape(-1).view(torch.uint8),
                       b.detach().reshape(-1).view(torch.uint8))


# operators that launch no kernel: views, aliases, allocations, metadata
NO_KERNEL_OPS = frozenset({
    "aten.detach", "aten.view", "aten._unsafe_view", "aten.alias", "aten.as_strided", "aten.t",
    "aten.expand", "aten.permute", "aten.reshape", "aten.slice", "aten.select", "aten.split",
    "aten.split_with_sizes", "aten.unsqueeze", "aten.squeeze", "aten.transpose",
    "aten.lift_fresh", "aten.empty", "aten.empty_like", "aten.empty_strided",
    "aten.new_empty_strided", "aten.scalar_tensor", "aten.flatten", "aten.unbind"})


def count_ops(fn: Callable[[], Any]) -> int:
    """ATen operators that ``fn()`` dispatches, views and allocations left out: on a GPU each
    launches one kernel or more, and a step bound by launching costs about that many launches.
    Counted on any device; a CPU's count differs from a GPU's where their code paths do (the
    optimizer: a loop over the parameters on a CPU, foreach kernels on CUDA; ≤ 8-bit layers
    convolve integer codes on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) not in NO_KERNEL_OPS:
                self.count += 1
            return func(*args, **(kwargs or {}))

    with _Count() as counter:
        fn()
    return counter.count


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, inner: int) -> float:
    sync(a.device)
    start = time.perf_counter()
    for _ in range(inner):
        torch.mm(a, b, out=out)
    sync(a.device)
    return time.perf_counter() - start


def matmul_runner(device: torch.device, dtype: torch.dtype, size: int = MATMUL_SIZE) -> Runner:
    """A runner whose step is ``size x size`` matrix products in ``dtype``: the ceiling.

    ``size`` is halved (down to 256) while one product takes over ``MATMUL_MAX_SECONDS``, so
    that a dtype this machine computes slowly (bf16 on a CPU without bf16 instructions) still
    fits in a window; the size used is recorded.
    """
    inner = 1 if device.type == "cpu" else 20  # a GPU matmul is too short to time alone
    gen = torch.Generator(device="cpu").manual_seed(0)
    while True:
        a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # first call: library set-up
        if size <= MATMUL_MIN_SIZE or _matmul_seconds(a, b, out, 1) <= MATMUL_MAX_SECONDS:
            break
        size //= 2
    info = {"size": size, "dtype": str(dtype).removeprefix("torch."), "products_per_step": inner,
            "tf32": bool(device.type == "cuda" and dtype == torch.float32
                         and torch.backends.cuda.matmul.allow_tf32)}
    return Runner(lambda: _matmul_seconds(a, b, out, inner), info=info,
                  flops_per_step=2.0 * size**3 * inner, rewarm=0)


def _cpu_bf16_native() -> bool | None:
    """Whether oneDNN has native bf16 kernels on this CPU (else bf16 is emulated, slowly)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def usable_cores() -> int | None:
    """The cores this process may run on (its affinity), else all of the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Host, CPU model, cores, versions, threads and device of this process."""
    import torchvision  # lazy, only for its version: importing it takes seconds

    device = torch.device(device)
    info = {"host": socket.gethostname(), "cpu_model": cpu_model() or "unknown",
            "cores": os.cpu_count(), "usable_cores": usable_cores(), "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_bf16_native": _cpu_bf16_native(), "device": str(device), "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None
