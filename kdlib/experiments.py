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
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
from filelock import FileLock, Timeout

from kdlib.budget import Admission, Budget, Deadline
from kdlib.checkpoints import epochs_done
from kdlib.checks import BitsSpec, parse_bits
from kdlib.config import RunConfig, validate
from kdlib.data import load_splits
from kdlib.export import load_packed, read_packed_header, save_packed
from kdlib.fileio import torch_save_atomic
from kdlib.models import create_model
from kdlib.quant import model_size_report, transfer_weights
from kdlib.presets import (CHAIN_METHODS, STUDENT_METHODS, TEACHER_SCHEDULE_METHODS, build_config,
                           get_preset)
from kdlib.results import (METRIC_FIELDS, checkpoint_path, environment_info, find_record,
                           packed_path, save_record, untrained, weights_path)
from kdlib.run_order import resume_first, start_order, unique_runs, work_left_in
from kdlib.train import RunSuspended, fit, pick_device
from kdlib.trained import TrainedIndex


# ----------------------------------------------------------------------------- bits & seeds
def check_chain(chain: Sequence[BitsSpec], *, has_teacher: bool = False) -> list[tuple[int, int]]:
    """A TA chain: at least two links, strictly descending, starting at 32 bits unless a
    trained teacher run is given to stand at its head."""
    if isinstance(chain, (str, bytes)) or not isinstance(chain, Sequence):
        raise ValueError(f"chain={chain!r} must be a list of bit widths, e.g. [32, 16, 8, 4, 2, 1]")
    links = [parse_bits(b) for b in chain]
    if len(links) < 2:
        raise ValueError(f"chain={list(chain)!r} needs at least two links (teacher and one "
                         "student)")
    for (w0, a0), (w1, a1) in zip(links, links[1:]):
        if not (w1 <= w0 and a1 <= a0 and (w1, a1) != (w0, a0)):
            raise ValueError(f"chain={list(chain)!r} is not descending: each link must have fewer "
                             "bits than the one before (e.g. [32, 16, 8, 4, 2, 1] or "
                             "[32, 8, 2, 1])")
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


