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

from kdlib.bench.concurrent import worth_running
from kdlib.bench.render import render_markdown
from kdlib.budget import training_images
from kdlib.checkout import shown_path
from kdlib.config import describe_fields
from kdlib.results import (CONTRASTS, bits_label, bits_labels, chain_contrasts, difference_text,
                           in_bits_order, in_method_order, load_published, load_results,
                           packed_path, results_table, seeds_label, shared_cells, summarise)
from kdlib.costs import processor, render_costs
from kdlib.export.agreement import render_onnx_agreement
from kdlib.export.packed import header_size
from kdlib.markdown import markdown_table
from kdlib.verdict import (contrast_verdicts, epochs_text, is_same_run, render_agreement,
                           render_answer, same_run_widths)

COST_PRESETS = ("quick", "quick_squeezenet", "paper")  # the README's cost table


def _epochs_sentence(frame: pd.DataFrame) -> str:
    """How long each kind of run trained, read from the records."""
    def epochs_of(methods) -> list[int]:
        return sorted(int(e) for e in frame.loc[frame["method"].isin(methods), "epochs"].unique())

    teacher = frame[frame["method"] == "teacher"]
    parts = [f"Teacher: {teacher['test_top1'].mean():.2f}% after "
             f"{epochs_text(teacher['epochs'])}"] if not teacher.empty else []
    individual = frame[frame["method"] == "individual"]
    if not individual.empty:
        same = not teacher.empty and set(individual["epochs"]) == set(teacher["epochs"]) \
            and set(individual["lr"]) == set(teacher["lr"])
        parts.append(f"`individual`: {epochs_text(individual['epochs'])}"
                     + (" (the teacher's own schedule: the fair trained-alone baseline)"
                        if same else ""))
    link = epochs_of([m for m in frame["method"].unique()
                      if m not in ("teacher", "individual", "direct_kd_matched")])
    if link:
        parts.append(f"every other student: {', '.join(map(str, link))} epoch(s) per chain link")
    if (frame["method"] == "direct_kd_matched").any():
        parts.append("`direct_kd_matched`: k times that at the chain's k-th width (the chain's "
                     "student budget down to that width)")
    return "; ".join(parts)


