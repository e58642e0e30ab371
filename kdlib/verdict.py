"""The workbook's answer in words, derived from the paired contrasts and nothing else.

A width is *resolved* for a contrast when its 95% paired interval excludes 0; the sentence
then names the side that won. Everything else is *unresolved* and shown with its interval,
which rules out only differences beyond its ends: "no difference" is never claimed.
Thirteen widths tested at 95% each would call about 0.7 of them by chance if nothing differed,
so the answer also says which calls stand when all of them together may err 5% of the time
(Holm's step-down correction of the same paired t-tests, :func:`holm_stands`).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import pandas as pd

from kdlib.budget import training_images
from kdlib.markdown import markdown_table
from kdlib.results import (CONTRASTS, bits_labels, chain_contrasts, difference_text,
                           in_bits_order, seeds_label)

# What each side of a contrast stands for, in the answer's words: (method side, baseline side).
SIDES = {
    ("ta_chain", "progressive_kd32"): ("the assistant", "the 32-bit teacher"),
    ("progressive_kd32", "direct_kd_matched"): ("stepping down", "jumping straight to the width"),
    ("ta_chain", "progressive"): ("distillation", "cross-entropy alone"),
}
RESOLVED_BY = "its 95% paired interval excludes 0"


def classify(row: pd.Series) -> str:
    """'method' | 'baseline' (the side the interval favours), 'unresolved', or 'one seed'."""
    if row["n"] < 2 or pd.isna(row.get("ci95_low")):
        return "one seed"
    if row["ci95_low"] > 0:
        return "method"
    if row["ci95_high"] < 0:
        return "baseline"
    return "unresolved"


def paired_p_value(mean: float, std: float, n: int) -> float:
    """Two-sided p of the paired t-test whose 95% interval :func:`classify` reads (p < 0.05
    exactly when that interval excludes 0); NaN under two seeds. Differences that are all
    equal (std 0) give p 0, or 1 when they are all 0."""
    from scipy import stats  # lazy, as in results.t_interval_halfwidth

    if n < 2 or not math.isfinite(std):
        return float("nan")
    if std == 0:
        return 0.0 if mean != 0 else 1.0
    t = abs(mean) / (std / math.sqrt(n))
    return float(2 * stats.t.sf(t, df=n - 1))


def holm_stands(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Which of ``p_values`` are rejected by Holm's step-down procedure at family-wise error
    ``alpha``: the i-th smallest p (i from 0) is compared with alpha / (m − i), and testing
    stops at the first above it (a p equal to its threshold stands)."""
    m = len(p_values)
    stands = [False] * m
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        if not p_values[index] <= alpha / (m - rank):
            break
        stands[index] = True
    return stands


def one_training(frame: pd.DataFrame, method: str, baseline: str) -> set[tuple[int, int]]:
    """(w_bits, a_bits) where both methods are the same training run for every seed (say the
    16-bit link of ``ta_chain`` and ``progressive_kd32``): their difference is 0 by
    construction, not a finding."""
    canonical = frame.assign(training=frame["same_run_as"].fillna(frame["run_id"])
                             if "same_run_as" in frame else frame["run_id"])
    keys = ["w_bits", "a_bits", "seed"]
    pairs = (canonical[canonical["method"] == method][[*keys, "training"]]
             .merge(canonical[canonical["method"] == baseline][[*keys, "training"]], on=keys))
    same = ((pairs["training_x"] == pairs["training_y"])
            .groupby([pairs["w_bits"], pairs["a_bits"]]).all())
    return {bits for bits, value in same.items() if value}


def same_run_widths(frame: pd.DataFrame) -> set[tuple[str, int, int]]:
    """(contrast, w_bits, a_bits) of the :data:`CONTRASTS` whose two sides are one training
    there (:func:`one_training`): no comparison, to be said so rather than shown as 0."""
    return {(f"{method} − {baseline}", w_bits, a_bits) for method, baseline, _ in CONTRASTS
            for w_bits, a_bits in one_training(frame, method, baseline)}


def is_same_run(contrasts: pd.DataFrame, same: Collection[tuple[str, int, int]]) -> list[bool]:
    """Per row of ``contrasts`` (:func:`~kdlib.results.chain_contrasts`): in ``same``?"""
    return [(c, int(w), int(a)) in same for c, w, a in
            zip(contrasts["contrast"], contrasts["w_bits"], contrasts["a_bits"])]


