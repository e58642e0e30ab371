"""Executors of a planned grid beyond the serial loop of :func:`kdlib.experiments.execute`.

:func:`execute_processes` runs several runs at once in worker processes of one machine (a lent
GPU without Ray), with the same dependencies and an optional time budget.

:func:`execute_ray` hands the whole plan to Ray at once: one task per run that has no record
yet, each depending (through its ObjectRefs) on the tasks of its teacher and init runs, each
calling :func:`kdlib.experiments.train_run` into the shared results folder. What makes that safe
is train_run's own: the per-run lock (a second worker waits, then finds the record), the
per-epoch checkpoint (a retried task resumes where the killed one stopped) and atomic record
writes. Ray retries a task whose worker died (``max_retries``), not one that raised.

Two planned runs that are one training under two method names (same training key, see
:func:`kdlib.trained.training_key`) are scheduled as :func:`execute` would run them: the
first in plan order trains, the other's task waits for it and then records ``same_run_as``.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import functools
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kdlib.budget import Admission, Budget, Deadline
from kdlib.config import RunConfig
from kdlib.data import load_splits
from kdlib.experiments import (budget_admission, check_writable, done_line, start_line,
                               train_run)
from kdlib.run_order import (dependency_schedule, resume_first, submission_order,
                             unblocking_first, unique_runs, waits_as_alias, work_left_in)
from kdlib.trained import TrainedIndex
from kdlib.results import find_record
from kdlib.tblog import TENSORBOARD_ENV
from kdlib.train import RunSuspended

EXECUTORS = ("serial", "processes", "ray")
RAY_INSTALL = "pip install -e '.[ray]'"


class MissingExtraError(ImportError):
    """The chosen executor needs an optional dependency that is not installed."""


class GridRunError(RuntimeError):
    """Some runs of the grid failed; the message names each with its error."""


def import_ray():
    """The ``ray`` module, or MissingExtraError naming the install command."""
    try:
        import ray  # lazy: an optional extra (about 240 MB) that only --executor ray needs
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise MissingExtraError(f"--executor ray needs Ray, which is not installed: "
                                f"{RAY_INSTALL}") from None
    return ray


def check_resources(cpus_per_run: int, gpus_per_run: float, max_retries: int,
                    device: str | None) -> None:
    """ValueError naming a resource request Ray could not honour, before anything starts."""
    if isinstance(cpus_per_run, bool) or not isinstance(cpus_per_run, int) or cpus_per_run < 1:
        raise ValueError(f"cpus_per_run={cpus_per_run!r} is invalid; expected an integer >= 1 "
                         "(it is also each run's torch thread count)")
    if not 0 <= gpus_per_run or (gpus_per_run > 1 and gpus_per_run != int(gpus_per_run)):
        raise ValueError(f"gpus_per_run={gpus_per_run!r} is invalid; expected 0, a fraction in "
                         "(0, 1] (runs sharing one GPU) or a whole number")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries={max_retries!r} is invalid; expected an integer >= 0")
    if device is not None and str(device).startswith("cuda") and gpus_per_run == 0:
        raise ValueError(f"device={device!r} with gpus_per_run=0: a run must reserve the GPU it "
                         "uses; pass --gpus-per-run (e.g. 1, or 0.5 for two runs per GPU)")


@functools.lru_cache(maxsize=2)
def _splits(data_dir: str | None, seed: int, val_size: int, train_size: int | None,
            test_size: int | None):
    """The data of a run, loaded once per worker process and split (workers are reused)."""
    return load_splits(data_dir, val_size=val_size, train_size=train_size, test_size=test_size,
                       seed=seed)


# a process pool's count of the runs its workers are training now, shared with each worker
# (:func:`_share_in_flight`): a run notes it epoch by epoch (``runs_in_flight`` of
# :func:`kdlib.train.fit`), its measured share of the device; None outside such a worker
_in_flight = None


def _share_in_flight(counter) -> None:
    """A pool worker's initializer: keep the pool's count of runs in flight."""
    global _in_flight
    _in_flight = counter


@contextlib.contextmanager
def _counted_in_flight():
    """While a run trains in this worker, it counts in the pool's runs in flight; yields the
    function that reads the count (None outside a counting pool)."""
    counter = _in_flight
    if counter is None:
        yield None
        return
    with counter.get_lock():
        counter.value += 1
    try:
        yield lambda: counter.value
    finally:
        with counter.get_lock():
            counter.value -= 1


def _train_task(config: dict[str, Any], data_dir: str | None, results_dir: str,
                device: str | None, threads: int, tensorboard: bool | None, *after: Any,
                deadline: Deadline | None = None, side_by_side: int | None = None) -> str:
    """One run in a worker (Ray's or a process pool's). ``after``: the results of the tasks it
    waited for (unused: Ray starts this task only once they are done). ``tensorboard``: None
    leaves the choice to the worker's environment, as in the serial loop."""
    torch.set_num_threads(threads)
    if tensorboard is not None:
        os.environ[TENSORBOARD_ENV] = "1" if tensorboard else "0"
    cfg = RunConfig.from_dict(config)
    data = _splits(data_dir, cfg.split_seed, cfg.val_size, cfg.train_size, cfg.test_size)
    with _counted_in_flight() as runs_in_flight:
        return train_run(cfg, data, results_dir, device=device, progress=False,
                         deadline=deadline, side_by_side=side_by_side,
                         runs_in_flight=runs_in_flight)["run_id"]


