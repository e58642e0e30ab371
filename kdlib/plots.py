"""The figures of notebook 04. Each function takes tidy data and returns a Figure."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))  # headless by default; notebooks inline anyway
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from kdlib.results import METHOD_ORDER, bits_label, seeds_label  # noqa: E402
from kdlib.verdict import is_same_run  # noqa: E402

METHOD_LABELS = {"individual": "individual (random init, CE)",
                 "finetune": "finetune (teacher init, CE)",
                 "direct_kd": "direct KD (from 32-bit)",
                 "direct_kd_matched": "direct KD, chain's budget",
                 "progressive": "progressive (chain init, CE)",
                 "progressive_kd32": "progressive, KD from 32-bit", "ta_chain": "TA chain"}
# published methods that correspond to ours (liao2020 'kd_no_ta' = distilled without assistant)
PUBLISHED_AS = {"individual": "individual", "kd_no_ta": "direct_kd", "ta_chain": "ta_chain"}
# how a published number's epoch was picked (published.csv's `selection`), in a legend's words
SELECTION_WORDS = {"test": "epoch chosen on test", "last_epoch": "last epoch"}


def palette() -> dict[str, Any]:
    colors = sns.color_palette("colorblind", len(METHOD_ORDER))
    return dict(zip(METHOD_ORDER, colors))


Bits = tuple[int, int]  # (w_bits, a_bits): one slot on a bit-width axis


def _bits(frame: pd.DataFrame) -> list[Bits]:
    """Each row's (w_bits, a_bits); none for an empty frame, whatever its columns."""
    if frame.empty:
        return []
    return [(int(w), int(a)) for w, a in zip(frame["w_bits"], frame["a_bits"])]


def _bit_positions(bits: Iterable[Bits]) -> dict[Bits, int]:
    """A slot per (w_bits, a_bits), widest first: a mixed setting (w4/a8) never shares the
    slot of a uniform one (4) that it is not."""
    return {b: i for i, b in enumerate(sorted(set(bits), reverse=True))}


def _set_bit_axis(ax, positions: dict[Bits, int]) -> None:
    ax.set_xticks(list(positions.values()), [bits_label(w, a) for w, a in positions])
    mixed = any(w != a for w, a in positions)
    ax.set_xlabel("bit width (weights = activations"
                  + ("; weights/activations where they differ)" if mixed else ")"))


def _legend_outside(ax, fontsize: int) -> None:
    """The legend right of the axes (it never hides data); none where nothing is drawn."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_accuracy_vs_bits(summary: pd.DataFrame, teacher_acc: float | None = None,
                          published: pd.DataFrame | None = None, title: str = "") -> plt.Figure:
    """Mean test top-1 per method vs bit width, error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(10, 4.8))
    students = summary[summary["method"].isin(METHOD_ORDER)]
    pos = _bit_positions(_bits(students) + ([(32, 32)] if teacher_acc is not None else []))
    colors = palette()
    offsets = dict(zip(METHOD_ORDER, np.linspace(-0.12, 0.12, len(METHOD_ORDER))))
    for method in METHOD_ORDER:
        rows = students[students["method"] == method].sort_values(["w_bits", "a_bits"],
                                                                  ascending=False)
        if rows.empty:
            continue
        x = [pos[b] + offsets[method] for b in _bits(rows)]
        ax.errorbar(x, rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3,
                    color=colors[method], label=METHOD_LABELS[method])
    if published is not None and not published.empty:
        pub = published[published["method"].isin(PUBLISHED_AS)
                        & np.array([b in pos for b in _bits(published)], dtype=bool)]
        for (source, method), rows in pub.groupby(["source", "method"]):
            rows = rows.sort_values(["w_bits", "a_bits"], ascending=False)
            selection = rows["selection"].dropna()
            chosen = (SELECTION_WORDS.get(selection.iloc[0], f"epoch chosen on {selection.iloc[0]}")
                      if len(selection) else "published")
            ax.plot([pos[b] for b in _bits(rows)], rows["top1"], linestyle=":", marker="x",
                    alpha=0.35, color=colors[PUBLISHED_AS[method]],
                    label=f"{source} {method} ({chosen})")
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="black", linestyle="--", linewidth=1,
                   label=f"32-bit teacher ({teacher_acc:.1f}%)")
    _set_bit_axis(ax, pos)
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title or "CIFAR-100 test accuracy vs precision")
    ax.grid(alpha=0.3)
    _legend_outside(ax, fontsize=7)
    fig.tight_layout()
    return fig


