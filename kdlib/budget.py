"""How long a planned run will take, and whether it fits in what is left of a time budget.

A lent GPU is held for minutes, and a run cut off at the end of a lease is lost device time.
So a budgeted grid starts a run only when its estimate fits in the time left. Estimates come,
in this order, from

1. finished runs of the same kind on the same kind of device: the slowest of their typical
   (median) epochs (the per-epoch ``seconds`` in the history), and the median of what a run
   spends besides its epochs (loading, the test pass, saving). A run's median, not its slowest
   epoch, because one epoch slowed by something beside it would set every later estimate.
   Each committed run, estimated from the others (:func:`leave_one_out`): 1.41 times its time
   on the H200 (median; 1.81 by the rule before 390d845: the slowest epoch and the largest
   overhead), 1.55 on the quick grid's CPUs (1.77), 1.73 for SqueezeNet (its seed 5, faster
   than the slowest typical epochs of the seeds before, at 2.06), on the records of 2026-12-05
   (28, 160 and 168 runs); none shorter than its run but one of the quick grid's, by either
   rule;
2. the benchmark of this machine (``results/bench/<name>.json``): training images over the
   measured images/s of the matching step (a KD run's from the grouped-weights part, which
   times fit()'s step both ways, where the benchmark has it), slowed by what the benchmark
   measured for as many processes side by side as the grid runs (``jobs``), plus allowances
   for evaluation and for a run's start (a worker's imports and CUDA context, loading the
   data).

"The same kind" is the model, whether a teacher's logits are computed (KD), the training-set
size, batch size, channels_last, precision, replayed steps and grouped weights (the last two
change how many operators a step launches, not its bits). A run with no estimate is not
started under a budget (the message says to run the benchmark first).

A run resumed from its checkpoint is estimated for the epochs it has left. A run too long for
even the whole budget (the `paper` preset's 200 epochs against a lease's minutes) could never
start under that rule, so it *spans* calls: it starts when one epoch fits, trains whole epochs
while the next one fits before the budget ends (:class:`Deadline`), and stops at an epoch
boundary with its checkpoint; the next call resumes it. Every budgeted run gets that deadline,
so a run whose estimate was too short also stops cleanly instead of being killed mid-epoch.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlib.config import RunConfig
from kdlib.device import bench_device_kind, record_device_kind
from kdlib.results import timed_epochs

SAFETY = 1.2  # estimates are multiplied by this: a run can be slower than the slowest seen
EVAL_ALLOWANCE = 0.25  # bench-based estimate: evaluation adds this fraction to training time
START_ALLOWANCE_S = 20.0  # bench-based estimate: a run's start (spawn, imports, CUDA, data)
# of a 15-minute lease of a GPU (kdlib.lease), what the grid trains for: `go --minutes 9` (the
# README's) less its 45 s reserve and the data's reassembly; the rest goes to the machine's
# start and the data calls
LEASE_TRAINING_MINUTES = 8.0
CIFAR_TRAIN_IMAGES = 50_000


# what a record older than a speed switch ran with: the weights quantized layer by layer
# (1,136 operators a KD step against 652 grouped, on a CPU: the grouped part of
# results/bench/vm-AMD_EPYC_family_26_model_2.json)
BEFORE_SWITCHES = {"group_weights": False}


def as_recorded(config: dict[str, Any]) -> dict[str, Any]:
    """A record's config with the switches it predates set as it ran (:data:`BEFORE_SWITCHES`;
    ``RunConfig`` would fill today's defaults)."""
    return {**BEFORE_SWITCHES, **config}


def _kind(config: dict[str, Any]) -> tuple:
    """What sets a run's speed besides its device: runs of one kind time one another."""
    config = as_recorded(config)
    kd = config.get("teacher_id") is not None
    return (config.get("model"), kd, config.get("train_size"), config.get("val_size"),
            config.get("batch_size"), bool(config.get("channels_last")),
            config.get("precision", "exact"), bool(config.get("cuda_graphs")),
            bool(config["group_weights"]))


def training_images(train_size: float | None, val_size: float) -> int:
    """How many images a run trains on: its class-balanced subset's ``train_size``, or (None,
    or NaN in a records table) every CIFAR-100 training image but the ``val_size`` held out."""
    if train_size is None or train_size != train_size:
        return CIFAR_TRAIN_IMAGES - int(val_size)
    return int(train_size)


def train_images(cfg: RunConfig) -> int:
    return training_images(cfg.train_size, cfg.val_size)


@dataclass
class Estimate:
    seconds: float | None  # None: nothing to estimate from; else SAFETY * (epochs * epoch + extra)
    source: str
    epoch_s: float = 0.0  # one epoch (training and validation), before SAFETY
    extra_s: float = 0.0  # what the run spends besides its epochs (start, test pass, saving)
    runs: int = 0  # the finished runs it comes from (0: from the benchmark, or none)