def _contrast_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Contrast × bits table of 'mean [low, high]' (95% paired interval; n in the row name), or
    'same run' where both sides are one training (:func:`kdlib.verdict.same_run_widths`)."""
    contrasts = chain_contrasts(frame)
    if contrasts.empty:
        return pd.DataFrame()
    contrasts = contrasts.assign(bits=bits_labels(contrasts))

    contrasts["same"] = is_same_run(contrasts, same_run_widths(frame))
    # one training under both names: 0 by construction, no finding (nor seeds of one)
    contrasts["cell"] = ["same run" if r.same else
                         difference_text(r.mean, r.ci95_low, r.ci95_high, r.n)
                         for r in contrasts.itertuples()]
    table = contrasts.pivot_table(index="contrast", columns="bits", values="cell", aggfunc="first")
    order = in_bits_order(contrasts["bits"])
    names = [f"{a} − {b}" for a, b, _ in CONTRASTS if f"{a} − {b}" in table.index]
    table = table.reindex(index=names, columns=order).fillna("")
    compared = contrasts[~contrasts["same"]].groupby("contrast")["n"]
    table.index = [f"{name} ({seeds_label(compared.get_group(name))})"
                   if name in compared.groups else name for name in table.index]
    table.index.name = "contrast \\ bits"
    return table


def _dirty_lines(frame: pd.DataFrame, trained: pd.DataFrame) -> list[str]:
    """How many trained runs came from a modified working tree (counted once: a record shown
    under a second name carries its run's commit)."""
    def dirty(rows: pd.DataFrame) -> int:
        return int(rows["git_commit"].fillna("").str.endswith("+dirty").sum())

    if not dirty(frame):
        return []
    names = (f"; {dirty(frame)} of the {len(frame)} records, counting each name a run is shown "
             "under" if dirty(frame) != dirty(trained) else "")
    return ["", f"**{dirty(trained)} of {len(trained)} trained runs were made from a modified "
            f"working tree** (their `git_commit` ends in `+dirty`{names}): the code they ran is "
            "not exactly any commit."]


def render_results(results_dir: str | os.PathLike) -> str:
    """Markdown: test top-1 per method × bit width, the chain's contrasts, cost and machine."""
    frame = load_results(results_dir)
    if frame.empty:
        return f"_No run records in `{shown_path(results_dir)}` yet: `make run` creates them._"
    summary = summarise(frame)
    marked = shared_cells(frame)
    table = results_table(summary, marked)
    table.index.name = "method \\ bits"
    first = frame.iloc[0]
    seeds = sorted(frame["seed"].unique())
    devices = sorted(frame["device"].dropna().unique())
    trained = frame[frame["same_run_as"].isna()] if "same_run_as" in frame else frame
    hours = trained["wall_time_s"].sum() / 3600
    images = training_images(first.get("train_size"), first["val_size"])
    size = (f"{images} training images (class-balanced subset)"
            if pd.notna(first.get("train_size")) else f"All {images:,} training images")
    lines = [
        markdown_table(table),
        "",
        f"Test top-1 (%) at the epoch of best validation accuracy; {first['model']}, preset "
        f"`{first['preset']}`, seed(s) {', '.join(map(str, seeds))} "
        f"({'mean ± std over seeds' if len(seeds) > 1 else 'one seed: no error bars'}). "
        f"{_epochs_sentence(frame)}. "
        f"{size}, {int(first['val_size'])} validation images, "
        f"{'the full 10,000' if pd.isna(first.get('test_size')) else int(first['test_size'])} "
        f"test images. {len(frame)} records of {len(trained)} trained runs, {hours:.2f} h of "
        f"training summed over runs ({_seed_hours(trained)}), on {', '.join(devices)} (host "
        f"{_hosts(results_dir)}).",
    ]
    coverage = _seed_coverage(frame)
    if coverage:
        lines += ["", coverage]
    if marked:
        lines += ["", "\\* The same training run as another method's at that width (same "
                  "initialisation, teacher, loss and epochs): trained once, shown under each name "
                  "(`same_run_as` in its record)."]
    contrasts = _contrast_table(frame)
    if not contrasts.empty:
        lines += ["", "Where the chain's gain comes from: paired (by seed) differences in test "
                  "top-1 points, mean [95% interval] (an interval needs two seeds or more; "
                  "_same run_: one training under both names, no comparison):", "",
                  markdown_table(contrasts)]
    if "git_commit" in frame:
        lines += _dirty_lines(frame, trained)
    published = published_table(str(first["model"]))
    if published.empty:
        lines += ["", f"No published numbers for {first['model']} in "
                  "`kdlib/reference/published.csv`."]
    else:
        lines += ["", "Published numbers for the same network "
                  "(`kdlib/reference/published.csv`, full training sets and schedules; liao2020 "
                  "chose its epoch on the **test** set, which flatters it, RepDistiller reports "
                  "the last epoch):", "", markdown_table(published)]
    return "\n".join(lines)


def published_table(model: str) -> pd.DataFrame:
    """The published top-1 per source/method × bit width, in the README's column order."""
    pub = load_published(model)
    pub = pub[pub["w_bits"] == pub["a_bits"]]
    table = pub.pivot_table(index=["source", "method"], columns="w_bits", values="top1",
                            aggfunc="first")
    table = table.reindex(columns=sorted(table.columns, reverse=True))
    table.columns = [str(c) for c in table.columns]
    table.index = [f"{s} {m}" for s, m in table.index]
    table.index.name = "source method \\ bits"
    return table.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")


def _seed_coverage(frame: pd.DataFrame) -> str:
    """A sentence naming the seeds of each method (or of each of its widths, where they differ)
    when not every cell has the same ones: a cell's mean ± std is over the seeds it has, and the
    reader should know which."""
    per_cell = frame.groupby(["method", "bits"])["seed"].agg(lambda s: tuple(sorted(s.unique())))
    if per_cell.nunique() <= 1:
        return ""
    groups: dict[tuple, list[str]] = {}
    for method in in_method_order(per_cell.index.get_level_values("method")):
        by_bits = per_cell[method]
        if by_bits.nunique() == 1:
            groups.setdefault(by_bits.iloc[0], []).append(f"`{method}`")
            continue
        widths: dict[tuple, list[str]] = {}
        for bits in in_bits_order(by_bits.index):
            widths.setdefault(by_bits[bits], []).append(bits)
        for seeds, labels in widths.items():
            groups.setdefault(seeds, []).append(f"`{method}` at bits {', '.join(labels)}")
    parts = [f"seed(s) {', '.join(map(str, seeds))} for {', '.join(names)}"
             for seeds, names in sorted(groups.items(), key=lambda g: (-len(g[0]), g[0]))]
    return ("Not every cell has every seed (a cell is over the seeds it has; a contrast pairs "
            f"only the seeds both sides have): {'; '.join(parts)}.")


def _seed_hours(trained: pd.DataFrame) -> str:
    """Each seed's training time summed over its runs, and the processor(s) it ran on (the
    GPU, for a run on one)."""
    trained = trained.assign(cpu=processor(trained))
    parts = []
    for seed, runs in trained.groupby("seed"):
        per_cpu = runs.groupby("cpu")["wall_time_s"].sum().sort_values(ascending=False) / 3600
        where = (f"on {per_cpu.index[0]}" if len(per_cpu) == 1 else
                 "(" + "; ".join(f"{h:.2f} h on {cpu}" for cpu, h in per_cpu.items()) + ")")
        parts.append(f"seed {seed}: {per_cpu.sum():.2f} h {where}")
    return "; ".join(parts)


def _hosts(results_dir: str | os.PathLike) -> str:
    hosts = set()
    for path in (Path(results_dir) / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        hosts.add(f"{record.get('host')}, {record.get('cpu_count')} CPUs, torch "
                  f"{record.get('versions', {}).get('torch')}")
    return "; ".join(sorted(hosts))


def _bench_date(path: Path) -> dt.datetime:
    """The ``date`` a benchmark file says it was measured at (UTC when it names no zone)."""
    try:
        date = dt.datetime.fromisoformat(json.loads(path.read_text())["date"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"benchmark file {path} has no readable 'date' (ISO 8601, as `make bench` "
                         f"writes it): {type(exc).__name__}: {exc}") from None
    return date if date.tzinfo else date.replace(tzinfo=dt.timezone.utc)


def newest_bench_file(bench_dir: str | os.PathLike, gpu: bool = False) -> Path | None:
    """The CPU (or, with ``gpu``, GPU) benchmark measured last, by the ``date`` inside each file;
    same date: the last file name. File times say nothing here: a checkout or a copy sets them."""
    dated = [(_bench_date(path), path.name, path) for path in Path(bench_dir).glob("*.json")
             if _is_gpu_bench(path) == gpu]
    return max(dated)[2] if dated else None


def _is_gpu_bench(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("machine", {}).get("gpu"))
    except (json.JSONDecodeError, AttributeError):
        return False


def render_bench(bench_dir: str | os.PathLike, gpu: bool = False) -> str:
    """Markdown table of the newest CPU (or, with ``gpu``, GPU) benchmark file in ``bench_dir``
    (see newest_bench_file)."""
    newest = newest_bench_file(bench_dir, gpu=gpu)
    if newest is None:
        return ("_No GPU benchmark yet: a lease's `python -m kdlib lease go` creates one._" if gpu
                else "_No benchmark yet: `make bench` creates one._")
    return render_markdown(json.loads(newest.read_text()))


def missing_runs(results_dir: str | os.PathLike, preset: str, model: str | None = None
                 ) -> dict[int, tuple[int, dict[str, list[tuple[str, int | None, int]]]]]:
    """{seed: (planned runs, {method: [(bits label, epochs done or None, epochs), ...]})} of the
    preset's planned grid runs without a record; epochs done for a run paused at a lease's end
    (``paused.json``, which `lease receive` writes)."""
    from kdlib.experiments import plan_grid  # lazy: experiments imports the training stack
    from kdlib.presets import get_preset
    from kdlib.results import noted_paused, untrained

    paused = noted_paused(results_dir)
    plan = plan_grid(preset=preset, model=model, seeds=list(get_preset(preset).seeds))
    unfinished = {cfg.run_id() for cfg in untrained(plan, results_dir)}
    missing: dict[int, tuple[int, dict[str, list[tuple[str, int | None, int]]]]] = {}
    for cfg in plan:
        planned, methods = missing.get(cfg.seed, (0, {}))
        missing[cfg.seed] = (planned + 1, methods)
        if cfg.run_id() in unfinished:
            methods.setdefault(cfg.method, []).append(
                (bits_label(cfg.w_bits, cfg.a_bits), paused.get(cfg.run_id()) or None, cfg.epochs))
    return missing


def _missing_label(bits: str, done: int | None, epochs: int) -> str:
    return bits + (f" (paused at epoch {done} of {epochs})" if done else "")


def _missing_text(missing: dict[int, tuple[int, dict[str, list[tuple[str, int | None, int]]]]]
                  ) -> str:
    """One clause a seed: all its runs (and how far the paused ones got), or which ones by
    method."""
    parts = []
    for seed, (planned, methods) in missing.items():
        count = sum(len(v) for v in methods.values())
        if count == planned:
            paused = [f"{method} {_missing_label(*run)}" for method, runs in methods.items()
                      for run in runs if run[1]]
            parts.append(f"seed {seed}: all {planned}"
                         + (f", of which {'; '.join(paused)}" if paused else ""))
        elif count:
            parts.append(f"seed {seed}: " + "; ".join(
                f"{method} {', '.join(_missing_label(*run) for run in runs)}"
                for method, runs in methods.items()))
    return ". ".join(parts)


# the figures of notebook 04 that a grid's block shows once drawn: (file, what it shows)
BLOCK_FIGURES = (
    ("chain_contrasts.png", "the chain's three paired contrasts per bit width, with 95% "
                            "intervals; * where the call stands under Holm's correction"),
    ("accuracy_vs_bits.png", "test top-1 per method and bit width, with the published numbers "
                             "faint"),
)


def figure_links(results_dir: str | os.PathLike, preset: str, model: str) -> list[str]:
    """Markdown image links to the :data:`BLOCK_FIGURES` drawn in ``results_dir/figures``
    (none before notebook 04 has run there; `readme --check` fails once they are older than
    the records)."""
    folder = Path(results_dir) / "figures"
    return [f"![{model}, preset {preset}: {what}]({shown_path(folder / name)})"
            for name, what in BLOCK_FIGURES if (folder / name).exists()]


def render_progress(results_dir: str | os.PathLike, preset: str) -> list[str]:
    """Markdown lines: a lease-filled grid's results as they come in, its answer so far (once
    the chain and a control share a width), its figures once drawn, and the runs still
    missing."""
    missing = missing_runs(results_dir, preset)
    planned = sum(n for n, _ in missing.values())
    left = sum(len(v) for _, methods in missing.values() for v in methods.values())
    frame = load_results(results_dir)
    lines = [render_results(results_dir) if not frame.empty
             else f"_No `{preset}` run yet (`{shown_path(results_dir)}`)._", ""]
    if not frame.empty and not contrast_verdicts(frame).empty:  # the answer as it fills
        lines += [render_answer(frame), ""]
    figures = [] if frame.empty else figure_links(results_dir, preset, frame["model"].iloc[0])
    if figures:
        lines += [*figures, ""]
    if left:
        lines.append(f"Still missing, {left} of {planned} runs of preset `{preset}`: "
                     f"{_missing_text(missing)}.")
    else:
        lines.append(f"Every run of preset `{preset}` has a record.")
    return lines


def render_gpu(results_dir: str | os.PathLike, bench_dir: str | os.PathLike,
               preset: str = "gpu", beside: str | os.PathLike | None = None) -> str:
    """Markdown: the GPU grid's results as they come in, the runs still missing, whether it
    answers as the grid in ``beside`` (the same network on a smaller budget) does, and the
    newest GPU benchmark."""
    lines = render_progress(results_dir, preset)
    if beside is not None:
        lines += ["", render_agreement(load_results(beside), load_results(results_dir))]
    newest = newest_bench_file(bench_dir, gpu=True)
    bench = json.loads(newest.read_text()) if newest else {}
    jobs = worth_running(bench.get("concurrency"))
    from kdlib.costs import render_device_costs
    from kdlib.budget import LEASE_TRAINING_MINUTES

    lines += ["", render_device_costs([preset, "paper"], load_results(results_dir), jobs,
                                      LEASE_TRAINING_MINUTES)]
    lines += ["", "GPU benchmark:", "", render_bench(bench_dir, gpu=True)]
    return "\n".join(lines)


def _block(name: str = r"\w+") -> re.Pattern:
    """A generated block: groups start line, name, body, end line."""
    return re.compile(rf"(<!-- ({name}):start -->\n)(.*?)(\n<!-- \2:end -->)", re.S)


def replace_block(text: str, name: str, body: str) -> str:
    pattern = _block(re.escape(name))
    if not pattern.search(text):
        raise ValueError(f"README has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(4), text)


def changed_blocks(old: str, new: str) -> list[str]:
    """Names of the generated blocks (``<!-- name:start -->``) whose text differs between two
    READMEs, in the order ``old`` has them."""
    before, after = ({m.group(2): m.group(3) for m in _block().finditer(text)}
                     for text in (old, new))
    return [name for name in before if before[name] != after.get(name)]


def render_packed_models(results_dir: str | os.PathLike, seed: int = 0) -> str:
    """Markdown: the committed packed weights files of one seed, size per method × bits (KiB),
    and what the header takes of the smallest (:func:`_header_share`)."""
    frame = load_results(results_dir)
    if frame.empty or not frame["packed_file"].any():
        return (f"_No packed models in `{shown_path(results_dir)}/models` yet: `make run` "
                "writes them._")
    rows = frame[(frame["seed"] == seed) & frame["packed_file"]]
    alias = rows["trained_as"] != rows["run_id"]  # another method's run: its file, not one more
    rows = rows.assign(kib=[f"{b / 1024:.1f}" + ("*" if a else "")
                            for b, a in zip(rows["packed_bytes"], alias)])
    table = rows.pivot_table(index="method", columns="bits", values="kib", aggfunc="first")
    table = table.reindex(index=in_method_order(table.index),
                          columns=in_bits_order(table.columns)).fillna("")
    table.index.name = "KiB: method \\ bits"
    marked = (["", "\\* Not a file of its own: the same training run as another method's at that "
               "width (`same_run_as`), whose file it is."] if alias.any() else [])
    return "\n".join([markdown_table(table), *marked, *_header_share(results_dir, rows)])


def _header_share(results_dir: str | os.PathLike, rows: pd.DataFrame) -> list[str]:
    """The sentence on what the smallest files spend on their header, read from one of them
    (nothing where it is no packed file)."""
    if rows.empty:
        return []
    smallest = rows.sort_values(["w_bits", "packed_bytes"]).iloc[0]
    try:
        header = header_size(packed_path(results_dir, smallest["trained_as"]))
    except ValueError:
        return []
    return ["", f"In a {smallest['bits']}-bit file, preamble and header (model, run id, tensor "
                f"table) take {header / 1024:.1f} KiB, "
                f"{100 * header / smallest['packed_bytes']:.0f}% of it."]


def render_config_fields() -> str:
    """The README's list of RunConfig fields, from the comments beside them in kdlib/config.py."""
    frame = pd.DataFrame(describe_fields()).set_index("field")
    frame["default"] = [f"`{v}`" for v in frame["default"]]
    return markdown_table(frame)


def render_answer_block(results_dir: str | os.PathLike) -> str:
    """Markdown: the answer paragraph of :mod:`kdlib.verdict` for the records in ``results_dir``."""
    frame = load_results(results_dir)
    if frame.empty:
        return f"_No run records in `{shown_path(results_dir)}` yet._"
    return render_answer(frame)


def stale_readme_figures(readme: str, root: str | os.PathLike) -> dict[Path, list[Path]]:
    """{results folder: its figures the README shows that were not drawn from its records as
    they are now (or are missing)}, for each ``results/<preset>/figures/*.png`` the README links
    whose folder holds records (:func:`kdlib.plots.stale_figures`)."""
    from kdlib.plots import stale_figures  # lazy: matplotlib

    linked: dict[Path, list[str]] = {}
    for folder, name in re.findall(r"\]\((results/[\w.-]+)/figures/([\w.-]+\.png)\)", readme):
        linked.setdefault(Path(root) / folder, []).append(name)
    stale = {folder: stale_figures(folder, names) for folder, names in linked.items()
             if any((folder / "runs").glob("*.json"))}
    return {folder: paths for folder, paths in stale.items() if paths}


def render_readme(readme: str, results_dir, bench_dir, gpu_dir=None, squeezenet_dir=None,
                  paper_dir=None) -> str:
    gpu_dir = Path(results_dir).parent / "gpu" if gpu_dir is None else gpu_dir
    paper_dir = Path(results_dir).parent / "paper" if paper_dir is None else paper_dir
    squeezenet_dir = (Path(results_dir).parent / "quick_squeezenet" if squeezenet_dir is None
                      else squeezenet_dir)
    text = replace_block(readme, "results", render_results(results_dir))
    text = replace_block(text, "answer", render_answer_block(results_dir))
    text = replace_block(text, "squeezenet",
                         "\n".join(render_progress(squeezenet_dir, "quick_squeezenet")))
    text = replace_block(text, "agreement", render_agreement(load_results(results_dir),
                                                             load_results(squeezenet_dir)))
    # every committed CPU record, the gpu preset's too (most of it trained on CPUs)
    cpu_runs = pd.concat([load_results(d) for d in (results_dir, squeezenet_dir, gpu_dir)],
                         ignore_index=True)
    cpu_runs = cpu_runs[cpu_runs["device"] == "cpu"] if "device" in cpu_runs else cpu_runs
    text = replace_block(text, "costs", render_costs(COST_PRESETS, cpu_runs))
    text = replace_block(text, "gpu", render_gpu(gpu_dir, bench_dir, beside=results_dir))
    text = replace_block(text, "paper", "\n".join(render_progress(paper_dir, "paper")))
    text = replace_block(text, "config", render_config_fields())
    text = replace_block(text, "models", render_packed_models(results_dir))
    text = replace_block(text, "onnx", render_onnx_agreement(results_dir))
    return replace_block(text, "bench", render_bench(bench_dir))
