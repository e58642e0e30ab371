"""Keep the README's numbers true: its results and benchmark blocks are rendered from files.

``python -m kdlib readme`` rewrites the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers; a test fails when the committed README and the committed
result files disagree.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path

import pandas as pd

from kdlib.bench.render import render_markdown
from kdlib.config import describe_fields
from kdlib.results import load_published, load_results, results_table, summarise


def _markdown(frame: pd.DataFrame, index: bool = True) -> str:
    return frame.to_markdown(index=index, disable_numparse=True)  # keep "4.30", not 4.3


def render_results(results_dir: str | os.PathLike) -> str:
    """Markdown: test top-1 per method × bit width, the teacher, cost and machine of the runs."""
    frame = load_results(results_dir)
    if frame.empty:
        return f"_No run records in `{results_dir}` yet: `make run` creates them._"
    summary = summarise(frame)
    table = results_table(summary)
    table.index.name = "method \\ bits"
    teacher = frame[frame["method"] == "teacher"]
    first = frame.iloc[0]
    seeds = sorted(frame["seed"].unique())
    devices = sorted(frame["device"].dropna().unique())
    hours = frame["wall_time_s"].sum() / 3600
    size = (f"{int(first['train_size'])} training images (class-balanced subset)"
            if pd.notna(first.get("train_size")) else "all 45,000 training images")
    lines = [
        _markdown(table),
        "",
        f"Test top-1 (%) at the epoch of best validation accuracy; {first['model']}, preset "
        f"`{first['preset']}`, seed(s) {', '.join(map(str, seeds))} "
        f"({'mean ± std over seeds' if len(seeds) > 1 else 'one seed: no error bars'}). "
        f"Teacher: {teacher['test_top1'].mean():.2f}% after {int(teacher['epochs'].iloc[0])} epochs; "
        f"students: {int(frame[frame['method'] != 'teacher']['epochs'].iloc[0])} epochs each; "
        f"{size}, {int(first['val_size'])} validation images, "
        f"{'the full 10,000' if pd.isna(first.get('test_size')) else int(first['test_size'])} test images. "
        f"{len(frame)} runs, {hours:.2f} h of training summed over runs, {_span_hours(results_dir):.2f} h "
        f"from the first run's start to the last run's end, on {', '.join(devices)} "
        f"(host {_hosts(results_dir)}).",
    ]
    dirty = frame["git_commit"].fillna("").str.endswith("+dirty") if "git_commit" in frame else None
    if dirty is not None and dirty.any():
        lines += ["", f"**{int(dirty.sum())} of {len(frame)} runs were made from a modified working "
                  "tree** (their `git_commit` ends in `+dirty`): the code they ran is not exactly "
                  "any commit."]
    lines += ["", "Published numbers for the same network (`kdlib/reference/published.csv`, full training "
              "sets and schedules; liao2020 chose its epoch on the **test** set, which flatters it, "
              "RepDistiller reports the last epoch):", "",
              _markdown(published_table(str(first["model"])))]
    return "\n".join(lines)


def published_table(model: str) -> pd.DataFrame:
    """The published top-1 per source/method × bit width, in the README's column order."""
    pub = load_published(model)
    pub = pub[pub["w_bits"] == pub["a_bits"]]
    table = pub.pivot_table(index=["source", "method"], columns="w_bits", values="top1", aggfunc="first")
    table = table.reindex(columns=sorted(table.columns, reverse=True))
    table.columns = [str(c) for c in table.columns]
    table.index = [f"{s} {m}" for s, m in table.index]
    table.index.name = "source method \\ bits"
    return table.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")


def _span_hours(results_dir: str | os.PathLike) -> float:
    """Wall-clock hours from the earliest run start (end minus its wall time) to the last end."""
    starts, ends = [], []
    for path in (Path(results_dir) / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        end = dt.datetime.fromisoformat(record["created_at"])
        ends.append(end)
        starts.append(end - dt.timedelta(seconds=record["call_seconds"]))
    return (max(ends) - min(starts)).total_seconds() / 3600


def _hosts(results_dir: str | os.PathLike) -> str:
    hosts = set()
    for path in (Path(results_dir) / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        hosts.add(f"{record.get('host')}, {record.get('cpu_count')} CPUs, torch {record.get('versions', {}).get('torch')}")
    return "; ".join(sorted(hosts))


def _bench_date(path: Path) -> dt.datetime:
    """The ``date`` a benchmark file says it was measured at (UTC when it names no zone)."""
    try:
        date = dt.datetime.fromisoformat(json.loads(path.read_text())["date"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"benchmark file {path} has no readable 'date' (ISO 8601, as `make bench` "
                         f"writes it): {type(exc).__name__}: {exc}") from None
    return date if date.tzinfo else date.replace(tzinfo=dt.timezone.utc)


def newest_bench_file(bench_dir: str | os.PathLike) -> Path | None:
    """The benchmark measured last, by the ``date`` inside each file; same date: the last file
    name. File times say nothing here: a checkout or a copy sets them."""
    dated = [(_bench_date(path), path.name, path) for path in Path(bench_dir).glob("*.json")]
    return max(dated)[2] if dated else None


def render_bench(bench_dir: str | os.PathLike) -> str:
    """Markdown table of the newest benchmark file in ``bench_dir`` (see newest_bench_file)."""
    newest = newest_bench_file(bench_dir)
    if newest is None:
        return "_No benchmark yet: `make bench` creates one._"
    return render_markdown(json.loads(newest.read_text()))


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(\n<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def render_config_fields() -> str:
    """The README's list of RunConfig fields, from the comments beside them in kdlib/config.py."""
    frame = pd.DataFrame(describe_fields()).set_index("field")
    frame["default"] = [f"`{v}`" for v in frame["default"]]
    return _markdown(frame)


def render_readme(readme: str, results_dir, bench_dir) -> str:
    text = replace_block(readme, "results", render_results(results_dir))
    text = replace_block(text, "config", render_config_fields())
    return replace_block(text, "bench", render_bench(bench_dir))