@dataclass(frozen=True)
class Deadline:
    """When a budgeted run must stop: :func:`kdlib.train.fit` starts an epoch only if
    ``allows`` it, else it stops after its last checkpoint (``RunSuspended``). Wall-clock
    (``time.time``), so that it means the same in a worker process."""

    stop_at: float  # time.time() by which the run must be done
    epoch_s: float  # estimated epoch, before SAFETY: used until the run has timed one itself
    tail_s: float = 0.0  # after the last epoch: test pass and saving, before SAFETY

    def allows(self, epoch: int, epochs: int, measured: Sequence[float] = (),
               now: float | None = None) -> bool:
        """May epoch ``epoch`` (0-based) of ``epochs`` start now? ``measured``: the seconds of
        the epochs this process has trained (they replace the estimate)."""
        now = time.time() if now is None else now
        need = SAFETY * (max(measured) if measured else self.epoch_s)
        if epoch == epochs - 1:
            need += SAFETY * self.tail_s
        return now + need <= self.stop_at


@dataclass
class RunTimer:
    """Estimates from finished records (added as runs finish) and an optional benchmark."""

    device: str  # a kdlib.device.device_kind()
    records: list[dict[str, Any]] = field(default_factory=list)
    bench: dict[str, Any] | None = None
    jobs: int = 1  # runs side by side: each one's bench rate is the per-process rate at jobs
    graphs: bool = False  # the runs replay their steps as CUDA graphs: the bench's graphs rates

    def add(self, record: dict[str, Any] | None) -> None:
        if record is not None and not record.get("same_run_as"):
            self.records.append(record)

    def estimate(self, cfg: RunConfig, epochs_done: int = 0) -> Estimate:
        """The run's time, for the epochs it has left after ``epochs_done`` (its checkpoint)."""
        epochs = max(cfg.epochs - epochs_done, 0)
        mine = _kind(cfg.to_dict())
        same = [r for r in self.records
                if record_device_kind(r) == self.device and _kind(r["config"]) == mine
                and r.get("history")]
        if same:  # each epoch's seconds as if trained beside as many runs as now
            epoch_s = max(statistics.median(seconds * self._slowdown(beside)
                                            for seconds, beside in timed_epochs(r)) for r in same)
            extra_s = statistics.median(max(float(r.get("call_seconds", 0.0))
                                            - sum(row["seconds"] for row in r["history"]), 0.0)
                                        for r in same)
            return Estimate(SAFETY * (epochs * epoch_s + extra_s),
                            f"{len(same)} finished run(s) of this kind", epoch_s, extra_s,
                            runs=len(same))
        rate = self._bench_rate(cfg)
        if rate:
            rate *= self._side_by_side()
            epoch_s = train_images(cfg) / rate * (1 + EVAL_ALLOWANCE)
            return Estimate(SAFETY * (epochs * epoch_s + START_ALLOWANCE_S),
                            f"benchmark, {rate:.0f} img/s a run with {self.jobs} at a time",
                            epoch_s, START_ALLOWANCE_S)
        return Estimate(None, "no finished run of this kind and no benchmark of this device")

    def _side_by_side(self, jobs: int | None = None) -> float:
        """One run's speed with ``jobs`` (default: this timer's) side by side over its speed
        alone, from the benchmark's concurrent processes (the nearest measured count at or
        above ``jobs``); 1/jobs where it measured none (as if the device were already full)."""
        jobs = self.jobs if jobs is None else jobs
        if jobs <= 1:
            return 1.0
        by_jobs = (self._concurrency() or {}).get("by_jobs") or {}
        alone = (by_jobs.get("1") or {}).get("images_per_s")
        counts = sorted(int(k) for k in by_jobs)
        at = next((k for k in counts if k >= jobs), counts[-1] if counts else None)
        if not alone or at is None:
            return 1.0 / jobs
        per_process = by_jobs[str(at)]["images_per_s"] / at
        return min(1.0, per_process / alone) * (at / jobs if at < jobs else 1.0)

    def _slowdown(self, then: int | None) -> float:
        """An epoch timed beside ``then`` runs takes this many times as long beside this
        timer's ``jobs`` (1 where ``then`` is unknown or the same): say 0.37 for an epoch
        timed beside 12 runs, now beside 4, by the H200's processes side by side."""
        if not then or then == self.jobs:
            return 1.0
        return self._side_by_side(then) / self._side_by_side()

    def _concurrency(self) -> dict[str, Any] | None:
        """The benchmark's processes side by side of the step these runs take."""
        part = (self.bench or {}).get("graphs") if self.graphs else self.bench
        return (part or {}).get("concurrency")

    def _bench_rate(self, cfg: RunConfig) -> float | None:
        """Images/s of the benchmark variant closest to ``cfg``'s step on this device (for
        replayed steps: one replaying KD process's, the only replayed step it times)."""
        if not self.bench or bench_device_kind(self.bench) != self.device:
            return None
        if self.bench.get("settings", {}).get("model") != cfg.model:
            return None
        if self.graphs:
            alone = ((self._concurrency() or {}).get("by_jobs") or {}).get("1") or {}
            return alone.get("images_per_s")
        variants = self.bench.get("variants", {})
        name = "kd_w4" if cfg.teacher_id else ("fp32" if cfg.w_bits == 32 else "w4a4")
        rate = (variants.get(name) or {}).get("images_per_s")
        if cfg.teacher_id:  # the grouped-weights part times fit()'s KD step both ways
            steps = ((self.bench.get("grouped") or {}).get("steps") or {})
            timed = steps.get("kd_w4" if cfg.group_weights else "kd_w4_per_layer") or {}
            rate = timed.get("images_per_s") or rate
        return float(rate) if rate else None


