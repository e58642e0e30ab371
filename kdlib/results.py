"""Run records: one JSON file per trained model, the unit of truth of the workbook.

Layout under a results directory::

    runs/<run_id>.json          committed records
    checkpoints/<run_id>.pt     per-epoch training state (resumable; ignored by git, but for a
                                lease's paused runs, which `lease receive` stages)
    checkpoints/<run_id>.weights.pt  best-val weights, what later links start from / learn from
    models/<run_id>.packed           the same weights packed at their bit width (seed 0 and
                                     every teacher committed)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy
import pandas as pd
import torch

import kdlib
from kdlib.config import EXECUTION_ONLY_FIELDS, RunConfig
from kdlib.device import cpu_model
from kdlib.fileio import write_json_atomic
from kdlib.in_flight import inferred_in_flight

RECORD_VERSION = 1
GROUP_KEYS = ("model", "method", "w_bits", "a_bits")
METHOD_ORDER = ("individual", "finetune", "direct_kd", "direct_kd_matched", "progressive",
                "progressive_kd32", "ta_chain")  # the order of tables and figures


def in_method_order(methods) -> list[str]:
    """Tables' row order: the teacher, then METHOD_ORDER; a method it does not name goes last."""
    methods = set(methods)
    known = [m for m in ("teacher", *METHOD_ORDER) if m in methods]
    return known + sorted(methods - set(known))


def in_bits_order(labels) -> list:
    """Tables' column order: widest first, by the weight bits of a "w" or "w/a" label."""
    return sorted(set(labels), key=lambda b: -int(str(b).split("/")[0]))
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
# Fields that differ between the seeds of one setting: the seed and the run ids derived from it.
PER_SEED_FIELDS = ("seed", "teacher_id", "init_id")
# Fields that legitimately differ between two methods being compared at one bit width.
METHOD_FIELDS = ("method", "epochs", "lr", "warmup_epochs", "teacher_id", "init_id", "preset")
# (method, baseline, what the difference isolates): the chain's gain, attributed.
CONTRASTS = (
    ("ta_chain", "progressive_kd32", "assistant vs 32-bit teacher (same init path and budget)"),
    ("progressive_kd32", "direct_kd_matched", "stepping down vs jumping (same teacher and budget)"),
    ("ta_chain", "progressive", "what distillation adds along the chain"),
)
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


def packed_path(results_dir: str | os.PathLike, run_id: str) -> Path:
    """The best-val weights as integer codes at their bit width (kdlib.export.save_packed)."""
    return Path(results_dir) / "models" / f"{run_id}.packed"


def git_commit(here: Path | None = None) -> str | None:
    """Commit of the code that produced a record, '+dirty' when tracked files outside
    ``results/`` had changes (records and weights change while a grid runs; they are not the
    code). A copy of the tree (a lent GPU's) states it in ``$KDLIB_GIT_COMMIT``, which wins: the
    copy's own ``.git``, if any, can be older than its files (seen on the first H200 lease: the
    session's starting commit, so every record read '+dirty')."""
    stated = os.environ.get("KDLIB_GIT_COMMIT")
    if stated:
        return stated
    here = Path(__file__).resolve().parent if here is None else here
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top)", ":(top,exclude)results"], cwd=here,
                               capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()  # unknown is not clean
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


# The code a record states is the code that was imported, not whatever the tree holds when the
# record is written hours later: read once, when kdlib is first imported.
CODE_COMMIT = git_commit()


def environment_info() -> dict[str, Any]:
    import torchvision  # lazy: importing it takes about a second, which every CLI call paid

    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": numpy.__version__,
            "kdlib": kdlib.__version__,
        },
        "git_commit": CODE_COMMIT,
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
        raise ValueError(f"run record {path} is not valid JSON ({exc.msg} at line "
                         f"{exc.lineno})") from exc
    if not isinstance(record, dict) or "run_id" not in record or "config" not in record:
        raise ValueError(f"run record {path} lacks run_id/config: not a kdlib run record")
    version = record.get("record_version", 1)  # a hand-made record without one: the first
    if not (isinstance(version, int) and 1 <= version <= RECORD_VERSION):
        # a newer format may mean what this code would misread: refuse rather than guess
        raise ValueError(f"run record {path} has record_version {version!r}; this kdlib reads "
                         f"1 to {RECORD_VERSION}: update kdlib (git pull) to read it")
    return record