def plot_gain_over_individual(gains: pd.DataFrame, title: str = "") -> plt.Figure:
    """Per-bit-width gain of each method over `individual` (paired by seed), 95% t-interval."""
    fig, ax = plt.subplots(figsize=(9.5, 4))
    pos = _bit_positions(_bits(gains))
    colors = palette()
    methods = [m for m in METHOD_ORDER if m in set(gains.get("method", []))]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        rows = gains[gains["method"] == method]
        x = [pos[b] - 0.4 + width * (i + 0.5) for b in _bits(rows)]
        half = (rows["ci95_high"] - rows["mean"]).fillna(0)
        ax.bar(x, rows["mean"], width=width, yerr=half, capsize=3, color=colors[method],
               label=METHOD_LABELS[method])
    ax.axhline(0, color="black", linewidth=0.8)
    _set_bit_axis(ax, pos)
    ax.set_ylabel("gain over individual (top-1 points)")
    ax.set_title(title or "Gain over training each bit width on its own (error bar: 95% CI, n>1)")
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax, fontsize=8)
    fig.tight_layout()
    return fig


def plot_chain_contrasts(contrasts: pd.DataFrame, title: str = "",
                         stands: Collection[tuple[str, int, int]] | None = None,
                         same_run: Collection[tuple[str, int, int]] = ()) -> plt.Figure:
    """The three contrasts that attribute the chain's gain (kdlib.results.chain_contrasts) per
    bit width: mean paired difference, error bar = its 95% t-interval (none with one seed).
    ``stands``: (contrast, w_bits, a_bits) of the calls that stand when all widths together may
    err 5% (kdlib.verdict.holm_standing), each marked * beyond its error bar. ``same_run``:
    those where both sides are one training (kdlib.verdict.same_run_widths): labelled, no bar
    (a zero by construction is no measured null), no seeds counted in the legend."""
    fig, ax = plt.subplots(figsize=(9.5, 4))
    names = list(dict.fromkeys(contrasts["contrast"])) if not contrasts.empty else []
    pos = _bit_positions(_bits(contrasts))
    colors = sns.color_palette("dark", max(len(names), 1))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        rows = contrasts[contrasts["contrast"] == name]
        same = is_same_run(rows, same_run)
        for b in _bits(rows[same]):
            ax.text(pos[b] - 0.4 + width * (i + 0.5), 0, " same run", rotation=90, fontsize=7,
                    ha="center", va="bottom", color=colors[i])
        rows = rows[[not s for s in same]]
        x = [pos[b] - 0.4 + width * (i + 0.5) for b in _bits(rows)]
        half = rows["ci95_high"] - rows["mean"]
        ax.bar(x, rows["mean"], width=width, yerr=None if half.isna().all() else half.fillna(0),
               capsize=3, color=colors[i],
               label=f"{name} ({seeds_label(rows['n'])})" if len(rows) else name)
        for xi, row in zip(x, rows.itertuples()):
            if (name, int(row.w_bits), int(row.a_bits)) in (stands or ()):
                up = row.mean > 0
                ax.annotate("*", (xi, row.ci95_high if up else row.ci95_low),
                            xytext=(0, 2 if up else -2), textcoords="offset points",
                            ha="center", va="bottom" if up else "top", fontsize=12)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.1)  # room for the * beyond the longest error bars
    if pos:  # every width's slot, a labelled one without bars too
        ax.set_xlim(min(pos.values()) - 0.5, max(pos.values()) + 0.5)
    _set_bit_axis(ax, pos)
    ax.set_ylabel("paired difference (top-1 points)")
    one_seed = contrasts.empty or contrasts["n"].max() < 2
    ax.set_title(title or "Where the chain's gain comes from " + (
        "(one seed: no interval yet)" if one_seed
        else "(error bar: 95% paired interval over seeds)"))
    if stands is not None and not one_seed:
        ax.text(1.01, 0.0, "* stands when all tested widths\ntogether may err 5% (Holm)",
                transform=ax.transAxes, fontsize=8, va="bottom")
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax, fontsize=8)
    fig.tight_layout()
    return fig


