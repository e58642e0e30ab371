"""How long a planned run will take, and whether it fits in what is left of a time budget.

A lent GPU is held for minutes, and a run cut off at the end of a lease is lost device time.
So a budgeted grid starts a run only when its estimate fits in the time left. Estimates come,
in this order, from

1. finished runs of the same kind on the same kind of device (their per-epoch ``seconds`` in
   the history, and what a run spends besides its epochs: loading, the test pass, saving), the
   slowest of them, so an estimate errs long;
2. the benchmark of this machine (``results/bench/<name>.json``): training images over the
   measured images/s of the matching step, slowed by what the benchmark measured for as many
   processes side by side as the grid runs (``jobs``), plus allowances for evaluation and for
   a run's start (a worker's imports and CUDA context, loading the data).

"The same kind" is the model, whether a teacher's logits are computed (KD), the training-set
size, batch size, channels_last and precision. A run with no estimate is not started under a
budget (the message says to run the benchmark first).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdlib.config import RunConfig
from kdlib.device import cpu_model

SAFETY = 1.2  # estimates are multiplied by this: the slowest epoch seen can still be beaten
EVAL_ALLOWANCE = 0.25  # bench-based estimate: evaluation adds this fraction to training time
START_ALLOWANCE_S = 20.0  # bench-based estimate: a run's start (spawn, imports, CUDA, data)
CIFAR_TRAIN_IMAGES = 50_000


def cpu_kind(processor: str | None) -> str:
    """``"cpu:<processor>"``; plain ``"cpu"`` for a record or benchmark that does not name its
    processor, which then times no run of a machine that does."""
    return f"cpu:{processor}" if processor else "cpu"


def device_kind(device: str | torch.device) -> str:
    """``"cpu:<processor>"`` or ``"cuda:<GPU name>"`` (records of an H100 do not time an H200,
    nor those of one CPU another)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return cpu_kind(cpu_model())


def record_device_kind(record: dict[str, Any]) -> str:
    device = str(record.get("device", "cpu")).split(":")[0]
    return f"cuda:{record.get('gpu')}" if device == "cuda" else cpu_kind(record.get("cpu_model"))


def _kind(config: dict[str, Any]) -> tuple:
    kd = config.get("teacher_id") is not None
    return (config.get("model"), kd, config.get("train_size"), config.get("val_size"),
            config.get("batch_size"), bool(config.get("channels_last")),
            config.get("precision", "exact"))


def train_images(cfg: RunConfig) -> int:
    return cfg.train_size if cfg.train_size is not None else CIFAR_TRAIN_IMAGES - cfg.val_size


@dataclass
class Estimate:
    seconds: float | None  # None: nothing to estimate from
    source: str


@dataclass
class RunTimer:
    """Estimates from finished records (added as runs finish) and an optional benchmark."""

    device: str  # a device_kind()
    records: list[dict[str, Any]] = field(default_factory=list)
    bench: dict[str, Any] | None = None
    jobs: int = 1  # runs side by side: each one's bench rate is the per-process rate at jobs

    def add(self, record: dict[str, Any] | None) -> None:
        if record is not None and not record.get("same_run_as"):
            self.records.append(record)

    def estimate(self, cfg: RunConfig) -> Estimate:
        mine = _kind(cfg.to_dict())
        same = [r for r in self.records
                if record_device_kind(r) == self.device and _kind(r["config"]) == mine
                and r.get("history")]
        if same:
            epoch_s = max(row["seconds"] for r in same for row in r["history"])
            extra_s = max(max(float(r.get("call_seconds", 0.0))
                              - sum(row["seconds"] for row in r["history"]), 0.0) for r in same)
            return Estimate(SAFETY * (cfg.epochs * epoch_s + extra_s),
                            f"{len(same)} finished run(s) of this kind")
        rate = self._bench_rate(cfg)
        if rate:
            rate *= self._side_by_side()
            epoch_s = train_images(cfg) / rate * (1 + EVAL_ALLOWANCE)
            return Estimate(SAFETY * (cfg.epochs * epoch_s + START_ALLOWANCE_S),
                            f"benchmark, {rate:.0f} img/s a run with {self.jobs} at a time")
        return Estimate(None, "no finished run of this kind and no benchmark of this device")

    def _side_by_side(self) -> float:
        """One run's speed with ``jobs`` side by side over its speed alone, from the
        benchmark's concurrent processes (the nearest measured count at or above ``jobs``);
        1/jobs where it measured none (as if the device were already full)."""
        if self.jobs <= 1:
            return 1.0
        by_jobs = ((self.bench or {}).get("concurrency") or {}).get("by_jobs") or {}
        alone = (by_jobs.get("1") or {}).get("images_per_s")
        counts = sorted(int(k) for k in by_jobs)
        at = next((k for k in counts if k >= self.jobs), counts[-1] if counts else None)
        if not alone or at is None:
            return 1.0 / self.jobs
        per_process = by_jobs[str(at)]["images_per_s"] / at
        return min(1.0, per_process / alone) * (at / self.jobs if at < self.jobs else 1.0)

    def _bench_rate(self, cfg: RunConfig) -> float | None:
        """Images/s of the benchmark variant closest to ``cfg``'s step on this device."""
        if not self.bench or bench_device_kind(self.bench) != self.device:
            return None
        if self.bench.get("settings", {}).get("model") != cfg.model:
            return None
        variants = self.bench.get("variants", {})
        name = "kd_w4" if cfg.teacher_id else ("fp32" if cfg.w_bits == 32 else "w4a4")
        rate = (variants.get(name) or {}).get("images_per_s")
        return float(rate) if rate else None


def bench_device_kind(bench: dict[str, Any]) -> str:
    machine = bench.get("machine", {})
    return f"cuda:{machine['gpu']}" if machine.get("gpu") else cpu_kind(machine.get("cpu_model"))


def load_bench(folder: str | os.PathLike, device: str) -> dict[str, Any] | None:
    """The newest benchmark file in ``folder`` measured on ``device`` (a device_kind())."""
    found = []
    for path in Path(folder).glob("*.json"):
        try:
            bench = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(bench, dict) and bench_device_kind(bench) == device:
            found.append((str(bench.get("date", "")), bench))
    return max(found, key=lambda item: item[0])[1] if found else None


class Budget:
    """A wall-clock budget: ``fits(cfg)`` says whether ``cfg`` can start now and finish in time."""

    def __init__(self, seconds: float, timer: RunTimer, *, clock=time.monotonic):
        if not seconds > 0:
            raise ValueError(f"budget of {seconds!r} s: give a positive number of seconds")
        self.clock = clock
        self.deadline = clock() + float(seconds)
        self.timer = timer

    def left(self) -> float:
        return self.deadline - self.clock()

    def fits(self, cfg: RunConfig) -> tuple[bool, str]:
        estimate = self.timer.estimate(cfg)
        if estimate.seconds is None:
            return False, (f"no time estimate ({estimate.source}): run `python -m kdlib bench` on "
                           "this device first")
        left = self.left()
        why = f"needs ~{estimate.seconds:.0f} s ({estimate.source}), {max(left, 0):.0f} s left"
        return estimate.seconds <= left, why
