"""How many runs shared a device while one trained, for records that did not measure it.

A run trained by the processes executor notes, epoch by epoch, the runs in flight beside it
(``runs_in_flight`` of :func:`kdlib.train.fit`). Older records note only the grid's ``--jobs``
(``side_by_side``): the most that could run at once, not what did. A teacher trains alone while
its students wait, and a grid's last runs finish with fewer beside them, so that count
over-states a run's sharing and flatters the rate of the device (wall time over the count).

:func:`inferred_in_flight` recovers the count from when the records say their runs trained: a
run's last call spans ``[created_at - call_seconds, created_at]``; the runs of one device (same
host, same GPU or processor) whose spans overlap it were in flight beside it.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from kdlib.device import record_device_kind

# a resumed run's wall time includes earlier calls, whose spans its record does not give
ONE_CALL = 0.95


def _span(record: dict[str, Any]) -> tuple[float, float] | None:
    """The wall-clock span of a record's last call, or None where it cannot be told (an alias,
    no timestamps, or a run resumed across calls)."""
    if record.get("same_run_as") or not record.get("created_at"):
        return None
    call, wall = record.get("call_seconds"), record.get("wall_time_s")
    if not call or not wall or call < ONE_CALL * wall:
        return None
    end = dt.datetime.fromisoformat(record["created_at"]).timestamp()
    return end - float(call), end


def mean_overlap(span: tuple[float, float], others: Sequence[tuple[float, float]]) -> float:
    """The time-weighted number of ``others`` (``span`` itself among them) whose spans cover
    the moments of ``span``."""
    start, end = span
    if end <= start:
        return 1.0
    cuts = sorted({start, end, *(t for s, e in others for t in (s, e) if start < t < end)})
    covered = 0.0
    for a, b in zip(cuts, cuts[1:]):
        middle = (a + b) / 2
        covered += (b - a) * sum(1 for s, e in others if s <= middle < e)
    return max(covered / (end - start), 1.0)


def inferred_in_flight(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """run_id → the mean number of runs in flight while it trained (itself included), inferred
    from overlapping spans, for each trained record with a ``side_by_side`` above 1, no measured
    count and a span to tell (:func:`_span`); never above its ``side_by_side`` (the grid ran no
    more at once: a larger overlap is another grid on a machine of the same name). Only the
    records given are seen: runs of another results folder beside them are not counted."""
    records = list(records)
    # one device: one host's GPU (by name) or processor
    spans = {r["run_id"]: ((r.get("host"), record_device_kind(r)), _span(r)) for r in records}
    by_device: dict[tuple, list[tuple[float, float]]] = {}
    for device, span in spans.values():
        if span is not None:
            by_device.setdefault(device, []).append(span)
    inferred = {}
    for record in records:
        device, span = spans[record["run_id"]]
        allowed = record.get("side_by_side")
        measured = any("runs_in_flight" in row for row in record.get("history") or [])
        if span is None or not allowed or allowed <= 1 or measured:
            continue
        inferred[record["run_id"]] = min(mean_overlap(span, by_device[device]), float(allowed))
    return inferred