def find_record(results_dir: str | os.PathLike, run_id: str) -> dict[str, Any] | None:
    path = record_path(results_dir, run_id)
    return load_record(path) if path.exists() else None


def untrained(plan: Iterable, results_dir: str | os.PathLike) -> list:
    """The configs of ``plan`` (RunConfigs) whose run has no record in ``results_dir`` yet."""
    return [cfg for cfg in plan if find_record(results_dir, cfg.run_id()) is None]


def run_checkpoints(results_dir: str | os.PathLike) -> dict[str, Path]:
    """{run id: path} of the fit() checkpoints in ``results_dir`` (weight files aside)."""
    suffix = ".pt"
    return {p.name[:-len(suffix)]: p
            for p in sorted(Path(results_dir).glob(f"checkpoints/*{suffix}"))
            if not p.name.endswith(".weights.pt")}


def paused_checkpoints(results_dir: str | os.PathLike) -> dict[str, Path]:
    """The checkpoints of runs without a record: paused at a budget's end (or interrupted), so
    the next call resumes them; a finished run's checkpoint is not among them."""
    return {run_id: path for run_id, path in run_checkpoints(results_dir).items()
            if not record_path(results_dir, run_id).exists()}


PAUSED_FILE = "paused.json"  # committed: how far each paused run got, even with its checkpoint lost


def paused_epochs(results_dir: str | os.PathLike) -> dict[str, int]:
    """{run id: epochs done} of the runs paused with a checkpoint here."""
    from kdlib.checkpoints import epochs_done  # lazy: torch.load

    return {run_id: epochs_done(path)
            for run_id, path in sorted(paused_checkpoints(results_dir).items())}


def note_paused(results_dir: str | os.PathLike) -> dict[str, int]:
    """Write ``results_dir/paused.json``: :func:`paused_epochs`, so that a clone without the
    (ignored) checkpoints still says how far each paused run got. Returns it."""
    paused = paused_epochs(results_dir)
    path = Path(results_dir) / PAUSED_FILE
    path.write_text(json.dumps(paused, indent=1, sort_keys=True) + "\n")
    return paused


def noted_paused(results_dir: str | os.PathLike) -> dict[str, int]:
    """What the last :func:`note_paused` wrote ({} if none) less the runs that have a record
    since."""
    path = Path(results_dir) / PAUSED_FILE
    noted = json.loads(path.read_text()) if path.exists() else {}
    return {run_id: done for run_id, done in noted.items()
            if not record_path(results_dir, run_id).exists()}


