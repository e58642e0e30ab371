"""Experiment pipelines: teacher, TA chain, individual, finetune, direct KD.

Every pipeline is planned first and executed second. Planning builds every RunConfig of the
call (teacher and init run ids included, since ids derive from configs), validates it, and
raises ``ValueError`` before anything is trained or written. Execution trains the runs in
dependency order; a run whose record exists is skipped, a run that has a checkpoint resumes.

| method     | init                   | teacher          | loss      |
|------------|------------------------|------------------|-----------|
| teacher    | random (32-bit)        | none             | CE        |
| individual | random                 | none             | CE        |
| finetune   | 32-bit teacher weights | none             | CE        |
| direct_kd  | 32-bit teacher weights | 32-bit teacher   | CE + KD   |
| ta_chain   | previous link          | previous link    | CE + KD   |
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import torch

from kdlib.checks import BitsSpec, parse_bits
from kdlib.config import RunConfig
from kdlib.data import load_splits
from kdlib.fileio import torch_save_atomic
from kdlib.models import create_model
from kdlib.quant import model_size_report, transfer_weights
from kdlib.presets import STUDENT_METHODS, build_config, get_preset
from kdlib.results import (METRIC_FIELDS, checkpoint_path, environment_info, find_record, save_record,
                           weights_path)
from kdlib.train import fit, pick_device


# ----------------------------------------------------------------------------- bits & seeds
def check_chain(chain: Sequence[BitsSpec], *, has_teacher: bool = False) -> list[tuple[int, int]]:
    """A TA chain: at least two links, strictly descending, starting at 32 bits unless a
    trained teacher run is given to stand at its head."""
    if isinstance(chain, (str, bytes)) or not isinstance(chain, Sequence):
        raise ValueError(f"chain={chain!r} must be a list of bit widths, e.g. [32, 16, 8, 4, 2, 1]")
    links = [parse_bits(b) for b in chain]
    if len(links) < 2:
        raise ValueError(f"chain={list(chain)!r} needs at least two links (teacher and one student)")
    for (w0, a0), (w1, a1) in zip(links, links[1:]):
        if not (w1 <= w0 and a1 <= a0 and (w1, a1) != (w0, a0)):
            raise ValueError(f"chain={list(chain)!r} is not descending: each link must have fewer "
                             "bits than the one before (e.g. [32, 16, 8, 4, 2, 1] or [32, 8, 2, 1])")
    if links[0] != (32, 32) and not has_teacher:
        raise ValueError(f"chain={list(chain)!r} does not start at 32 bits; start it at 32 or "
                         "pass teacher_run_id= of a trained run with the first link's bits")
    return links


def check_seeds(seeds: Iterable[int]) -> list[int]:
    seeds = list(seeds) if not isinstance(seeds, int) else [seeds]
    if not seeds:
        raise ValueError("seeds=[] is empty; give at least one seed, e.g. [0]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seed {s!r} is invalid; seeds are non-negative integers")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds!r} has duplicates")
    return seeds


def check_methods(methods: Iterable[str]) -> list[str]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError(f"methods=[] is empty; accepted: {', '.join(STUDENT_METHODS)}")
    for m in methods:
        if m not in STUDENT_METHODS:
            raise ValueError(f"method={m!r} is unknown; accepted: {', '.join(STUDENT_METHODS)} "
                             "(ta_chain: notebook 02 / run_ta_chain)")
    return methods


# ----------------------------------------------------------------------------- planning
def plan_teacher(preset: str, model: str, seed: int, overrides: dict | None = None) -> RunConfig:
    return build_config(preset, model, teacher=True,
                        overrides={**(overrides or {}), "method": "teacher", "w_bits": 32,
                                   "a_bits": 32, "seed": seed, "teacher_id": None, "init_id": None})


def _student(preset: str, model: str, seed: int, method: str, bits: tuple[int, int],
             overrides: dict | None, teacher_id: str | None, init_id: str | None) -> RunConfig:
    return build_config(preset, model, overrides={
        **(overrides or {}), "method": method, "w_bits": bits[0], "a_bits": bits[1], "seed": seed,
        "teacher_id": teacher_id, "init_id": init_id})


def plan_ta_chain(preset: str, model: str, seed: int, chain: Sequence[BitsSpec],
                  overrides: dict | None = None, head: RunConfig | None = None) -> list[RunConfig]:
    """Teacher (unless ``head`` is a trained run) followed by one config per chain link."""
    links = check_chain(chain, has_teacher=head is not None)
    plan = [] if head is not None else [plan_teacher(preset, model, seed, overrides)]
    if head is not None and (head.w_bits, head.a_bits) != links[0]:
        raise ValueError(f"teacher run {head.run_id()} has w{head.w_bits}/a{head.a_bits} bits but "
                         f"the chain starts at {links[0][0]}/{links[0][1]}")
    previous = head if head is not None else plan[0]
    for bits in links[1:]:
        link = _student(preset, model, seed, "ta_chain", bits, overrides,
                        teacher_id=previous.run_id(), init_id=previous.run_id())
        plan.append(link)
        previous = link
    return plan


def plan_students(preset: str, model: str, seed: int, methods: Sequence[str],
                  bits: Sequence[BitsSpec], overrides: dict | None = None) -> list[RunConfig]:
    """Teacher + each method at each bit width. At 32 bits ``individual`` *is* the teacher,
    and finetune/direct_kd would copy it, so 32 is left out of the students."""
    methods = check_methods(methods)
    widths = [parse_bits(b) for b in bits]
    if not widths:
        raise ValueError("bits=[] is empty; give the student bit widths, e.g. [16, 8, 4, 2, 1]")
    teacher = plan_teacher(preset, model, seed, overrides)
    plan = [teacher]
    for method in methods:
        for w in widths:
            if w == (32, 32):
                continue
            from_teacher = teacher.run_id() if method in ("finetune", "direct_kd") else None
            plan.append(_student(preset, model, seed, method, w, overrides,
                                 teacher_id=from_teacher if method == "direct_kd" else None,
                                 init_id=from_teacher))
    return plan


def plan_table(plan: Sequence[RunConfig]) -> pd.DataFrame:
    """One row per planned run: method, bits, and the run ids it starts from / learns from."""
    return pd.DataFrame([{"method": c.method, "w_bits": c.w_bits, "a_bits": c.a_bits,
                          "teacher": c.teacher_id, "init": c.init_id} for c in plan])


def _dedupe(plan: Iterable[RunConfig]) -> list[RunConfig]:
    seen: dict[str, RunConfig] = {}
    for cfg in plan:
        seen.setdefault(cfg.run_id(), cfg)
    return list(seen.values())


# ----------------------------------------------------------------------------- execution
def load_trained_model(results_dir: str | os.PathLike, run_id: str) -> torch.nn.Module:
    """Rebuild a finished run's model from its record and best-val weights."""
    record = find_record(results_dir, run_id)
    path = weights_path(results_dir, run_id)
    if record is None or not path.exists():
        raise FileNotFoundError(f"run {run_id} has no finished record/weights in {results_dir}: "
                                "train it first (its pipeline runs it automatically)")
    cfg = RunConfig.from_dict(record["config"])
    model = _build_model(cfg)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def _build_model(cfg: RunConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # same seed -> same initial weights
    return create_model(cfg.model, num_classes=cfg.num_classes, w_bits=cfg.w_bits,
                        a_bits=cfg.a_bits, quantizer=cfg.quantizer,
                        quantize_first_last=cfg.quantize_first_last)


def check_writable(results_dir: str | os.PathLike) -> None:
    """Raise PermissionError naming the folder when run records cannot be written there."""
    runs = Path(results_dir) / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=runs):
            pass
    except OSError as exc:
        raise PermissionError(f"results folder {Path(results_dir).resolve()} is not writable "
                              f"({exc.strerror}); pass another results_dir / --results-dir") from None