def contrast_verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per contrast × bit width: mean, interval, n and :func:`classify`'s verdict;
    widths where the two sides are one training run are left out (:func:`same_run_widths`)."""
    contrasts = chain_contrasts(frame)
    contrasts = contrasts.loc[[not same for same in is_same_run(contrasts, same_run_widths(frame))]]
    contrasts = contrasts.assign(bits=bits_labels(contrasts),
                                 verdict=[classify(row) for _, row in contrasts.iterrows()])
    return contrasts.sort_values(["contrast", "w_bits", "a_bits"], ascending=[True, False, False],
                                 ignore_index=True)


def _widths(rows: pd.DataFrame) -> str:
    labels = [f"{b} bit" for b in rows["bits"]]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _values(rows: pd.DataFrame) -> str:
    return "; ".join(f"{r.bits}: {difference_text(r.mean, r.ci95_low, r.ci95_high, r.n)}"
                     for r in rows.itertuples())


def _signs(rows: pd.DataFrame) -> str:
    """Each one-seed width's difference, '4: +0.50, 2: -1.00'."""
    return ", ".join(f"{r.bits}: {r.mean:+.2f}" for r in rows.itertuples())


def _sentence(method: str, baseline: str, meaning: str, rows: pd.DataFrame) -> str:
    won, lost = SIDES.get((method, baseline), (f"`{method}`", f"`{baseline}`"))
    budget = meaning[meaning.find("(") + 1:meaning.rfind(")")] if "(" in meaning else meaning
    head = f"- **{won[0].upper() + won[1:]} vs {lost}** (`{method} − {baseline}`, {budget})"
    if (rows["verdict"] == "one seed").all():
        return f"{head}: one seed, no interval yet ({_signs(rows)} points)."
    parts = []
    for side, name in (("method", won), ("baseline", lost)):
        part = rows[rows["verdict"] == side]
        if not part.empty:
            parts.append(f"{name} is better at {_widths(part)} ({_values(part)})")
    open_ = rows[rows["verdict"] == "unresolved"]
    if not open_.empty:
        # not "an effect smaller than the half-width could not be seen": an effect that large
        # would be missed about half the time; an interval says only what lies beyond its ends
        each = "its interval holds" if len(open_) == 1 else "each interval holds"
        parts.append(f"unresolved at {_widths(open_)} ({each} 0 and rules out only differences "
                     f"beyond its ends; {_values(open_)})")
    single = rows[rows["verdict"] == "one seed"]  # counted in the seeds above: named too
    if not single.empty:
        parts.append(f"one seed, no interval yet, at {_widths(single)} ({_signs(single)} points)")
    return f"{head}, {seeds_label(rows['n'])} seeds: " + "; ".join(parts) + "."