def execute_ray(plan: Sequence[RunConfig], *, data_dir: str | os.PathLike | None = None,
                results_dir: str | os.PathLike = "results", device: str | None = None,
                address: str | None = None, cpus_per_run: int = 1, gpus_per_run: float = 0.0,
                max_retries: int = 3, tensorboard: bool | None = None,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train ``plan`` as Ray tasks; returns every planned run's record, in plan order.

    ``address``: None starts a local Ray instance on this machine (shut down at the end),
    ``"auto"`` or ``HOST:PORT`` joins a running cluster; when Ray is already initialised in
    this process, that instance is used. Every node must see ``results_dir`` (and the data)
    at the same path. ``cpus_per_run`` is also each run's torch thread count. Runs that
    reserve no GPU train on the CPU (Ray leaves every GPU visible to them).
    """
    ray = import_ray()
    check_resources(cpus_per_run, gpus_per_run, max_retries, device)
    if gpus_per_run == 0:
        device = "cpu"
    results_dir = str(Path(results_dir).resolve())
    data_dir = str(Path(data_dir).resolve()) if data_dir else None
    check_writable(results_dir)
    schedule = submission_order(plan, results_dir, longest_first=True)  # Ray has no budget
    log(f"ray: {len(schedule)} of {len(unique_runs(plan))} planned runs to train "
        f"({cpus_per_run} CPU, {gpus_per_run:g} GPU per run)")
    started_here = not ray.is_initialized()
    if started_here:
        local = address is None and not os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({"include_dashboard": False} if local else {}))
    try:
        train = ray.remote(_train_task)
        refs: dict[str, Any] = {}
        for cfg, after in schedule:
            refs[cfg.run_id()] = train.options(
                num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries,
                name=f"train {cfg.run_id()}",
            ).remote(cfg.to_dict(), data_dir, results_dir, device, cpus_per_run, tensorboard,
                     *(refs[d] for d in after))
        _wait_for_all(ray, refs, log, results_dir)
    finally:
        if started_here:
            ray.shutdown()
    return [find_record(results_dir, cfg.run_id()) for cfg in plan]


def _wait_for_all(ray, refs: dict[str, Any], log: Callable[[str], None],
                  results_dir: str) -> None:
    """Report each run as it finishes (:func:`done_line`, from the record it wrote);
    GridRunError naming every failed run at the end (a run whose teacher or init run failed
    fails with that run's error)."""
    pending = {ref: run_id for run_id, ref in refs.items()}
    failed: dict[str, str] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        run_id = pending.pop(ready[0])
        try:
            ray.get(ready[0])  # the run id
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            first_line = (str(cause).strip().splitlines() or [""])[0]
            failed[run_id] = f"{type(cause).__name__}: {first_line}"
            log(f"[{len(refs) - len(pending)}/{len(refs)}] FAILED {run_id}: {failed[run_id]}")
        else:
            record = find_record(results_dir, run_id)
            log(f"[{len(refs) - len(pending)}/{len(refs)}] {done_line(run_id, record)}")
    if failed:
        detail = "; ".join(f"{run_id}: {error}" for run_id, error in failed.items())
        raise GridRunError(f"{len(failed)} of {len(refs)} runs failed on Ray: {detail}")


def execute_processes(plan: Sequence[RunConfig], *, jobs: int,
                      data_dir: str | os.PathLike | None = None,
                      results_dir: str | os.PathLike = "results", device: str | None = None,
                      threads: int = 1, tensorboard: bool | None = None,
                      budget: Budget | None = None,
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train ``plan`` with up to ``jobs`` runs at once in worker processes of this machine
    (several small runs share one GPU better than one run uses it); for a lent machine without
    Ray. Dependencies as :func:`execute_ray` (:func:`~kdlib.run_order.dependency_schedule`);
    a run is started once its teacher and init runs have records, in
    :func:`~kdlib.run_order.unblocking_first`'s order (then the shortest by estimated time
    under a ``budget``, else the most epochs: :func:`~kdlib.run_order.work_left_in`), and,
    under a ``budget``, only as
    :func:`kdlib.experiments.execute` starts it (a run paused at the budget's end resumes in
    the next call). Returns the records that exist at the end, in plan order."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is invalid; expected an integer >= 1")
    results_dir = str(Path(results_dir).resolve())
    data_dir = str(Path(data_dir).resolve()) if data_dir else None
    check_writable(results_dir)
    index = TrainedIndex(results_dir)  # runs trained before this call, for aliases of them
    waiting = unblocking_first(dependency_schedule(resume_first(plan, results_dir), results_dir),
                               work_left_in(results_dir, budget), longest_first=budget is None)
    log(f"processes: {len(waiting)} of {len(unique_runs(plan))} planned runs to train, "
        f"{jobs} at a time, {threads} thread(s) each; what others wait for first, then the "
        + ("shortest" if budget is not None else "longest"))
    running: dict[futures.Future, str] = {}
    done: set[str] = set()
    failed: dict[str, str] = {}
    left_out: list[str] = []
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked into workers
    in_flight = context.Value("i", 0)  # what each run measures beside it (_counted_in_flight)

    def new_pool() -> futures.ProcessPoolExecutor:
        in_flight.value = 0  # a broken pool's workers are gone, and their counts with them
        return futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                           initializer=_share_in_flight, initargs=(in_flight,))

    pool = new_pool()
    try:
        while waiting or running:
            for cfg, after in list(waiting):
                if len(running) >= jobs:
                    break
                if any(d in failed or d in left_out for d in after):
                    waiting.remove((cfg, after))
                    left_out.append(cfg.run_id())
                    log(f"not started {cfg.run_id()}: a run it needs did not finish")
                    continue
                if not all(d in done for d in after):
                    continue
                waiting.remove((cfg, after))
                admission = _admission(cfg, after, budget, index, results_dir)
                if admission is not None and not admission.start:
                    left_out.append(cfg.run_id())
                    log(f"not started {cfg.run_id()}: {admission.why}")
                    continue
                log(start_line(cfg, admission))
                task = functools.partial(_train_task, cfg.to_dict(), data_dir, results_dir, device,
                                         threads, tensorboard, side_by_side=jobs,
                                         deadline=admission and admission.deadline)
                try:
                    future = pool.submit(task)
                except futures.BrokenExecutor:  # a worker died (killed, out of memory): the
                    pool.shutdown(wait=True)  # pool's runs failed (reported below), others go on
                    pool = new_pool()
                    future = pool.submit(task)
                running[future] = cfg.run_id()
            if not running:
                continue
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                run_id = running.pop(future)
                try:
                    future.result()
                except RunSuspended as paused:
                    left_out.append(run_id)
                    log(f"paused {paused}")
                    continue
                except Exception as exc:  # noqa: BLE001 - reported with the others below
                    failed[run_id] = (f"{type(exc).__name__}: "
                                      f"{(str(exc).strip().splitlines() or [''])[0]}")
                    log(f"FAILED {run_id}: {failed[run_id]}")
                    continue
                done.add(run_id)
                record = find_record(results_dir, run_id)
                if budget is not None:
                    budget.timer.add(record)
                log(done_line(run_id, record))
    finally:
        pool.shutdown(wait=True)
    if left_out:
        log(f"budget: {len(left_out)} run(s) left for the next call; finished runs are skipped "
            "then, paused ones resume")
    if failed:
        detail = "; ".join(f"{run_id}: {error}" for run_id, error in failed.items())
        raise GridRunError(f"{len(failed)} runs failed: {detail}")
    return [r for r in (find_record(results_dir, cfg.run_id()) for cfg in plan) if r is not None]


def _admission(cfg: RunConfig, after: list[str], budget: Budget | None, index: TrainedIndex,
               results_dir: str) -> Admission | None:
    """Whether ``cfg`` may start under ``budget``; None for no budget or an alias: of a run of
    this call (listed in ``after`` besides its teacher and init) or of an earlier one."""
    if budget is None or waits_as_alias(cfg, after):
        return None
    return budget_admission(cfg, budget, index, results_dir)