class _DataCache:
    """Loads each distinct data split once per pipeline call."""

    def __init__(self, data_dir: str | os.PathLike | None):
        self.data_dir = data_dir
        self._cache: dict[tuple, Any] = {}

    def get(self, cfg: RunConfig):
        key = (cfg.split_seed, cfg.val_size, cfg.train_size, cfg.test_size)
        if key not in self._cache:
            self._cache[key] = load_splits(self.data_dir, val_size=cfg.val_size,
                                           train_size=cfg.train_size, test_size=cfg.test_size,
                                           seed=cfg.split_seed)
        return self._cache[key]


@contextlib.contextmanager
def _run_lock(results_dir: str | os.PathLike, run_id: str):
    """Exclusive per-run lock: a second pipeline that reaches a run another one is training
    waits for it (then finds its record) instead of training it twice."""
    path = checkpoint_path(results_dir, run_id).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train_run(cfg: RunConfig, data, results_dir: str | os.PathLike, *, device=None,
              progress: bool = True) -> dict[str, Any]:
    """Train one configured run (or return its existing record) and write its record."""
    run_id = cfg.run_id()
    existing = find_record(results_dir, run_id)
    if existing is None:
        with _run_lock(results_dir, run_id):
            existing = find_record(results_dir, run_id)  # another pipeline may have finished it
            if existing is None:
                return _train_and_record(cfg, data, results_dir, device=device, progress=progress)
    print(f"skip {run_id}: record exists")
    return existing


