"""The device a run trains on, the kind of machine a device, a record or a benchmark names
(timings of one kind time one another), and host synchronisation (only where a timing needs it)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch


def pick_device(preference: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: cuda if available else cpu. ``"cpu"``, ``"cuda"``, ``"cuda:N"``: forced;
    a CUDA device that is not available raises ``ValueError``."""
    if preference is None or preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={preference!r} is unknown; accepted: None, 'auto', 'cpu', "
                         "'cuda', 'cuda:N'") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={preference!r} was requested but CUDA is not available here; "
                             "use 'cpu' or None (auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={preference!r}: only {torch.cuda.device_count()} "
                             "CUDA device(s)")
        return device
    raise ValueError(f"device={preference!r} is not supported; accepted: None, 'auto', 'cpu', "
                     "'cuda'")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str | None:
    """The processor, e.g. 'AMD EPYC (family 26, model 2)': a VM's bare model name is often
    generic ('AMD EPYC'), and two such CPUs ran this workbook's steps 3x apart, so the x86
    family and model are part of it. Timings of two processors never pool."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or None
    if name and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_kind(processor: str | None) -> str:
    """``"cpu:<processor>"``; plain ``"cpu"`` for a record or benchmark that does not name its
    processor, which then times no run of a machine that does."""
    return f"cpu:{processor}" if processor else "cpu"


def record_device_kind(record: dict[str, Any]) -> str:
    """``"cuda:<GPU name>"`` or ``"cpu:<processor>"`` of the machine a record's run trained on:
    runs of one kind time, and share, one kind of device."""
    device = str(record.get("device", "cpu")).split(":")[0]
    return f"cuda:{record.get('gpu')}" if device == "cuda" else cpu_kind(record.get("cpu_model"))


def device_kind(device: str | torch.device) -> str:
    """``"cpu:<processor>"`` or ``"cuda:<GPU name>"`` (records of an H100 do not time an H200,
    nor those of one CPU another)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return cpu_kind(cpu_model())


def bench_device_kind(bench: dict[str, Any]) -> str:
    """The kind (as :func:`device_kind`) of the machine a benchmark file measured."""
    machine = bench.get("machine", {})
    return f"cuda:{machine['gpu']}" if machine.get("gpu") else cpu_kind(machine.get("cpu_model"))