def records_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run record: method, bits, seed and its metrics (what a pipeline returned)."""
    return pd.DataFrame([{"method": r["config"]["method"], "w_bits": r["config"]["w_bits"],
                          "a_bits": r["config"]["a_bits"], "seed": r["config"]["seed"],
                          **r["metrics"]} for r in records])


def setting_ids(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """run id -> a seed-free fingerprint of the run's whole setting: its config without
    :data:`PER_SEED_FIELDS`, plus (recursively) the settings of its teacher and init runs, so
    that, e.g., two chains reaching the same width never share one. A teacher or init run that
    is not among ``records`` stands in by its id without seed and hash."""
    by_id = {r["run_id"]: r for r in records}
    memo: dict[str, str] = {}

    def setting(run_id: str | None) -> str | None:
        if run_id is None:
            return None
        if run_id not in memo:
            record = by_id.get(run_id)
            if record is None:
                return run_id.rsplit("-s", 1)[0]
            cfg = {k: v for k, v in record["config"].items()
                   if k not in (*PER_SEED_FIELDS, *EXECUTION_ONLY_FIELDS)}
            cfg["teacher"] = setting(record["config"].get("teacher_id"))
            cfg["init"] = setting(record["config"].get("init_id"))
            memo[run_id] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
        return memo[run_id]

    return {run_id: setting(run_id) for run_id in by_id}


# history fields that depend on the machine and what else ran on it, not on the training
TIMING_FIELDS = ("seconds", "images_per_s", "side_by_side", "runs_in_flight")


def timed_epochs(record: dict[str, Any]) -> list[tuple[float, int | None]]:
    """(seconds, runs the grid allowed at once) of each epoch of a run: the ``--jobs`` its
    history row notes (fit's ``side_by_side``), else the record's (its last session's), else
    None. The budget scales epochs by these counts: the benchmark's per-process slowdown at the
    allowed count fits the committed runs better than at the count in flight (each of the 28
    H200 runs of 2026-12-04, estimated from the others: 1.41 times its time, median, none
    short, against 2.12, two short, with the counts of
    :func:`kdlib.in_flight.inferred_in_flight`; a test in tests/test_in_flight.py)."""
    return [(float(row.get("seconds", 0.0)), row.get("side_by_side") or record.get("side_by_side"))
            for row in record.get("history") or []]


def device_seconds(record: dict[str, Any], inferred: float | None = None) -> float | None:
    """A run's share of its device's time: each epoch's seconds over the runs in flight beside
    it then, itself included (the count its history row measured, fit's ``runs_in_flight``;
    else ``inferred``, see :func:`kdlib.in_flight.inferred_in_flight`; else the ``--jobs`` of
    :func:`timed_epochs`), the rest of its wall time (start-up, the test passes) over the mean
    count of its measured epochs, else ``inferred``, else the record's ``side_by_side``. None
    where no count is known."""
    wall = record.get("wall_time_s")
    history = record.get("history") or []
    epochs = [(seconds, row.get("runs_in_flight") or inferred or allowed)
              for row, (seconds, allowed) in zip(history, timed_epochs(record))]
    measured = [(seconds, beside) for row, (seconds, beside) in zip(history, epochs)
                if row.get("runs_in_flight")]
    measured_s = sum(seconds for seconds, _ in measured)
    rest = (sum(seconds * beside for seconds, beside in measured) / measured_s if measured_s
            else inferred or record.get("side_by_side"))
    if wall is None or not rest or not all(beside for _, beside in epochs):
        return None
    return (sum(seconds / beside for seconds, beside in epochs)
            + max(float(wall) - sum(seconds for seconds, _ in epochs), 0.0) / rest)


def load_results(results_dir: str | os.PathLike) -> pd.DataFrame:
    """All run records under ``results_dir/runs`` as one row each (config and metrics flattened).

    ``packed_bytes``: the record's size of its packed file, else that file's size where this
    checkout has it (records older than the field); ``packed_file``: whether it has it;
    ``trained_as``: the run whose file that is (``same_run_as``, else the run itself)."""
    rows = []
    records = load_records(results_dir)
    settings = setting_ids(records)
    inferred = inferred_in_flight(records)
    for record in records:
        row = {"run_id": record["run_id"], **record["config"], **record["metrics"],
               "setting": settings[record["run_id"]], "same_run_as": record.get("same_run_as"),
               "git_commit": record.get("git_commit"),
               "wall_time_s": record.get("wall_time_s"), "images_per_s": record.get("images_per_s"),
               "device": record.get("device"), "gpu": record.get("gpu"),
               "cpu_model": record.get("cpu_model"),
               "created_at": record.get("created_at"), "epochs_run": len(record["history"]),
               "side_by_side": record.get("side_by_side"),
               "device_time_s": device_seconds(record, inferred.get(record["run_id"]))}
        if isinstance(row.get("milestones"), list):  # hashable, so that it can be grouped on
            row["milestones"] = tuple(row["milestones"])
        # the run whose training (and so packed file) this is: its own, or the one it is
        # recorded as
        row["trained_as"] = record.get("same_run_as") or record["run_id"]
        packed = packed_path(results_dir, row["trained_as"])
        row["packed_file"] = packed.exists()  # in this checkout (seed 0's, teachers' committed)
        row["packed_bytes"] = (record.get("packed_bytes")
                               or (packed.stat().st_size if row["packed_file"] else None))
        size = record.get("model_size") or {}
        row["storage_bits"] = size.get("storage_bits")
        row["params"] = size.get("params")
        rows.append(row)
    columns = ["run_id", "model", "method", "w_bits", "a_bits", "seed", *METRIC_FIELDS]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["bits"] = bits_labels(frame)
    return frame


PUBLISHED = resources.files("kdlib.reference").joinpath("published.csv")


def load_published(model: str = "resnet20") -> pd.DataFrame:
    """Published CIFAR-100 top-1 numbers shipped with kdlib (see kdlib/reference/)."""
    with PUBLISHED.open() as handle:
        frame = pd.read_csv(handle)
    return frame[frame["model"] == model].reset_index(drop=True)


def drawn_from_digest(results_dir: str | os.PathLike) -> str:
    """sha256 of what a preset's figures are drawn from: every run record's file (name and
    bytes) and the published table. A figure stamped with another digest is stale."""
    digest = hashlib.sha256()
    for path in sorted(runs_dir(results_dir).glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(PUBLISHED.read_bytes())
    return digest.hexdigest()


def t_interval_halfwidth(std: float, n: int, confidence: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean; NaN for n < 2."""
    from scipy import stats  # lazy: a third of a second that most CLI calls never need

    if n < 2 or not math.isfinite(std):
        return float("nan")
    return float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * std / math.sqrt(n))


def _group_keys(frame: pd.DataFrame, by: Sequence[str] | None) -> list[str]:
    """``by``, or model/method/bits plus the setting fingerprint when the frame has one."""
    if by is not None:
        return list(by)
    return [*GROUP_KEYS, *(["setting"] if "setting" in frame.columns else [])]


def summarise(frame: pd.DataFrame, metric: str = "test_top1",
              by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, sample std, n and 95% t-interval of ``metric`` over seeds for each group.

    Groups are model, method and bits *and* the run's whole setting (the ``setting`` column of
    :func:`load_results`), so runs pool only when everything but the seed agrees.
    """
    by = _group_keys(frame, by)
    if frame.empty:
        return pd.DataFrame(columns=[*by, "mean", "std", "n", "ci95_low", "ci95_high"])
    grouped = frame.groupby(by, sort=True, dropna=False)[metric]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    half = [t_interval_halfwidth(s, int(n)) for s, n in zip(out["std"], out["n"])]
    out["ci95_low"] = out["mean"] - half
    out["ci95_high"] = out["mean"] + half
    ascending = [k not in ("w_bits", "a_bits") for k in by]
    return out.sort_values(by, ascending=ascending).reset_index(drop=True)


def load_records(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run record (with per-epoch history) under ``results_dir/runs``."""
    return [load_record(p) for p in sorted(runs_dir(results_dir).glob("*.json"))]


def paired_contrast(frame: pd.DataFrame, method: str, baseline: str,
                    metric: str = "test_top1") -> pd.DataFrame:
    """Per-seed difference ``method − baseline`` at the same model, bits and seed, summarised
    (mean, std, n, 95% t-interval of the differences) per bit width.

    Pairing by seed removes the between-seed variance that both runs share (same data order
    for the same seed), so the interval is that of the *difference*, not of each mean. The two
    runs of a pair must agree on every shared hyperparameter (all config fields but
    :data:`METHOD_FIELDS`); seeds that only one method has are left out. When one method has
    several settings at a bit width (say, two chains), the pairs would mix them: that is a
    ``ValueError`` naming them, never a silent pool.
    """
    # execution-only fields compute the same numbers, and records older than such a field
    # lack it (NaN), which would unpair them from a newer record of the same seed
    shared = [c for c in frame.columns
              if c in CONFIG_FIELDS and c not in (*METHOD_FIELDS, *EXECUTION_ONLY_FIELDS)]
    keys = list(dict.fromkeys(["model", "w_bits", "a_bits", "seed", *shared]))
    side_a = frame[frame["method"] == method]
    side_b = frame[frame["method"] == baseline]
    for side, name in ((side_a, method), (side_b, baseline)):
        if "setting" in side.columns:
            counts = side.groupby(keys, dropna=False)["setting"].nunique()
            if (counts > 1).any():
                raise ValueError(f"method {name!r} has several settings at "
                                 f"{counts[counts > 1].index.tolist()[:3]}: filter the frame to "
                                 "one setting before comparing (runs pool only when all but the "
                                 "seed agree)")
    merged = side_a.merge(side_b[[*keys, metric]].rename(columns={metric: "baseline"}),
                          on=keys, how="inner")
    merged["gain"] = merged[metric] - merged["baseline"]
    merged["contrast"] = f"{method} − {baseline}"
    return summarise(merged, metric="gain", by=[*GROUP_KEYS, "contrast"])


def paired_gain(frame: pd.DataFrame, baseline: str = "individual",
                metric: str = "test_top1") -> pd.DataFrame:
    """:func:`paired_contrast` of every method but the teacher against ``baseline``."""
    methods = [m for m in frame["method"].unique() if m not in (baseline, "teacher")]
    parts = [paired_contrast(frame, m, baseline, metric) for m in methods]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return summarise(frame.iloc[:0].assign(gain=[]), metric="gain", by=GROUP_KEYS)
    return (pd.concat(parts, ignore_index=True).drop(columns="contrast")
            .sort_values(list(GROUP_KEYS), ascending=[True, True, False, False])
            .reset_index(drop=True))


def chain_contrasts(frame: pd.DataFrame, metric: str = "test_top1") -> pd.DataFrame:
    """The three contrasts that attribute the chain's gain (:data:`CONTRASTS`), per bit width."""
    parts = [paired_contrast(frame, a, b, metric) for a, b, _ in CONTRASTS
             if {a, b} <= set(frame["method"])]
    parts = [p for p in parts if not p.empty]
    if not parts:  # the columns still, so that what reads them needs no special case
        return summarise(frame.iloc[:0].assign(gain=[], contrast=[]), metric="gain",
                         by=[*GROUP_KEYS, "contrast"])
    return pd.concat(parts, ignore_index=True)


def summary_table(frame: pd.DataFrame, metric: str = "test_top1") -> pd.DataFrame:
    """What summary.csv holds: :func:`summarise` per method, then the :data:`CONTRASTS` with
    their paired intervals (the contrast's name in the ``method`` column)."""
    contrasts = chain_contrasts(frame, metric)
    if contrasts.empty:
        return summarise(frame, metric)
    contrasts = contrasts.drop(columns="method").rename(columns={"contrast": "method"})
    return pd.concat([summarise(frame, metric), contrasts], ignore_index=True)


def difference_text(mean: float, low: float, high: float, n: int) -> str:
    """A paired difference as the README writes it: ``+1.00 [+0.50, +1.50]``, or ``+1.00``
    when there is no interval (one seed)."""
    return f"{mean:+.2f}" if n < 2 else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def seeds_label(counts: Iterable[int]) -> str:
    """How many seeds a set of paired differences rests on: ``n = 3``, or ``n = 2–3`` when the
    widths differ (a grid still filling in), so no width is credited with seeds it lacks."""
    counts = sorted({int(c) for c in counts})
    return f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}–{counts[-1]}"


