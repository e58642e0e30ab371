"""Run records: one JSON file per trained model, the unit of truth of the workbook.

Layout under a results directory::

    runs/<run_id>.json          committed records
    checkpoints/<run_id>.pt     per-epoch training state (resumable, not committed)
    checkpoints/<run_id>.weights.pt  best-val weights, what later links start from / learn from
"""
from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy
import pandas as pd
import torch
import torchvision
from scipy import stats

import kdlib
from kdlib.fileio import write_json_atomic

RECORD_VERSION = 1
METRIC_FIELDS = ("best_epoch", "best_val_top1", "best_val_top5", "test_top1", "test_top5",
                 "final_test_top1", "final_test_top5")


def runs_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "runs"


def record_path(results_dir: str | os.PathLike, run_id: str) -> Path:
    return runs_dir(results_dir) / f"{run_id}.json"


def checkpoint_path(results_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(results_dir) / "checkpoints" / f"{run_id}.pt"


def weights_path(results_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(results_dir) / "checkpoints" / f"{run_id}.weights.pt"


def git_commit() -> str | None:
    """Commit of the code that produced a record, '+dirty' when the tree had changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def environment_info() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": numpy.__version__,
            "kdlib": kdlib.__version__,
        },
        "git_commit": git_commit(),
    }


def save_record(results_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write one run record atomically; returns its path."""
    missing = [k for k in ("run_id", "config", "metrics", "history") if k not in record]
    if missing:
        raise ValueError(f"run record lacks field(s) {missing}")
    path = record_path(results_dir, record["run_id"])
    write_json_atomic(path, {"record_version": RECORD_VERSION, **record})
    return path


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path) as handle:
            record = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"run record {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(record, dict) or "run_id" not in record or "config" not in record:
        raise ValueError(f"run record {path} lacks run_id/config: not a kdlib run record")
    return record


def find_record(results_dir: str | os.PathLike, run_id: str) -> dict[str, Any] | None:
    path = record_path(results_dir, run_id)
    return load_record(path) if path.exists() else None


def records_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run record: method, bits, seed and its metrics (what a pipeline returned)."""
    return pd.DataFrame([{"method": r["config"]["method"], "w_bits": r["config"]["w_bits"],
                          "a_bits": r["config"]["a_bits"], "seed": r["config"]["seed"],
                          **r["metrics"]} for r in records])


def load_results(results_dir: str | os.PathLike) -> pd.DataFrame:
    """All run records under ``results_dir/runs`` as one row each (config and metrics flattened)."""
    rows = []
    for path in sorted(runs_dir(results_dir).glob("*.json")):
        record = load_record(path)
        row = {"run_id": record["run_id"], **record["config"], **record["metrics"],
               "wall_time_s": record.get("wall_time_s"), "images_per_s": record.get("images_per_s"),
               "device": record.get("device"), "epochs_run": len(record["history"])}
        size = record.get("model_size") or {}
        row["storage_bits"] = size.get("storage_bits")
        row["params"] = size.get("params")
        rows.append(row)
    columns = ["run_id", "model", "method", "w_bits", "a_bits", "seed", *METRIC_FIELDS]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["bits"] = frame["w_bits"].astype(str).where(frame["w_bits"] == frame["a_bits"],
                                                       frame["w_bits"].astype(str) + "/" + frame["a_bits"].astype(str))
    return frame


def load_published(model: str = "resnet20") -> pd.DataFrame:
    """Published CIFAR-100 top-1 numbers shipped with kdlib (see kdlib/reference/)."""
    with resources.files("kdlib.reference").joinpath("published.csv").open() as handle:
        frame = pd.read_csv(handle)
    return frame[frame["model"] == model].reset_index(drop=True)


def t_interval_halfwidth(std: float, n: int, confidence: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean; NaN for n < 2."""
    if n < 2 or not math.isfinite(std):
        return float("nan")
    return float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * std / math.sqrt(n))


def summarise(frame: pd.DataFrame, metric: str = "test_top1",
              by: tuple[str, ...] = ("model", "method", "w_bits", "a_bits")) -> pd.DataFrame:
    """Mean, sample std, n and 95% t-interval of ``metric`` over seeds for each group."""
    if frame.empty:
        return pd.DataFrame(columns=[*by, "mean", "std", "n", "ci95_low", "ci95_high"])
    grouped = frame.groupby(list(by), sort=True)[metric]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    half = [t_interval_halfwidth(s, int(n)) for s, n in zip(out["std"], out["n"])]
    out["ci95_low"] = out["mean"] - half
    out["ci95_high"] = out["mean"] + half
    return out.sort_values(list(by), ascending=[True, True, False, False][: len(by)]).reset_index(drop=True)


def load_records(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run record (with per-epoch history) under ``results_dir/runs``."""
    return [load_record(p) for p in sorted(runs_dir(results_dir).glob("*.json"))]


def paired_gain(frame: pd.DataFrame, baseline: str = "individual",
                metric: str = "test_top1") -> pd.DataFrame:
    """Per-seed difference of each method to ``baseline`` at the same model/bits/seed.

    Pairing by seed removes the between-seed variance that both runs share (same data order
    for the same seed), so the interval is that of the *difference*, not of each mean.
    """
    keys = ["model", "w_bits", "a_bits", "seed"]
    base = frame[frame["method"] == baseline][keys + [metric]].rename(columns={metric: "baseline"})
    others = frame[~frame["method"].isin([baseline, "teacher"])]
    merged = others.merge(base, on=keys, how="inner")
    merged["gain"] = merged[metric] - merged["baseline"]
    return summarise(merged, metric="gain")


def results_table(summary: pd.DataFrame, teacher: pd.DataFrame | None = None) -> pd.DataFrame:
    """Method × bit-width table of 'mean ± std' strings (std shown only when n > 1)."""
    def cell(row: pd.Series) -> str:
        text = f"{row['mean']:.2f}"
        if row["n"] > 1:
            text += f" ± {row['std']:.2f}"
        return text

    if summary.empty:
        return pd.DataFrame()
    s = summary.copy()
    s["bits"] = [f"{w}" if w == a else f"{w}/{a}" for w, a in zip(s["w_bits"], s["a_bits"])]
    s["cell"] = s.apply(cell, axis=1)
    order = sorted(s["bits"].unique(), key=lambda b: -int(str(b).split("/")[0]))
    table = s.pivot_table(index="method", columns="bits", values="cell", aggfunc="first")
    table = table.reindex(columns=order)
    method_order = [m for m in ("teacher", "individual", "finetune", "direct_kd", "ta_chain")
                    if m in table.index]
    return table.reindex(method_order).fillna("")