def plot_chain_curves(records: Sequence[dict], seed: int = 0, title: str = "") -> plt.Figure:
    """Validation top-1 over epochs, teacher then each chain link, one after the other."""
    fig, ax = plt.subplots(figsize=(8, 4))
    chain = [r for r in records if r["config"]["method"] in ("teacher", "ta_chain")
             and r["config"]["seed"] == seed]
    # follow init links from the teacher down, so the order is the chain's
    ordered, current = [], next((r for r in chain if r["config"]["method"] == "teacher"), None)
    while current is not None:
        ordered.append(current)
        current = next((r for r in chain if r["config"].get("init_id") == current["run_id"]), None)
    start = 0
    cmap = plt.get_cmap("viridis", max(len(ordered), 2))
    for i, rec in enumerate(ordered):
        hist = rec["history"]
        epochs = [start + h["epoch"] for h in hist]
        label = (f"{bits_label(rec['config']['w_bits'], rec['config']['a_bits'])}-bit"
                 + (" teacher" if rec["config"]["method"] == "teacher" else ""))
        ax.plot(epochs, [h["val_top1"] for h in hist], marker=".", color=cmap(i), label=label)
        ax.axvline(start + 0.5, color="grey", linewidth=0.5, alpha=0.5)
        start = epochs[-1] if epochs else start
    ax.set_xlabel("epoch (links trained one after another)")
    ax.set_ylabel("validation top-1 accuracy (%)")
    ax.set_title(title or f"TA chain training curves (seed {seed})")
    ax.grid(alpha=0.3)
    if ordered:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_size(frame: pd.DataFrame, title: str = "") -> plt.Figure:
    """Test top-1 vs model size (KiB, log scale), per method: the size of the packed weights
    file (``packed_bytes``: what a deployment ships) of the runs with the same storage on paper
    (``storage_bits``), their median, where one of them has a file, else ``storage_bits`` / 8.

    A record holds its file's size; older records have one only where the file is in the
    checkout (seed 0's and the teachers' are committed). Files of one layout differ by a few
    header bytes (run id, a scale written as a decimal): sizing each run by its own file would
    split a setting's seeds into points of their own."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {**palette(), "teacher": "black"}
    paper = (frame["storage_bits"] / 8 if "storage_bits" in frame
             else pd.Series(float("nan"), frame.index))
    packed = (frame["packed_bytes"] if "packed_bytes" in frame
              else pd.Series(float("nan"), frame.index))
    shared = packed.astype(float).groupby(paper).transform("median")
    data = frame.assign(size_bytes=shared.fillna(paper),
                        filed=shared.notna()).dropna(subset=["size_bytes"])
    for method, rows in data.groupby("method"):
        grouped = rows.groupby("size_bytes")["test_top1"].agg(["mean", "std"]).reset_index()
        ax.errorbar(grouped["size_bytes"] / 1024, grouped["mean"], yerr=grouped["std"].fillna(0),
                    marker="s" if method == "teacher" else "o", capsize=3, linestyle="-",
                    color=colors.get(method, "grey"), label=METHOD_LABELS.get(method, method))
    ax.set_xscale("log")
    filed = data["filed"].mean() if len(data) else 0.0
    ax.set_xlabel("model size (KiB, " + ("quantized layers at their bit width" if filed == 0 else
                  "packed weights file") + ", log scale)" + ("" if filed in (0, 1) else
                  "\non paper (quantized layers at their bit width) where no run kept a file"))
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title or "Accuracy vs model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


DRAWN_FROM = "kdlib drawn from"  # the PNG text field holding drawn_from_digest()


def save_figure(fig: plt.Figure, path: str | os.PathLike, drawn_from: str | None = None) -> Path:
    """Save ``fig`` as a PNG; ``drawn_from``: :func:`kdlib.results.drawn_from_digest` of the
    results it shows, stored in the file, so that :func:`stale_figures` can tell it is old."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, metadata={DRAWN_FROM: drawn_from} if drawn_from else None)
    return path


def figure_stamp(path: str | os.PathLike) -> str | None:
    """The ``drawn_from`` a PNG was saved with (None: none, or not a readable PNG)."""
    from PIL import Image  # matplotlib's own dependency

    try:
        with Image.open(path) as image:
            return image.text.get(DRAWN_FROM)
    except (OSError, AttributeError):
        return None


def stale_figures(results_dir: str | os.PathLike, names: Sequence[str] | None = None
                  ) -> list[Path]:
    """The figures of ``results_dir`` (``names`` in figures/, default every PNG there; a named
    one that is missing counts) not drawn from its records as they are now."""
    from kdlib.results import drawn_from_digest

    folder = Path(results_dir) / "figures"
    paths = ([folder / name for name in names] if names is not None
             else sorted(folder.glob("*.png")))
    now = drawn_from_digest(results_dir)
    return [path for path in paths if not path.exists() or figure_stamp(path) != now]