def family_wise(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``verdicts`` (:func:`contrast_verdicts`) tested with two seeds or more, with
    ``p`` (the paired t-test's) and ``holm``: whether the width's call stands when all of them
    together may err 5% (:func:`holm_stands`). Only a call stands: Holm keeps a p equal to
    its threshold where the interval, ending on 0, leaves the width unresolved."""
    tested = verdicts[verdicts["verdict"] != "one seed"]
    p = [paired_p_value(r.mean, r.std, int(r.n)) for r in tested.itertuples()]
    called = [stands and verdict != "unresolved"
              for stands, verdict in zip(holm_stands(p), tested["verdict"])]
    # typed columns: an empty object column would select columns, not rows, as a mask
    return tested.assign(p=pd.Series(p, index=tested.index, dtype=float),
                         holm=pd.Series(called, index=tested.index, dtype=bool))


def holm_standing(frame: pd.DataFrame) -> set[tuple[str, int, int]]:
    """(contrast, w_bits, a_bits) of the calls that stand under Holm's correction: what the
    contrasts figure marks."""
    rows = family_wise(contrast_verdicts(frame))
    rows = rows[rows["holm"]]
    return set(zip(rows["contrast"], rows["w_bits"].astype(int), rows["a_bits"].astype(int)))


def _holm_sentence(tested: pd.DataFrame) -> str:
    """The sentence on which calls stand when all ``tested`` widths together may err 5%."""
    stands = tested[tested["holm"]]
    m = len(tested)
    head = (f"Holding all {m} to a 5% chance of any false call (Holm's correction of the same "
            f"paired t-tests), ")
    calls = tested[tested["verdict"] != "unresolved"]
    fallen = calls[~calls["holm"]]
    fallen_text = (f". Of the {len(calls)} calls above, {len(fallen)} "
                   f"{'does' if len(fallen) == 1 else 'do'} not stand: "
                   + _named_calls(fallen, with_p=True) if not fallen.empty else "")
    if stands.empty:
        return head + "none stands" + fallen_text + "."
    return head + f"{len(stands)} stand: {_named_calls(stands)}{fallen_text}."


def _named_calls(rows: pd.DataFrame, with_p: bool = False) -> str:
    """'`a − b` at 8 bit and 4 bit; `c − d` at 2 bit', in the contrasts' order; ``with_p``:
    each width's p beside it."""
    def widths(part: pd.DataFrame) -> str:
        if not with_p:
            return _widths(part)
        return ", ".join(f"{r.bits} bit (p = {r.p:.2g})" for r in part.itertuples())

    return "; ".join(
        f"`{method} − {baseline}` at {widths(part)}" for method, baseline, _ in CONTRASTS
        if not (part := rows[rows["contrast"] == f"{method} − {baseline}"]).empty)


def smallest_signed_rank_p(n: int) -> float:
    """The smallest two-sided p the exact Wilcoxon signed-rank test (or the sign test) can give
    with ``n`` paired differences: every difference on one side, 2 / 2^n."""
    return 2.0 / 2 ** n


def _normality_sentence(tested: pd.DataFrame) -> str:
    """Said when the seeds are too few for any test free of the t-test's normality assumption
    to call a width at 5% (five seeds or fewer)."""
    n = int(tested["n"].max())
    floor = smallest_signed_rank_p(n)
    if floor <= 0.05:
        return ""
    return (f" With {n} seeds the calls rest on the t-test's assumption of normally distributed "
            f"differences: no test free of that assumption could call any width at 5% (the exact "
            f"signed-rank test's smallest two-sided p is 2/2^{n} = {floor:.4g}).")


def render_answer(frame: pd.DataFrame) -> str:
    """Markdown: the answer paragraph, one line per contrast, and how sure it is."""
    verdicts = contrast_verdicts(frame)
    if verdicts.empty:
        return "_No contrast yet: it needs `ta_chain` and its controls at a common bit width._"
    lines = []
    for method, baseline, meaning in CONTRASTS:
        rows = verdicts[verdicts["contrast"] == f"{method} − {baseline}"]
        if not rows.empty:
            lines.append(_sentence(method, baseline, meaning, rows))
    tested = family_wise(verdicts)
    first = frame.iloc[0]
    intro = (f"**The answer so far** ({first['model']}, preset `{first['preset']}`; test top-1 "
             f"points, mean [95% paired interval] over seeds; a width counts as resolved when "
             f"{RESOLVED_BY}):")
    if tested.empty:
        tail = ("With one seed nothing is resolved: these are signs to be confirmed, not an "
                "answer.")
    else:
        resolved = int((tested["verdict"] != "unresolved").sum())
        tail = (f"{resolved} of {len(tested)} intervals exclude 0. At 95% each, about "
                f"{0.05 * len(tested):.1f} of {len(tested)} would exclude 0 by chance if no "
                "effect existed anywhere, so a lone resolved width is weak evidence, and "
                "neighbouring widths are not independent evidence either, as each chain link "
                "starts from the width above it. " + _holm_sentence(tested)
                + _normality_sentence(tested))
    return "\n".join([intro, "", *lines, "", tail])


# How the same contrast at the same width reads in two grids (:func:`compare_answers`), from the
# strongest agreement to the strongest disagreement.
AGREEMENT = {
    "both": "resolved in both, same side",
    "one": "resolved in one, the same sign in the other",
    "even": "resolved in one, the other's mean exactly 0",
    "neither": "resolved in neither",
    "leans": "resolved in one, the other's mean on the other side",
    "conflict": "resolved in both, opposite sides",
}


def agreement(first: Mapping, second: Mapping) -> str:
    """A key of :data:`AGREEMENT` for one contrast at one width in two grids (both tested)."""
    resolved = [row["verdict"] in ("method", "baseline") for row in (first, second)]
    if all(resolved):
        return "both" if first["verdict"] == second["verdict"] else "conflict"
    if any(resolved):
        signs = {_sign(first["mean"]), _sign(second["mean"])}
        return "even" if 0 in signs else "one" if len(signs) == 1 else "leans"
    return "neither"


def _sign(mean: float) -> int:
    """-1, 0 or +1; 0 also for float noise: differences of hundredths that cancel average to
    about 1e-16, not 0."""
    return 0 if abs(mean) < 1e-9 else (1 if mean > 0 else -1)


def compare_answers(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """One row per contrast × width that both grids test with two seeds or more: each grid's
    mean, interval and verdict (suffixes ``_1``, ``_2``) and their :func:`agreement`. Sizes
    are not compared: two grids of different budgets can only agree on directions."""
    keys = ["contrast", "w_bits", "a_bits", "bits"]
    fields = ["mean", "ci95_low", "ci95_high", "n", "verdict"]
    tested = [v[v["verdict"] != "one seed"][keys + fields]
              for v in (contrast_verdicts(first), contrast_verdicts(second))]
    pairs = tested[0].merge(tested[1], on=keys, suffixes=("_1", "_2"))
    pairs["agreement"] = [
        agreement({f: row[f + "_1"] for f in fields}, {f: row[f + "_2"] for f in fields})
        for _, row in pairs.iterrows()]
    order = {f"{a} − {b}": i for i, (a, b, _) in enumerate(CONTRASTS)}
    return pairs.sort_values(["contrast", "w_bits", "a_bits"], key=lambda s: (
        s.map(order) if s.name == "contrast" else -s), ignore_index=True)


def _grid_words(frame: pd.DataFrame) -> str:
    first = frame.iloc[0]
    teacher = frame[frame["method"] == "teacher"]["test_top1"]
    seeds = frame["seed"].nunique()
    images = f"{training_images(first.get('train_size'), first['val_size']):,}"
    teacher_epochs = frame.loc[frame["method"] == "teacher", "epochs"]
    link_epochs = frame.loc[frame["method"] == "ta_chain", "epochs"]
    return (f"{first['model']} (preset `{first['preset']}`, {seeds} seed(s), {images} "
            f"training images"
            + (f", teacher {teacher.mean():.2f}%" if not teacher.empty else "")
            + (f" after {epochs_text(teacher_epochs)}" if not teacher_epochs.empty else "")
            + (f", {epochs_text(link_epochs)} a chain link" if not link_epochs.empty else "")
            + ")")


def epochs_text(counts: pd.Series) -> str:
    """'8 epochs'; every count the records hold ('5 or 8 epochs'), not one chosen of them."""
    values = sorted({int(c) for c in counts})
    return " or ".join(map(str, values)) + " epoch" + ("" if values == [1] else "s")


def render_agreement(first: pd.DataFrame, second: pd.DataFrame) -> str:
    """Markdown: does the second grid answer as the first does? One cell per contrast × width
    (the agreement's key, then the first grid's mean / the second's), and the counts."""
    if first.empty or second.empty:
        return "_Two grids' answers are compared once both have records._"
    pairs = compare_answers(first, second)
    head = f"**{_grid_words(second)} beside {_grid_words(first)}**"
    if pairs.empty:
        return (f"{head}: no contrast that both test with two seeds or more yet.")
    pairs["cell"] = [f"{r.agreement}: {r.mean_1:+.2f} / {r.mean_2:+.2f}"
                     for r in pairs.itertuples()]
    table = pairs.pivot_table(index="contrast", columns="bits", values="cell", aggfunc="first")
    table = table.reindex(index=list(dict.fromkeys(pairs["contrast"])),
                          columns=in_bits_order(table.columns)).fillna("")
    table.index.name = "contrast \\ bits"
    counts = pairs["agreement"].value_counts()
    summary = "; ".join(f"{key} ({AGREEMENT[key]}): {counts[key]}" for key in AGREEMENT
                        if key in counts)
    return "\n".join([
        f"{head}: the same contrasts, width by width (cell: agreement, then the mean in points "
        f"of `{first.iloc[0]['preset']}` / of `{second.iloc[0]['preset']}`; a width is resolved "
        f"when {RESOLVED_BY}). The budgets differ, so only directions are compared, not sizes.",
        "",
        markdown_table(table),
        "",
        f"Of {len(pairs)} widths both grids test: {summary}."])