def _train_and_record(cfg: RunConfig, data, results_dir: str | os.PathLike, *, device=None,
                      progress: bool = True) -> dict[str, Any]:
    run_id = cfg.run_id()
    device = pick_device(device)
    model = _build_model(cfg)
    if cfg.init_id:
        transfer_weights(load_trained_model(results_dir, cfg.init_id), model)
    teacher = load_trained_model(results_dir, cfg.teacher_id) if cfg.teacher_id else None
    started = time.time()
    result = fit(model, data, cfg, teacher=teacher, checkpoint_path=checkpoint_path(results_dir, run_id),
                 device=device, progress=progress)
    torch_save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()},
                      weights_path(results_dir, run_id))
    record = {
        "run_id": run_id,
        "config": cfg.to_dict(),
        "metrics": {k: getattr(result, k) for k in METRIC_FIELDS},
        "history": result.history,
        "wall_time_s": result.wall_time_s,
        "images_per_s": result.train_images_per_s,
        "device": result.device,
        "model_size": model_size_report(model),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "call_seconds": time.time() - started,
        **environment_info(),
    }
    save_record(results_dir, record)
    return record


def execute(plan: Sequence[RunConfig], *, data_dir=None, results_dir="results", device=None,
            progress: bool = True) -> list[dict[str, Any]]:
    """Train every planned run in order (dependencies first); returns their records."""
    plan = _dedupe(plan)
    data = _DataCache(data_dir)
    todo = [cfg for cfg in plan if find_record(results_dir, cfg.run_id()) is None]
    if todo:  # fail on an unwritable folder or missing/bad data before anything is trained
        data.get(todo[0])
        check_writable(results_dir)
    records = []
    for i, cfg in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {cfg.run_id()}")
        records.append(train_run(cfg, data.get(cfg), results_dir, device=device, progress=progress))
    return records


# ----------------------------------------------------------------------------- pipelines
def run_teacher(*, preset: str = "smoke", model: str = "resnet20", seeds: Sequence[int] = (0,),
                data_dir=None, results_dir="results", overrides: dict | None = None, device=None,
                progress: bool = True) -> list[dict[str, Any]]:
    """The 32-bit full-precision teacher, one per seed."""
    plan = [plan_teacher(preset, model, s, overrides) for s in check_seeds(seeds)]
    return execute(plan, data_dir=data_dir, results_dir=results_dir, device=device, progress=progress)


def run_ta_chain(*, preset: str = "smoke", model: str = "resnet20", seeds: Sequence[int] = (0,),
                 chain: Sequence[BitsSpec] | None = None, data_dir=None, results_dir="results",
                 overrides: dict | None = None, teacher_run_id: str | None = None, device=None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """The TA chain per seed; the chain of seed s starts from the teacher of seed s."""
    chain = list(get_preset(preset).chain if chain is None else chain)
    seeds = check_seeds(seeds)
    head = None
    if teacher_run_id is not None:
        record = find_record(results_dir, teacher_run_id)
        if record is None:
            raise ValueError(f"teacher_run_id={teacher_run_id!r} has no record in {results_dir}/runs")
        head = RunConfig.from_dict(record["config"])
        if len(seeds) > 1:
            raise ValueError("teacher_run_id fixes one teacher: give a single seed with it")
    plan = [cfg for s in seeds for cfg in plan_ta_chain(preset, model, s, chain, overrides, head)]
    return execute(plan, data_dir=data_dir, results_dir=results_dir, device=device, progress=progress)


def run_students(*, preset: str = "smoke", model: str = "resnet20", seeds: Sequence[int] = (0,),
                 methods: Sequence[str] | None = None, bits: Sequence[BitsSpec] | None = None,
                 data_dir=None, results_dir="results", overrides: dict | None = None, device=None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """individual / finetune / direct_kd at each bit width, per seed (teacher trained if needed)."""
    spec = get_preset(preset)
    methods = list(spec.methods if methods is None else methods)
    bits = list(spec.chain[1:] if bits is None else bits)
    plan = [cfg for s in check_seeds(seeds)
            for cfg in plan_students(preset, model, s, methods, bits, overrides)]
    return execute(plan, data_dir=data_dir, results_dir=results_dir, device=device, progress=progress)


def run_grid(*, preset: str = "smoke", model: str = "resnet20", seeds: Sequence[int] = (0,),
             chain: Sequence[BitsSpec] | None = None, methods: Sequence[str] | None = None,
             data_dir=None, results_dir="results", overrides: dict | None = None, device=None,
             progress: bool = True) -> list[dict[str, Any]]:
    """Everything a comparison needs: teacher, chain and every student method, per seed."""
    spec = get_preset(preset)
    chain = list(spec.chain if chain is None else chain)
    methods = list(spec.methods if methods is None else methods)
    check_chain(chain)
    plan = []
    for s in check_seeds(seeds):
        plan += plan_ta_chain(preset, model, s, chain, overrides)
        plan += plan_students(preset, model, s, methods, chain[1:], overrides)
    return execute(plan, data_dir=data_dir, results_dir=results_dir, device=device, progress=progress)
