"""What a preset's grid costs on this kind of machine, from the rates its records measured.

A record's ``wall_time_s`` covers its whole run (training, validation every epoch, the test
pass), so training images × epochs over it is an all-in rate. Rates are kept per model and
per kind of step (with or without a teacher's forward pass): the 1-epoch KD links of the
quick grid pay their evaluation once per epoch, and that is what a grid is made of.

Rates are kept per processor too (a record's ``cpu_model``, its GPU for a run on one; records
older than that field are "an unrecorded CPU"): a preset's estimate is for the processor of
the newest trained record of its model, the machine the workbook last trained that model on
(a machine that trained only the other model has no rate for it), and every machine's rates
are listed beside them.
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from kdlib.budget import train_images, training_images
from kdlib.config import RunConfig
from kdlib.markdown import markdown_table
from kdlib.run_order import unique_runs
from kdlib.trained import TrainedIndex

# SqueezeNet's training-step time over ResNet-20's, used until SqueezeNet records exist:
# 3.27 (fp32) and 3.38 (4-bit), 1 thread, batch 128, channels_last, on the 2-core VM.
SQUEEZENET_TIME_RATIO = 3.3
REFERENCE_MODEL = "resnet20"


def trainings(plan: Sequence[RunConfig]) -> list[RunConfig]:
    """The runs of ``plan`` that train: one per training under several names (the grid's
    ``same_run_as`` aliases, found by the same training key)."""
    index = TrainedIndex()
    return [cfg for cfg in unique_runs(plan) if index.claim(cfg) == cfg.run_id()]


def plan_trainings(preset: str, seeds: Sequence[int] | None = None) -> tuple[int, list[RunConfig]]:
    """(runs in the preset's grid, the runs that train)."""
    from kdlib.experiments import plan_grid
    from kdlib.presets import get_preset

    plan = plan_grid(preset=preset, seeds=list(seeds or get_preset(preset).seeds))
    return len(plan), trainings(plan)


UNRECORDED_CPU = "an unrecorded CPU"


def processor(frame: pd.DataFrame) -> pd.Series:
    """What trained each record: ``an <GPU>`` for a run on a GPU (its host's CPU did not set
    its speed, and an H100's host may be an H200's model), else its ``cpu_model``."""
    cpus = (frame["cpu_model"] if "cpu_model" in frame
            else pd.Series(None, index=frame.index, dtype=object)).fillna(UNRECORDED_CPU)
    if "gpu" not in frame or "device" not in frame:
        return cpus
    on_gpu = frame["device"].astype(str).str.startswith("cuda") & frame["gpu"].notna()
    return cpus.where(~on_gpu, "an " + frame["gpu"].astype(str))


def _trained(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    runs = frame[frame["same_run_as"].isna()] if "same_run_as" in frame else frame
    runs = runs[runs["wall_time_s"].fillna(0) > 0]
    return runs.assign(cpu=processor(runs))


def machines(frame: pd.DataFrame) -> list[str]:
    """The processors that trained ``frame``'s runs, the one of the newest record first."""
    runs = _trained(frame)
    if runs.empty:
        return []
    order = runs.sort_values("created_at", na_position="first") if "created_at" in runs else runs
    return list(dict.fromkeys(reversed(order["cpu"].tolist())))


def machine_for(frame: pd.DataFrame, model: str) -> str | None:
    """The processor of the newest trained record of ``model`` (else of the reference model,
    whose rate a model without records borrows: :func:`_rate`); None without either."""
    for name in (model, REFERENCE_MODEL):
        cpus = machines(frame[frame["model"] == name]) if not frame.empty else []
        if cpus:
            return cpus[0]
    return None


def measured_rates(frame: pd.DataFrame, cpu: str | None = None, *,
                   side_by_side: int | None = None) -> dict[tuple[str, bool], float]:
    """{(model, kd): training images × epochs per wall second of a run} over the trained records
    of processor ``cpu`` (default: the newest record's; see the module doc). With
    ``side_by_side``: per second of the device instead, each run's wall time divided by the
    runs in flight beside it (``device_time_s`` of :func:`kdlib.results.device_seconds`:
    measured epoch by epoch where its record says, else inferred from the overlap of its
    device's records; else its record's ``side_by_side``; this number where it has none), so
    that runs timed 4 at a time and runs timed 12 at a time pool."""
    runs = _trained(frame)
    if runs.empty:
        return {}
    runs = runs[runs["cpu"] == (cpu or machines(frame)[0])]
    images = [training_images(t, v) * e
              for t, v, e in zip(runs["train_size"], runs["val_size"], runs["epochs"])]
    runs = runs.assign(image_epochs=images, kd=runs["teacher_id"].notna())
    if side_by_side is not None:
        beside = (runs["side_by_side"] if "side_by_side" in runs
                  else pd.Series(None, index=runs.index, dtype=float))
        shared = runs["wall_time_s"] / beside.fillna(side_by_side)
        if "device_time_s" in runs:
            shared = pd.to_numeric(runs["device_time_s"]).combine_first(shared)
        runs = runs.assign(wall_time_s=shared)
    sums = runs.groupby(["model", "kd"])[["image_epochs", "wall_time_s"]].sum()
    return {(model, bool(kd)): row["image_epochs"] / row["wall_time_s"]
            for (model, kd), row in sums.iterrows()}


def _rate(rates: dict, model: str, kd: bool) -> tuple[float | None, str]:
    if (model, kd) in rates:
        return rates[(model, kd)], "measured"
    if model == "squeezenet" and (REFERENCE_MODEL, kd) in rates:
        return rates[(REFERENCE_MODEL, kd)] / SQUEEZENET_TIME_RATIO, "scaled"
    return None, "none"


def grid_cost(preset: str, rates: dict[tuple[str, bool], float]) -> dict[str, Any]:
    """Runs, trainings, training images × epochs and the run-hours they take at ``rates``
    (None when a kind of run has no rate)."""
    runs, trainings = plan_trainings(preset)
    image_epochs = [train_images(cfg) * cfg.epochs for cfg in trainings]
    hours, bases = 0.0, set()
    for cfg, amount in zip(trainings, image_epochs):
        rate, basis = _rate(rates, cfg.model, cfg.teacher_id is not None)
        if rate is None:
            hours = None
            break
        hours += amount / rate / 3600
        bases.add(basis)
    return {"preset": preset, "model": trainings[0].model, "runs": runs, "trained": len(trainings),
            "seeds": len({cfg.seed for cfg in trainings}), "image_epochs": sum(image_epochs),
            "run_hours": hours, "basis": bases}


def _amount(n: float) -> str:
    return f"{n / 1e6:,.2f} M" if n >= 1e6 else f"{n:,.0f}"


def _rates_text(rates: dict[tuple[str, bool], float]) -> str:
    return ", ".join(f"{model} {'KD' if kd else 'CE'} {rate:.0f}"
                     for (model, kd), rate in sorted(rates.items()))


def render_costs(presets: Sequence[str], frame: pd.DataFrame, jobs: int = 2) -> str:
    """Markdown: one row per preset, estimated from ``frame``'s records (see module doc)."""
    from kdlib.presets import get_preset

    cpus = machines(frame)
    rows = []
    for preset in presets:
        cpu = machine_for(frame, get_preset(preset).model)
        cost = grid_cost(preset, measured_rates(frame, cpu) if cpu else {})
        hours = cost["run_hours"]
        if hours is None:
            estimate = "no measured rate for this model"
        else:
            wall = f"≈ {hours / jobs:,.1f} h with `--jobs {jobs}`"
            if cost["seeds"] > 1:
                wall += f", {hours / jobs / cost['seeds']:,.1f} h a seed"
            estimate = (f"{hours * 60:.1f} run-minutes" if hours < 1 else
                        f"{hours:,.1f} run-hours ({wall})")
            if "scaled" in cost["basis"]:
                estimate += f", SqueezeNet at ResNet-20's rate / {SQUEEZENET_TIME_RATIO}"
        rows.append({"preset": f"`{preset}`", "model": cost["model"], "runs (trained)":
                     f"{cost['runs']} ({cost['trained']})",
                     "training images × epochs": _amount(cost["image_epochs"]),
                     "estimated cost": estimate, "at the rates of": cpu or "none"})
    table = markdown_table(pd.DataFrame(rows), index=False)
    if not cpus:
        return (f"{table}\n\nRates (training images × epochs per wall second of a run, evaluation "
                "included) measured by the committed records: none yet.")
    each = "; ".join(f"on {cpu}: {_rates_text(measured_rates(frame, cpu))}" for cpu in cpus)
    return (f"{table}\n\nRates (training images × epochs per wall second of a run, evaluation "
            f"included) measured by the committed records, newest processor first (a row's "
            f"estimate is at the rates of the newest processor that trained its model): {each}.")


def render_device_costs(presets: Sequence[str], frame: pd.DataFrame, jobs: int,
                        lease_minutes: float) -> str:
    """Markdown sentence: what ``presets`` cost on the device whose records ``frame`` holds, at
    their all-in rates per second of the device (:func:`measured_rates` with ``side_by_side``;
    ``jobs`` for records that do not say), in device hours and leases of ``lease_minutes`` of
    training. Only runs trained on a GPU count (a preset's runs may also have trained on a
    CPU, whose rates are not the device's)."""
    if "device" in frame:
        frame = frame[frame["device"].astype(str).str.startswith("cuda")]
    rates = measured_rates(frame, side_by_side=jobs)
    if not rates:
        return "_No GPU records yet to estimate the grids' cost from._"
    parts = []
    for preset in presets:
        cost = grid_cost(preset, rates)  # its "run_hours" are device hours at these rates
        if cost["run_hours"] is None:
            parts.append(f"`{preset}`: no measured rate for its runs")
            continue
        device_h = cost["run_hours"]
        seeds = cost["seeds"]
        leases = max(round(device_h * 60 / lease_minutes / seeds), 1)
        parts.append(f"`{preset}` ({cost['runs']} runs, {cost['trained']} trained, "
                     f"{_amount(cost['image_epochs'])} training images × epochs): "
                     f"≈ {device_h:,.1f} h of the device"
                     + (f", {device_h / seeds:,.1f} h a seed" if seeds > 1 else "")
                     + f", about {leases:,} lease{'s' if leases > 1 else ''} of "
                     f"{lease_minutes:g} training minutes" + (" a seed" if seeds > 1 else ""))
    return (f"What the GPU grids cost at the all-in rates of these records ({_rates_text(rates)} "
            "training images × epochs per second of the device: each run's wall time divided by "
            "the runs in flight beside it, itself included, as its record measured them, else "
            "as the records of its device overlap in time, at most the grid's `--jobs` (which "
            "older records note instead: a teacher that trained alone while its students waited "
            f"counted as sharing the device), else {jobs}; start-up and evaluation included, so "
            "long runs will beat it): " + "; ".join(parts) + ".")