def check_methods(methods: Iterable[str], allowed: Sequence[str] = STUDENT_METHODS,
                  where: str = "notebook 03 / run_students") -> list[str]:
    """A non-empty list of distinct methods out of ``allowed``."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError(f"methods=[] is empty; accepted: {', '.join(allowed)}")
    for m in methods:
        if m not in allowed:
            others = CHAIN_METHODS if allowed is STUDENT_METHODS else STUDENT_METHODS
            raise ValueError(f"method={m!r} is unknown here; accepted: {', '.join(allowed)} "
                             f"({where}; {', '.join(others)} go elsewhere)")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods={methods!r} has duplicates")
    return methods


# ----------------------------------------------------------------------------- planning
def plan_teacher(preset: str, model: str | None, seed: int,
                 overrides: dict | None = None) -> RunConfig:
    return build_config(preset, model, teacher=True, overrides=overrides, planned=dict(
        method="teacher", w_bits=32, a_bits=32, seed=seed, teacher_id=None, init_id=None))


def _student(preset: str, model: str | None, seed: int, method: str, bits: tuple[int, int],
             overrides: dict | None, teacher_id: str | None, init_id: str | None) -> RunConfig:
    return build_config(preset, model, teacher=method in TEACHER_SCHEDULE_METHODS,
                        overrides=overrides, planned=dict(
                            method=method, w_bits=bits[0], a_bits=bits[1], seed=seed,
                            teacher_id=teacher_id, init_id=init_id))


def plan_chain(preset: str, model: str | None, seed: int, chain: Sequence[BitsSpec],
               overrides: dict | None = None, head: RunConfig | None = None,
               method: str = "ta_chain") -> list[RunConfig]:
    """Teacher (unless ``head`` is a trained run) followed by one config per chain link; every
    link starts from the weights of the link before it. Who teaches a link is the method's:

    * ``ta_chain``: the link before it (the teacher-assistant chain);
    * ``progressive``: nobody (cross-entropy): quantization stepped down without distillation;
    * ``progressive_kd32``: the chain's head, the 32-bit teacher (the chain's path, no assistant).
    """
    check_methods([method], CHAIN_METHODS, "notebook 02 / run_ta_chain")
    links = check_chain(chain, has_teacher=head is not None)
    plan = [] if head is not None else [plan_teacher(preset, model, seed, overrides)]
    if head is not None and (head.w_bits, head.a_bits) != links[0]:
        raise ValueError(f"teacher run {head.run_id()} has w{head.w_bits}/a{head.a_bits} bits but "
                         f"the chain starts at {links[0][0]}/{links[0][1]}")
    top = head if head is not None else plan[0]
    previous = top
    for bits in links[1:]:
        teacher = {"ta_chain": previous, "progressive": None, "progressive_kd32": top}[method]
        link = _student(preset, model, seed, method, bits, overrides,
                        teacher_id=teacher.run_id() if teacher is not None else None,
                        init_id=previous.run_id())
        plan.append(link)
        previous = link
    return plan


def plan_ta_chain(preset: str, model: str | None, seed: int, chain: Sequence[BitsSpec],
                  overrides: dict | None = None, head: RunConfig | None = None) -> list[RunConfig]:
    """The teacher-assistant chain: :func:`plan_chain` with ``method="ta_chain"``."""
    return plan_chain(preset, model, seed, chain, overrides, head, "ta_chain")


def plan_students(preset: str, model: str | None, seed: int, methods: Sequence[str],
                  bits: Sequence[BitsSpec], overrides: dict | None = None) -> list[RunConfig]:
    """Teacher + each method at each bit width. ``bits`` are the chain's links in order (the
    k-th is k links below the teacher). At 32 bits ``individual`` *is* the teacher, and the
    others would copy it, so 32 is left out of the students.

    * ``individual``: random weights, cross-entropy, on the teacher's own schedule (epochs, lr,
      warm-up): the fair trained-alone baseline.
    * ``finetune``: the teacher's weights, cross-entropy, a link's epochs.
    * ``direct_kd``: the teacher's weights, distilled from the teacher, a link's epochs.
    * ``direct_kd_matched``: as ``direct_kd`` but for k times a link's epochs at the k-th
      link, the student epochs the chain has spent down to that width (equal budgets).
    """
    methods = check_methods(methods)
    widths = [w for w in (parse_bits(b) for b in bits) if w != (32, 32)]
    if not widths:
        raise ValueError("bits=[] has no student width; give e.g. [16, 8, 4, 2, 1]")
    teacher = plan_teacher(preset, model, seed, overrides)
    plan = [teacher]
    for method in methods:
        for k, w in enumerate(widths, 1):
            alone = method == "individual"  # random weights, cross-entropy
            cfg = _student(preset, model, seed, method, w, overrides,
                           init_id=None if alone else teacher.run_id(),
                           teacher_id=None if alone or method == "finetune" else teacher.run_id())
            if method == "direct_kd_matched":
                cfg = validate(cfg.replace(epochs=k * cfg.epochs))
            plan.append(cfg)
    return plan


def plan_table(plan: Sequence[RunConfig]) -> pd.DataFrame:
    """One row per planned run: method, bits, and the run ids it starts from / learns from."""
    return pd.DataFrame([{"method": c.method, "w_bits": c.w_bits, "a_bits": c.a_bits,
                          "teacher": c.teacher_id, "init": c.init_id} for c in plan])


# ----------------------------------------------------------------------------- execution
def load_trained_model(results_dir: str | os.PathLike, run_id: str) -> torch.nn.Module:
    """Rebuild a finished run's model from its record and best-val weights.

    The weights come from the run's checkpoint folder, or, where that is gone (checkpoints are
    not committed), from its committed packed file when that file holds every tensor raw (a
    32-bit model): then it is the same state_dict bit for bit. A packed low-bit model holds
    only its quantized weights, not the latent ones a chain link starts from, so it is refused.
    """
    record = find_record(results_dir, run_id)
    trained_as = (record or {}).get("same_run_as") or run_id
    path = weights_path(results_dir, trained_as)
    if record is None:
        raise FileNotFoundError(f"run {run_id} has no finished record in {results_dir}: "
                                "train it first (its pipeline runs it automatically)")
    cfg = RunConfig.from_dict(record["config"])
    model = _build_model(cfg)
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
    elif is_lossless(packed := packed_path(results_dir, trained_as)):
        state = load_packed(packed).state_dict()
    else:
        raise FileNotFoundError(f"run {run_id} has a record but no weights file {path}"
                                + (f" (its packed file {packed.name} keeps only the quantized "
                                   "weights, not the latent ones training starts from)"
                                   if packed.exists() else "")
                                + ": checkpoints/ is ignored by git (`lease receive` stages "
                                "what a lease's unfinished runs need); restore that folder from "
                                "the machine that trained it, or delete the record (and the "
                                "records of the runs that start from it) to train it again")
    model.load_state_dict(state)
    return model


def is_lossless(packed: Path) -> bool:
    """Whether a packed file stores every tensor as it was trained (no integer codes)."""
    return packed.exists() and all(entry["encoding"] == "raw"
                                   for entry in read_packed_header(packed)["tensors"])


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
                              f"({exc.strerror}); pass another results_dir / "
                              "--results-dir") from None


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
    waits for it (then finds its record) instead of training it twice. An OS lock (filelock:
    flock on Unix, LockFileEx on Windows): a killed holder releases it with its process."""
    path = checkpoint_path(results_dir, run_id).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:  # say why nothing moves: the wait lasts as long as the other's training
        print(f"{run_id}: another process is training it; waiting for it to finish "
              f"(lock {path})", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def train_run(cfg: RunConfig, data, results_dir: str | os.PathLike, *, device=None,
              progress: bool = True, index: TrainedIndex | None = None,
              deadline: Deadline | None = None, side_by_side: int | None = 1,
              runs_in_flight: Callable[[], int] | None = None) -> dict[str, Any]:
    """Train one configured run (or return its existing record) and write its record.
    ``data``: its splits (:func:`kdlib.data.load_splits`), not read when it has a record.
    ``deadline``: see :func:`kdlib.train.fit` (raises ``RunSuspended``, nothing recorded).
    ``side_by_side``: how many runs the grid trains at once on this machine (None: unknown),
    recorded so that a run's wall time can be turned into its share of the device's;
    ``runs_in_flight``: the live count of runs training now, where the executor keeps one (see
    :func:`kdlib.train.fit`), which measures that share epoch by epoch.

    A run whose training another method's run already did (same :func:`training_key`) is not
    trained again: it gets a record of its own that copies that run's results and names it in
    ``same_run_as``.
    """
    run_id = cfg.run_id()
    existing = find_record(results_dir, run_id)
    if existing is None:
        with _run_lock(results_dir, run_id):
            existing = find_record(results_dir, run_id)  # another pipeline may have finished it
            if existing is None:
                index = index or TrainedIndex(results_dir)
                key = index.key(cfg)
                same = index.by_key.get(key)
                if same is not None and same != run_id:
                    record = _alias_record(cfg, find_record(results_dir, same), results_dir)
                    index.alias_of[run_id] = same
                    return record
                record = _train_and_record(cfg, data, results_dir, device=device,
                                           progress=progress, training_key=key, deadline=deadline,
                                           side_by_side=side_by_side,
                                           runs_in_flight=runs_in_flight)
                index.by_key[key] = run_id
                return record
    print(f"skip {run_id}: record exists")
    return existing


def _alias_record(cfg: RunConfig, trained: dict[str, Any],
                  results_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of ``cfg``, a run whose training ``trained`` already did: same results."""
    record = {**trained, "run_id": cfg.run_id(), "config": cfg.to_dict(),
              "same_run_as": trained["run_id"]}
    save_record(results_dir, record)
    print(f"same run {cfg.run_id()}: trained as {trained['run_id']}")
    return record


def _train_and_record(cfg: RunConfig, data, results_dir: str | os.PathLike, *, device=None,
                      progress: bool = True, training_key: str | None = None,
                      deadline: Deadline | None = None, side_by_side: int | None = 1,
                      runs_in_flight: Callable[[], int] | None = None) -> dict[str, Any]:
    run_id = cfg.run_id()
    device = pick_device(device)
    model = _build_model(cfg)
    if cfg.init_id:
        transfer_weights(load_trained_model(results_dir, cfg.init_id), model)
    teacher = load_trained_model(results_dir, cfg.teacher_id) if cfg.teacher_id else None
    started = time.time()
    result = fit(model, data, cfg, teacher=teacher,
                 checkpoint_path=checkpoint_path(results_dir, run_id),
                 device=device, progress=progress, deadline=deadline, side_by_side=side_by_side,
                 runs_in_flight=runs_in_flight)
    torch_save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()},
                      weights_path(results_dir, run_id))
    packed = save_packed(model, packed_path(results_dir, run_id), model_name=cfg.model,
                         run_id=run_id)
    record = {
        "run_id": run_id,
        "config": cfg.to_dict(),
        "training_key": training_key,
        "metrics": {k: getattr(result, k) for k in METRIC_FIELDS},
        "history": result.history,
        "wall_time_s": result.wall_time_s,
        "images_per_s": result.train_images_per_s,
        "device": result.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "model_size": model_size_report(model),
        # the packed file's size: a clone that lacks the file (only seed 0's and the teachers'
        # are committed) still knows what a deployment of this run ships
        "packed_bytes": packed.stat().st_size,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "call_seconds": time.time() - started,
        "side_by_side": side_by_side,
        **environment_info(),
    }
    save_record(results_dir, record)
    return record


def execute(plan: Sequence[RunConfig], *, data_dir=None, results_dir="results", device=None,
            progress: bool = True, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Train every planned run in order (dependencies first); returns their records.

    With a ``budget`` (:class:`kdlib.budget.Budget`), the runs come in the order the processes
    executor starts them (:func:`kdlib.run_order.start_order`: what others wait for first, then
    the shortest by estimated time), a run is started only when its estimate fits in the time
    left (or, longer than the whole budget, when one epoch does), it trains until the budget's
    end at most, and a run whose teacher or init run has no record is left for later; the
    records returned are those that exist at the end, and the next call resumes.
    """
    planned = unique_runs(plan)
    # under a budget, one run at a time in the order the processes executor starts them
    plan = (start_order(planned, results_dir, work_left_in(results_dir, budget))
            if budget is not None else resume_first(planned, results_dir))
    data = _DataCache(data_dir)
    todo = untrained(plan, results_dir)
    if todo:  # fail on an unwritable folder or missing/bad data before anything is trained
        data.get(todo[0])
        check_writable(results_dir)
    index = TrainedIndex(results_dir)
    todo_ids = {cfg.run_id() for cfg in todo}  # a done line for each, none for skipped runs
    records, left_out = [], []
    for i, cfg in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {cfg.run_id()}")
        admission = _admission(cfg, results_dir, index, budget) if budget is not None else None
        if admission is not None and not admission.start:
            print(f"not started {cfg.run_id()}: {admission.why}", flush=True)
            left_out.append(cfg.run_id())
            continue
        if admission is not None:
            print(start_line(cfg, admission), flush=True)
        try:
            # a run recorded before this call returns its record: no data to load for it
            split = data.get(cfg) if cfg.run_id() in todo_ids else None
            record = train_run(cfg, split, results_dir, device=device, progress=progress,
                               index=index, deadline=admission and admission.deadline)
        except RunSuspended as paused:
            print(f"paused {paused}", flush=True)
            left_out.append(cfg.run_id())
            continue
        records.append(record)
        if cfg.run_id() in todo_ids:
            print(done_line(cfg.run_id(), record), flush=True)
        if budget is not None:
            budget.timer.add(record)
    if left_out:
        print(f"budget: {len(left_out)} of {len(plan)} runs left for the next call "
              f"({max(budget.left(), 0):.0f} s of the budget unused); finished runs are skipped "
              "then, paused ones resume")
    order = {cfg.run_id(): i for i, cfg in enumerate(planned)}
    return sorted(records, key=lambda record: order[record["run_id"]])


def _admission(cfg: RunConfig, results_dir, index: TrainedIndex,
               budget: Budget) -> Admission | None:
    """Whether ``cfg`` may start under ``budget`` now; None when it costs no training (its record
    exists, or it is an alias)."""
    if find_record(results_dir, cfg.run_id()) is not None:
        return None
    missing = [d for d in (cfg.teacher_id, cfg.init_id)
               if d and find_record(results_dir, d) is None]
    if missing:
        return Admission(False, f"waits for {missing[0]}")
    return budget_admission(cfg, budget, index, results_dir)


def start_line(cfg: RunConfig, admission: Admission | None) -> str:
    """The log's line as a run starts; under a budget with its estimate and the time left, so
    that a call's estimates can be read beside the seconds of its ``done`` lines."""
    return f"start {cfg.run_id()}" + (f": {admission.why}" if admission is not None else "")


def done_line(run_id: str, record: dict[str, Any] | None) -> str:
    """The log's line as a run's record is written: the seconds it trained, or the run whose
    training it is (an alias's record carries that run's seconds, not its own)."""
    record = record or {}
    if record.get("same_run_as"):
        return f"done {run_id} (same run as {record['same_run_as']})"
    seconds = record.get("wall_time_s")
    return f"done {run_id}" + (f" ({seconds:.0f} s)" if seconds is not None else "")


def budget_admission(cfg: RunConfig, budget: Budget, index: TrainedIndex,
                     results_dir: str | os.PathLike) -> Admission | None:
    """``budget.admit`` for ``cfg`` and the epochs its checkpoint already holds; None if another
    run of the index already trained it (recording it under this name costs nothing)."""
    trained_as = index.by_key.get(index.key(cfg))
    if trained_as is not None and trained_as != cfg.run_id():
        return None
    return budget.admit(cfg, epochs_done(checkpoint_path(results_dir, cfg.run_id())))


# ----------------------------------------------------------------------------- pipelines
def run_teacher(*, preset: str = "smoke", model: str | None = None, seeds: Sequence[int] = (0,),
                data_dir=None, results_dir="results", overrides: dict | None = None, device=None,
                progress: bool = True) -> list[dict[str, Any]]:
    """The 32-bit full-precision teacher, one per seed."""
    plan = [plan_teacher(preset, model, s, overrides) for s in check_seeds(seeds)]
    return execute(plan, data_dir=data_dir, results_dir=results_dir, device=device,
                   progress=progress)


def run_ta_chain(*, preset: str = "smoke", model: str | None = None, seeds: Sequence[int] = (0,),
                 chain: Sequence[BitsSpec] | None = None, methods: Sequence[str] | None = None,
                 data_dir=None, results_dir="results", overrides: dict | None = None,
                 teacher_run_id: str | None = None, device=None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """The chain methods (ta_chain, progressive, progressive_kd32; default: the preset's) per
    seed; the chain of seed s starts from the teacher of seed s."""
    spec = get_preset(preset)
    chain = list(spec.chain if chain is None else chain)
    methods = check_methods(spec.chain_methods if methods is None else methods, CHAIN_METHODS,
                            "notebook 02 / run_ta_chain")
    seeds = check_seeds(seeds)
    head = None
    if teacher_run_id is not None:
        record = find_record(results_dir, teacher_run_id)
        if record is None:
            raise ValueError(f"teacher_run_id={teacher_run_id!r} has no record in "
                             f"{results_dir}/runs")
        head = RunConfig.from_dict(record["config"])
        if len(seeds) > 1:
            raise ValueError("teacher_run_id fixes one teacher: give a single seed with it")
    plan = [cfg for s in seeds for m in methods
            for cfg in plan_chain(preset, model, s, chain, overrides, head, m)]
    return execute(plan, data_dir=data_dir, results_dir=results_dir, device=device,
                   progress=progress)


def run_students(*, preset: str = "smoke", model: str | None = None, seeds: Sequence[int] = (0,),
                 methods: Sequence[str] | None = None, bits: Sequence[BitsSpec] | None = None,
                 data_dir=None, results_dir="results", overrides: dict | None = None, device=None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """individual / finetune / direct_kd / direct_kd_matched at each bit width, per seed
    (teacher trained if needed)."""
    spec = get_preset(preset)
    methods = list(spec.methods if methods is None else methods)
    bits = list(spec.chain[1:] if bits is None else bits)
    plan = [cfg for s in check_seeds(seeds)
            for cfg in plan_students(preset, model, s, methods, bits, overrides)]
    return execute(plan, data_dir=data_dir, results_dir=results_dir, device=device,
                   progress=progress)


def plan_grid(*, preset: str = "smoke", model: str | None = None, seeds: Sequence[int] = (0,),
              chain: Sequence[BitsSpec] | None = None, chain_methods: Sequence[str] | None = None,
              methods: Sequence[str] | None = None,
              overrides: dict | None = None) -> list[RunConfig]:
    """Everything a comparison needs, per seed: teacher, the chain methods along the chain and
    every student method at the chain's widths, dependencies first, each run once."""
    spec = get_preset(preset)
    chain = list(spec.chain if chain is None else chain)
    chain_methods = check_methods(spec.chain_methods if chain_methods is None else chain_methods,
                                  CHAIN_METHODS, "notebook 02 / run_ta_chain")
    methods = list(spec.methods if methods is None else methods)
    check_chain(chain)
    plan = []
    for s in check_seeds(seeds):
        for m in chain_methods:
            plan += plan_chain(preset, model, s, chain, overrides, method=m)
        plan += plan_students(preset, model, s, methods, chain[1:], overrides)
    return unique_runs(plan)


def run_grid(*, data_dir=None, results_dir="results", device=None, progress: bool = True,
             **grid: Any) -> list[dict[str, Any]]:
    """Train :func:`plan_grid` (same keyword arguments) in order; returns every record."""
    return execute(plan_grid(**grid), data_dir=data_dir, results_dir=results_dir, device=device,
                   progress=progress)
