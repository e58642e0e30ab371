"""The workbook's answer in words, derived from the paired contrasts and nothing else.

A width is *resolved* for a contrast when its 95% paired interval excludes 0; the sentence
then names the side that won. Everything else is *unresolved*, and says how wide the
interval was, so "no difference" is never claimed where the seeds could not have seen one.
"""
from __future__ import annotations

import pandas as pd

from kdlib.results import CONTRASTS, bits_label, chain_contrasts, difference_text

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


def one_training(frame: pd.DataFrame, method: str, baseline: str) -> set[tuple[int, int]]:
    """(w_bits, a_bits) where both methods are the same training run for every seed (say the
    16-bit link of ``ta_chain`` and ``progressive_kd32``): their difference is 0 by
    construction, not a finding."""
    canonical = frame.assign(training=frame["same_run_as"].fillna(frame["run_id"])
                             if "same_run_as" in frame else frame["run_id"])
    keys = ["w_bits", "a_bits", "seed"]
    pairs = (canonical[canonical["method"] == method][[*keys, "training"]]
             .merge(canonical[canonical["method"] == baseline][[*keys, "training"]], on=keys))
    same = (pairs["training_x"] == pairs["training_y"]).groupby([pairs["w_bits"], pairs["a_bits"]]).all()
    return {bits for bits, value in same.items() if value}


def contrast_verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per contrast × bit width: mean, interval, n and :func:`classify`'s verdict;
    widths where the two sides are one training run are left out (:func:`one_training`)."""
    contrasts = chain_contrasts(frame)
    if contrasts.empty:
        return contrasts
    identical = {f"{a} − {b}": one_training(frame, a, b) for a, b, _ in CONTRASTS}
    keep = [(w, a) not in identical.get(c, set())
            for c, w, a in zip(contrasts["contrast"], contrasts["w_bits"], contrasts["a_bits"])]
    contrasts = contrasts[keep]
    if contrasts.empty:
        return contrasts
    contrasts = contrasts.assign(
        bits=[bits_label(w, a) for w, a in zip(contrasts["w_bits"], contrasts["a_bits"])],
        verdict=contrasts.apply(classify, axis=1))
    return contrasts.sort_values(["contrast", "w_bits", "a_bits"], ascending=[True, False, False],
                                 ignore_index=True)


def _widths(rows: pd.DataFrame) -> str:
    labels = [f"{b} bit" for b in rows["bits"]]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _values(rows: pd.DataFrame) -> str:
    return "; ".join(f"{r.bits}: {difference_text(r.mean, r.ci95_low, r.ci95_high, r.n)}"
                     for r in rows.itertuples())


def _sentence(method: str, baseline: str, meaning: str, rows: pd.DataFrame) -> str:
    won, lost = SIDES.get((method, baseline), (f"`{method}`", f"`{baseline}`"))
    budget = meaning[meaning.find("(") + 1:meaning.rfind(")")] if "(" in meaning else meaning
    head = f"- **{won[0].upper() + won[1:]} vs {lost}** (`{method} − {baseline}`, {budget})"
    n = int(rows["n"].max())
    if (rows["verdict"] == "one seed").all():
        signs = ", ".join(f"{r.bits}: {r.mean:+.2f}" for r in rows.itertuples())
        return f"{head}: one seed, no interval yet ({signs} points)."
    parts = []
    for side, name in (("method", won), ("baseline", lost)):
        part = rows[rows["verdict"] == side]
        if not part.empty:
            parts.append(f"{name} is better at {_widths(part)} ({_values(part)})")
    open_ = rows[rows["verdict"] == "unresolved"]
    if not open_.empty:
        half = ((open_["ci95_high"] - open_["ci95_low"]) / 2).median()
        parts.append(f"unresolved at {_widths(open_)} (median interval ±{half:.2f} points: an "
                     f"effect smaller than that could not be seen; {_values(open_)})")
    return f"{head}, n = {n} seeds: " + "; ".join(parts) + "."


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
    tested = verdicts[verdicts["verdict"] != "one seed"]
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
                "effect existed anywhere, so a lone resolved width is weak evidence; a pattern "
                "across neighbouring widths is stronger.")
    return "\n".join([intro, "", *lines, "", tail])
