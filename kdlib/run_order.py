"""In which order a grid's runs start: dependencies first (a run after its teacher and init
runs, an alias after the run that trains it), runs paused at a budget's end resumed, and
what other runs wait for first, then, under a budget, the shortest by its time estimate (the
most records by the end), without one the one with the most epochs (the soonest end for runs
side by side). The serial loop (:func:`kdlib.experiments.execute`) and the processes
executor share it, so that one budget starts runs in the same order whichever trains them
(one at a time, fewer may fit); Ray, which takes no budget, is handed its tasks longest first
(:func:`submission_order`)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence

from kdlib.budget import Budget, RunTimer
from kdlib.config import RunConfig
from kdlib.results import find_record, paused_checkpoints, paused_epochs
from kdlib.trained import TrainedIndex


def resume_first(plan: Sequence[RunConfig], results_dir: str | os.PathLike) -> list[RunConfig]:
    """``plan`` with the runs that have a checkpoint but no record (paused or interrupted)
    first, otherwise in order: what was started before goes on before anything new starts
    (their teacher and init runs have records already, so no dependency is put after its
    user). Without a budget, the serial loop's order; under one, :func:`start_order`'s ties."""
    paused = paused_checkpoints(results_dir)
    return sorted(plan, key=lambda cfg: cfg.run_id() not in paused)


def dependency_schedule(plan: Sequence[RunConfig],
                        results_dir: str | os.PathLike) -> list[tuple[RunConfig, list[str]]]:
    """Each planned run without a record, in plan order, with the planned run ids its task
    waits for: its teacher and init runs and, for a run another planned run trains under
    another name, that run (the choice :func:`kdlib.experiments.execute` makes)."""
    index = TrainedIndex(results_dir)
    planned: set[str] = set()
    schedule = []
    for cfg in unique_runs(plan):
        run_id = cfg.run_id()
        if find_record(results_dir, run_id) is not None:
            continue
        after = [d for d in (cfg.teacher_id, cfg.init_id) if d in planned]
        trained_as = index.claim(cfg)
        if trained_as != run_id and trained_as in planned:
            after.append(trained_as)
        planned.add(run_id)
        schedule.append((cfg, list(dict.fromkeys(after))))
    return schedule


def unblocking_first(schedule: Sequence[tuple[RunConfig, list[str]]],
                     work_left: Callable[[RunConfig], float], *, longest_first: bool = False
                     ) -> list[tuple[RunConfig, list[str]]]:
    """``schedule`` (as :func:`dependency_schedule` gives it) in the order runs should start:
    first the runs that other runs wait for, the one holding back the heaviest line of
    training first (a paused teacher, then a chain's first link); then the rest, the shortest
    first, so that a budget (a lease) ends with the most records and what it leaves is long
    runs, which pause and continue; or, ``longest_first`` (no budget, several runs at once),
    the longest first, so that the last runs to end are short ones and the call ends sooner
    (a long run started last keeps one worker busy while the others idle). A run's weight is
    the training it has left (``work_left``: :func:`work_left_in`, epochs or estimated seconds;
    nothing for one that waits for the run it is recorded as).
    Ties keep the order given (paused runs first, then plan order: :func:`resume_first`). Not a
    dependency order (a run that waits for another may come first): a run starts only once
    what it waits for is done (:func:`start_order` for one run at a time)."""
    waits_for_me: dict[str, list[str]] = {}
    own: dict[str, float] = {}
    for cfg, after in schedule:
        run_id = cfg.run_id()
        own[run_id] = 0 if waits_as_alias(cfg, after) else max(work_left(cfg), 0)
        for dep in after:
            waits_for_me.setdefault(dep, []).append(run_id)
    held_back: dict[str, float] = {}  # the heaviest line of training that waits for a run
    for cfg, _ in reversed(schedule):  # in dependency_schedule's order, dependents come later
        run_id = cfg.run_id()
        held_back[run_id] = max((own[d] + held_back[d] for d in waits_for_me.get(run_id, ())),
                                default=0)
    sign = -1 if longest_first else 1
    return sorted(schedule, key=lambda item: (-held_back[item[0].run_id()],
                                              sign * own[item[0].run_id()]))


def epochs_left_in(results_dir: str | os.PathLike) -> Callable[[RunConfig], int]:
    """A run's epochs still to train: all of them, less what its paused checkpoint holds."""
    done = paused_epochs(results_dir)
    return lambda cfg: cfg.epochs - done.get(cfg.run_id(), 0)


def seconds_left_in(results_dir: str | os.PathLike,
                    timer: RunTimer) -> Callable[[RunConfig], float]:
    """A run's estimated seconds still to train (``timer``'s estimate for the epochs its paused
    checkpoint leaves): a KD epoch, which runs the teacher too, weighs more than a CE one of the
    same data. A run without an estimate weighs as infinitely long: under a budget it cannot
    start anyway (:meth:`kdlib.budget.Budget.admit`)."""
    done = paused_epochs(results_dir)

    def seconds(cfg: RunConfig) -> float:
        estimate = timer.estimate(cfg, done.get(cfg.run_id(), 0)).seconds
        return math.inf if estimate is None else estimate
    return seconds


def work_left_in(results_dir: str | os.PathLike,
                 budget: Budget | None) -> Callable[[RunConfig], float]:
    """The weight :func:`unblocking_first` orders by: under a ``budget``, the seconds it
    estimates (:func:`seconds_left_in`: the shortest first, for the most records by its end);
    without one, the epochs (:func:`epochs_left_in`: no estimate needed)."""
    if budget is None:
        return epochs_left_in(results_dir)
    return seconds_left_in(results_dir, budget.timer)


def waits_as_alias(cfg: RunConfig, after: list[str]) -> bool:
    """Whether ``cfg`` waits (in :func:`dependency_schedule`) for a run of this call that it
    will be recorded as: it trains nothing itself."""
    return bool(set(after) - {cfg.teacher_id, cfg.init_id})


def unique_runs(plan: Iterable[RunConfig]) -> list[RunConfig]:
    """``plan`` with one config per run id, the first of each, in order."""
    seen: dict[str, RunConfig] = {}
    for cfg in plan:
        seen.setdefault(cfg.run_id(), cfg)
    return list(seen.values())


def start_order(plan: Sequence[RunConfig], results_dir: str | os.PathLike,
                work_left: Callable[[RunConfig], float] | None = None) -> list[RunConfig]:
    """``plan`` (one config per run id) in the order one run at a time starts it under a
    budget, as :func:`kdlib.executors.execute_processes` with ``jobs=1`` does: the runs with a
    record first (nothing to train), then :func:`submission_order`'s. ``work_left``:
    :func:`work_left_in` the results and the budget (default: the epochs)."""
    to_train = [cfg for cfg, _ in submission_order(plan, results_dir, work_left)]
    training = {cfg.run_id() for cfg in to_train}
    return [cfg for cfg in unique_runs(plan) if cfg.run_id() not in training] + to_train


def submission_order(plan: Sequence[RunConfig], results_dir: str | os.PathLike,
                     work_left: Callable[[RunConfig], float] | None = None, *,
                     longest_first: bool = False) -> list[tuple[RunConfig, list[str]]]:
    """The runs still to train, with what each waits for (:func:`dependency_schedule`), in
    the order they start one at a time: again and again, the first run in
    :func:`unblocking_first`'s order that waits for no run still to come. Every run comes
    after what it waits for, so Ray is handed its tasks in this order (each task takes the
    results of those it waits for); Ray promises no order of its own. ``longest_first``: as
    :func:`unblocking_first`."""
    waiting = unblocking_first(dependency_schedule(resume_first(plan, results_dir), results_dir),
                               work_left or epochs_left_in(results_dir),
                               longest_first=longest_first)
    started: set[str] = set()
    ordered = []
    while waiting:
        ready = next(i for i, (_, after) in enumerate(waiting) if started.issuperset(after))
        cfg, after = waiting.pop(ready)
        started.add(cfg.run_id())
        ordered.append((cfg, after))
    return ordered