def load_bench(folder: str | os.PathLike, device: str) -> dict[str, Any] | None:
    """The newest benchmark file in ``folder`` measured on ``device`` (a
    :func:`kdlib.device.device_kind`)."""
    found = []
    for path in Path(folder).glob("*.json"):
        try:
            bench = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(bench, dict) and bench_device_kind(bench) == device:
            found.append((str(bench.get("date", "")), bench))
    return max(found, key=lambda item: item[0])[1] if found else None


def leave_one_out(records: Sequence[dict[str, Any]],
                  bench_dir: str | os.PathLike | None = None) -> list[float]:
    """How far the estimate from finished runs errs, on real runs: each record's estimate over
    its recorded wall time (``call_seconds``; above 1: long), timed as a budget would time it
    from the other records, beside as many runs as it trained beside (scaled by its device's
    benchmark in ``bench_dir``, if any). Records with no other run of their kind are left out,
    as are aliases."""
    ratios, benches = [], {}
    for record in records:
        if record.get("same_run_as") or not record.get("history") \
                or not record.get("call_seconds"):
            continue
        device = record_device_kind(record)
        if device not in benches:
            benches[device] = load_bench(bench_dir, device) if bench_dir else None
        timer = RunTimer(device, bench=benches[device], jobs=record.get("side_by_side") or 1)
        for other in records:
            if other is not record:
                timer.add(other)
        estimate = timer.estimate(RunConfig.from_dict(as_recorded(record["config"])))
        if estimate.runs:
            ratios.append(estimate.seconds / float(record["call_seconds"]))
    return ratios


@dataclass
class Admission:
    """Whether a run may start under a budget, and the deadline it then trains under."""

    start: bool
    why: str
    deadline: Deadline | None = None
    spans: bool = False  # longer than the whole budget: trains epochs until it ends


class Budget:
    """A wall-clock budget: ``admit(cfg)`` says whether ``cfg`` can start now, and until when
    it may train. ``span``: runs longer than the whole budget start when one epoch fits and
    continue in the next call (see the module docstring); without it they never start.
    ``max_spans``: at most this many such runs (None: any number)."""

    def __init__(self, seconds: float, timer: RunTimer, *, clock=time.monotonic, span: bool = True,
                 max_spans: int | None = None):
        if not seconds > 0:
            raise ValueError(f"budget of {seconds!r} s: give a positive number of seconds")
        self.clock = clock
        self.seconds = float(seconds)
        self.deadline = clock() + float(seconds)
        self.timer = timer
        self.span = span
        # runs admitted to span: each ends paused, and its checkpoint must travel to the next
        # call (a lease: 3.4 MB for ResNet-20, in calls of 64 MiB), so at most this many
        self.max_spans = max_spans
        self.spans = 0

    def left(self) -> float:
        return self.deadline - self.clock()

    def admit(self, cfg: RunConfig, epochs_done: int = 0) -> Admission:
        estimate = self.timer.estimate(cfg, epochs_done)
        if estimate.seconds is None:
            return Admission(False, f"no time estimate ({estimate.source}): run `python -m kdlib "
                                    "bench` on this device first")
        left = self.left()
        # the deadline in wall-clock time, for a worker process; fit() checks it between epochs
        deadline = Deadline(time.time() + left, estimate.epoch_s, estimate.extra_s)
        why = f"needs ~{estimate.seconds:.0f} s ({estimate.source}), {max(left, 0):.0f} s left"
        if estimate.seconds <= left:
            return Admission(True, why, deadline)
        one_epoch = SAFETY * (estimate.epoch_s + estimate.extra_s)
        if self.span and estimate.seconds > self.seconds and one_epoch <= left:
            if self.max_spans is not None and self.spans >= self.max_spans:
                return Admission(False, f"{why}: longer than the whole {self.seconds:.0f} s "
                                 f"budget, and {self.spans} run(s) already continue next call "
                                 f"(at most {self.max_spans})")
            self.spans += 1
            epochs = int((left / SAFETY - estimate.extra_s) // max(estimate.epoch_s, 1e-9))
            left_after = cfg.epochs - epochs_done
            return Admission(True, f"{why}: longer than the whole {self.seconds:.0f} s budget, so "
                             f"it trains ~{min(epochs, left_after)} of its {left_after} "
                             "remaining epochs and continues next call", deadline, spans=True)
        return Admission(False, why)