def bits_label(w_bits: int, a_bits: int) -> str:
    """``"4"`` when weights and activations agree, else ``"4/8"``: a table column."""
    return f"{w_bits}" if w_bits == a_bits else f"{w_bits}/{a_bits}"


def bits_labels(frame: pd.DataFrame) -> list[str]:
    """:func:`bits_label` of each row of a frame with ``w_bits`` and ``a_bits`` columns."""
    return [bits_label(w, a) for w, a in zip(frame["w_bits"], frame["a_bits"])]


def shared_cells(frame: pd.DataFrame) -> set[tuple[str, str]]:
    """(method, bits label) cells whose every run is another method's training (same_run_as)."""
    if "same_run_as" not in frame.columns or frame.empty:
        return set()
    shared = frame.assign(bits=bits_labels(frame), alias=frame["same_run_as"].notna())
    alias = shared.groupby(["method", "bits"])["alias"].all()
    return {key for key, value in alias.items() if value}


def results_table(summary: pd.DataFrame,
                  marked: set[tuple[str, str]] = frozenset()) -> pd.DataFrame:
    """Method × bit-width table of 'mean ± std' strings (std shown only when n > 1); cells in
    ``marked`` (see :func:`shared_cells`) get a ``*``. A method with two settings at one bit
    width cannot share one cell: ValueError."""
    def cell(row: pd.Series) -> str:
        text = f"{row['mean']:.2f}"
        if row["n"] > 1:
            text += f" ± {row['std']:.2f}"
        return text + ("*" if (row["method"], row["bits"]) in marked else "")

    if summary.empty:
        return pd.DataFrame()
    s = summary.copy()
    s["bits"] = bits_labels(s)
    clash = s[s.duplicated(["method", "bits"], keep=False)]  # two models too: one cell
    if not clash.empty:
        first = clash.iloc[0]
        raise ValueError(f"method {first['method']!r} has "
                         f"{int((clash['method'] == first['method']).sum())} settings at "
                         f"{first['bits']} bits: one table shows one setting; filter "
                         "the runs (e.g. by their `setting` column) first, or keep each "
                         "variant or model in a results folder of its own (--results-dir)")
    s["cell"] = s.apply(cell, axis=1)
    table = s.pivot_table(index="method", columns="bits", values="cell", aggfunc="first")
    return table.reindex(index=in_method_order(table.index),
                         columns=in_bits_order(s["bits"])).fillna("")
