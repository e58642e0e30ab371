"""The README's answer paragraph follows the intervals, whatever they say."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kdlib import report, verdict
from kdlib.config import RunConfig
from kdlib.results import load_results, save_record
from kdlib.verdict import (agreement, classify, compare_answers, contrast_verdicts, holm_standing,
                           holm_stands, one_training, paired_p_value, render_agreement,
                           render_answer, same_run_widths, smallest_signed_rank_p)


def _save(folder, cfg: RunConfig, top1: float, same_run_as: str | None = None) -> None:
    metrics = {"best_epoch": 1, "best_val_top1": top1, "best_val_top5": 0.0, "test_top1": top1,
               "test_top5": 0.0, "final_test_top1": top1, "final_test_top5": 0.0}
    save_record(folder, {"run_id": cfg.run_id(), "config": cfg.to_dict(), "metrics": metrics,
                         "history": [{}], "same_run_as": same_run_as})


def _chains(folder, gains: dict[int, list[float]], seeds=(0, 1, 2)):
    """ta_chain and progressive_kd32 along 32 -> 16 -> 2, one training at 16 bits (as in the
    grid); at 2 bits ta_chain = progressive_kd32 + gains[2][seed]."""
    for seed in seeds:
        teacher = RunConfig(model="resnet8", method="teacher", seed=seed, epochs=2)
        _save(folder, teacher, 50.0)
        link16 = RunConfig(model="resnet8", method="ta_chain", w_bits=16, a_bits=16, seed=seed,
                           init_id=teacher.run_id(), teacher_id=teacher.run_id())
        _save(folder, link16, 45.0 + seed)
        alias16 = RunConfig(**{**link16.to_dict(), "method": "progressive_kd32"})
        _save(folder, alias16, 45.0 + seed, same_run_as=link16.run_id())
        base = 40.0 + 0.7 * seed
        for method, init, top1 in (("ta_chain", link16, base + gains[2][seed]),
                                   ("progressive_kd32", alias16, base)):
            cfg = RunConfig(model="resnet8", method=method, w_bits=2, a_bits=2, seed=seed,
                            init_id=init.run_id(),
                            teacher_id=(link16 if method == "ta_chain" else teacher).run_id())
            _save(folder, cfg, top1)
    return load_results(folder)


def test_a_consistent_gain_is_resolved_for_the_winning_side(tmp_path):
    frame = _chains(tmp_path, {2: [1.0, 1.2, 0.8]})
    verdicts = contrast_verdicts(frame)
    row = verdicts.set_index("bits").loc["2"]
    diffs = [1.0, 1.2, 0.8]
    half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / 3 ** 0.5
    assert row["mean"] == pytest.approx(1.0) and row["ci95_low"] == pytest.approx(1.0 - half)
    assert row["verdict"] == "method"
    text = render_answer(frame)
    assert "n = 3 seeds: the assistant is better at 2 bit (2: +1.00 [" in text
    assert "unresolved" not in text and "1 of 1 intervals exclude 0" in text
    assert "1 stand: `ta_chain − progressive_kd32` at 2 bit." in text
    # what the figure marks
    assert holm_standing(frame) == {("ta_chain − progressive_kd32", 2, 2)}


def test_a_loss_names_the_baseline_and_noise_stays_unresolved(tmp_path):
    frame = _chains(tmp_path, {2: [-1.0, -1.3, -0.9]})
    assert "the 32-bit teacher is better at 2 bit (2: -1.07 [" in render_answer(frame)
    noisy = _chains(tmp_path / "noisy", {2: [1.5, -1.0, 0.2]})
    text = render_answer(noisy)
    assert contrast_verdicts(noisy)["verdict"].tolist() == ["unresolved"]
    assert ("unresolved at 2 bit (its interval holds 0 and rules out only differences beyond "
            "its ends; 2: ") in text and "is better" not in text
    assert "0 of 1 intervals exclude 0" in text and "none stands" in text
    assert holm_standing(noisy) == set()


def test_one_training_under_two_names_is_no_finding(tmp_path):
    """At 16 bits both chains are the same run: a 0 by construction, left out of the answer."""
    frame = _chains(tmp_path, {2: [1.0, 1.2, 0.8]})
    assert one_training(frame, "ta_chain", "progressive_kd32") == {(16, 16)}
    assert same_run_widths(frame) == {("ta_chain − progressive_kd32", 16, 16)}
    assert contrast_verdicts(frame)["bits"].tolist() == ["2"]
    assert "16:" not in render_answer(frame)
    table = report._contrast_table(frame)  # the README's: said so, not shown as +0.00 [0, 0]
    assert table.index.tolist() == ["ta_chain − progressive_kd32 (n = 3)"]
    assert table.columns.tolist() == ["16", "2"] and table.iloc[0, 0] == "same run"
    assert table.iloc[0, 1].startswith("+1.00 [")


def test_one_seed_claims_nothing(tmp_path):
    frame = _chains(tmp_path, {2: [2.0]}, seeds=(0,))
    text = render_answer(frame)
    assert "one seed, no interval yet (2: +2.00 points)" in text
    assert "nothing is resolved" in text and "is better" not in text
    assert holm_standing(frame) == set()  # what notebook 04 asks of a one-seed smoke grid


def test_classify_reads_only_the_interval():
    assert classify({"n": 3, "ci95_low": 0.1, "ci95_high": 2.0}) == "method"
    assert classify({"n": 3, "ci95_low": -2.0, "ci95_high": -0.1}) == "baseline"
    assert classify({"n": 3, "ci95_low": -0.1, "ci95_high": 2.0}) == "unresolved"
    assert classify({"n": 1, "ci95_low": float("nan"), "ci95_high": float("nan")}) == "one seed"
    # an interval that ends at 0 does not exclude it (all differences 0: [0, 0])
    assert classify({"n": 3, "ci95_low": 0.0, "ci95_high": 0.0}) == "unresolved"
    assert classify({"n": 3, "ci95_low": 0.0, "ci95_high": 1.0}) == "unresolved"
    assert classify({"n": 3, "ci95_low": -1.0, "ci95_high": 0.0}) == "unresolved"


@pytest.mark.parametrize("first, second, expected", [
    (("method", +1.0), ("method", +0.5), "both"),
    (("baseline", -1.0), ("baseline", -2.0), "both"),
    (("method", +1.0), ("baseline", -0.5), "conflict"),
    (("method", +1.0), ("unresolved", +0.3), "one"),
    (("unresolved", -0.3), ("baseline", -1.0), "one"),
    (("method", +1.0), ("unresolved", -0.3), "leans"),
    (("unresolved", +0.2), ("baseline", -1.0), "leans"),
    (("unresolved", +0.2), ("unresolved", -0.4), "neither"),
    (("method", +1.0), ("unresolved", 0.0), "even"),
    # hundredths that cancel: (14.92 + ... ) − (14.92 + ...) averages to float noise, not 0
    (("baseline", -1.0), ("unresolved", 2.96e-16), "even"),
    (("baseline", -1.0), ("unresolved", -1e-6), "one"),
])
def test_agreement_reads_both_verdicts_and_the_signs(first, second, expected):
    rows = [{"verdict": verdict, "mean": mean} for verdict, mean in (first, second)]
    assert agreement(*rows) == expected
    assert agreement(*rows[::-1]) == expected  # symmetric


def test_two_grids_are_compared_width_by_width_on_directions_only(tmp_path):
    resnet = _chains(tmp_path / "a", {2: [1.0, 1.2, 0.8]})  # resolved for the assistant
    for name, gains, expected in (("same", [3.0, 3.5, 2.8], "both"),
                                  ("noisy", [1.5, -1.0, 0.2], "one"),
                                  ("flipped", [-1.0, -1.3, -0.9], "conflict")):
        other = _chains(tmp_path / name, {2: gains})
        pairs = compare_answers(resnet, other)
        assert pairs["bits"].tolist() == ["2"]  # 16 bit is one training in each: no finding
        assert pairs["agreement"].tolist() == [expected]
        assert pairs["mean_2"].iloc[0] == pytest.approx(sum(gains) / 3)
        text = render_agreement(resnet, other)
        assert f"| ta_chain − progressive_kd32 | {expected}: +1.00 / {sum(gains) / 3:+.2f} |" \
            in text
        assert f"Of 1 widths both grids test: {expected} (" in text
        assert "teacher 50.00% after 2 epochs, " in text  # each grid's budget named
        assert " a chain link) beside" in text
    one_seed = _chains(tmp_path / "one", {2: [2.0]}, seeds=(0,))
    assert compare_answers(resnet, one_seed).empty  # no interval: nothing to compare
    assert "no contrast that both test with two seeds or more yet" in render_agreement(
        resnet, one_seed)
    assert "compared once both have records" in render_agreement(resnet, one_seed.iloc[:0])


def test_a_grid_without_a_contrast_yet_has_no_verdict_no_call_and_nothing_to_compare(tmp_path):
    """Its teacher alone: the verdicts are empty but keep their columns, so what reads them
    (Holm's calls, the comparison of two grids) needs no special case."""
    resnet = _chains(tmp_path / "a", {2: [1.0, 1.2, 0.8]})
    teacher_only = resnet[resnet["method"] == "teacher"]
    verdicts = contrast_verdicts(teacher_only)
    assert verdicts.empty and {"contrast", "bits", "verdict", "mean", "n"} <= set(verdicts.columns)
    assert holm_standing(teacher_only) == set()
    compared = compare_answers(resnet, teacher_only)
    assert compared.empty and {"mean_1", "verdict_2", "agreement"} <= set(compared.columns)
    assert "no contrast that both test" in render_agreement(teacher_only, resnet)


def test_the_p_value_is_scipys_paired_t_test_and_agrees_with_the_interval():
    """Checked against scipy's one-sample t-test of the differences, and p < 0.05 exactly
    where the 95% interval that classify reads excludes 0."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 9))
        diffs = rng.normal(rng.normal(0, 1), rng.uniform(0.1, 2), size=n)
        mean, std = float(diffs.mean()), float(diffs.std(ddof=1))
        p = paired_p_value(mean, std, n)
        assert p == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-9)
        half = stats.t.ppf(0.975, n - 1) * std / n ** 0.5
        excludes = mean - half > 0 or mean + half < 0
        assert (p < 0.05) == excludes
    assert np.isnan(paired_p_value(1.0, 0.5, 1))
    assert paired_p_value(0.5, 0.0, 3) == 0.0 and paired_p_value(0.0, 0.0, 3) == 1.0


def holm_by_adjusted_p(p_values, alpha=0.05):
    """Holm's procedure written the other way: adjusted p_(i) = max over j <= i of
    (m - j) p_(j), capped at 1; a hypothesis stands when its adjusted p is at most alpha."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.maximum.accumulate(
        np.minimum(1.0, (m - np.arange(m)) * np.asarray(p_values)[order]))
    stands = np.zeros(m, dtype=bool)
    stands[order] = adjusted <= alpha
    return stands.tolist()


def test_holm_steps_down_and_stops_at_the_first_p_it_keeps():
    # stricter than one test at 5%, looser than Bonferroni's alpha / m for all
    assert holm_stands([0.001, 0.015, 0.02, 0.5]) == [True, True, True, False]
    # 0.02 is over 0.05 / 3: testing stops there, though 0.04 alone would be under 0.05 / 1
    assert holm_stands([0.001, 0.03, 0.02, 0.04]) == [True, False, False, False]
    assert holm_stands([]) == [] and holm_stands([0.049]) == [True]
    rng = np.random.default_rng(1)
    for _ in range(500):
        p = (rng.uniform(0, 0.08, size=int(rng.integers(1, 14))) ** 2 * 10).tolist()
        assert holm_stands(p) == holm_by_adjusted_p(p)


def test_two_seeds_are_enough_for_an_interval_and_a_verdict(tmp_path):
    """Two seeds give a paired t-interval (df = 1): the width is classified by it, not as
    'one seed'."""
    gains = [1.0, 1.02]
    frame = _chains(tmp_path, {2: gains}, seeds=(0, 1))
    low, high = stats.ttest_1samp(gains, 0.0).confidence_interval(0.95)
    assert low > 0  # a tight pair: resolved for the assistant even at df = 1
    row = contrast_verdicts(frame).set_index("bits").loc["2"]
    assert row["n"] == 2 and row["ci95_low"] == pytest.approx(low)
    assert row["verdict"] == "method"
    assert classify({"n": 2, "ci95_low": -1.0, "ci95_high": -0.5}) == "baseline"


def test_holm_rejects_a_p_value_equal_to_its_threshold():
    """Holm's rule rejects while p_(i) <= alpha / (m - i) (adjusted p <= alpha): a p exactly at
    its threshold stands, as one test at 5% rejects p = 0.05."""
    assert holm_stands([0.05]) == [True]
    assert holm_stands([0.05 / 2, 0.05]) == [True, True]
    assert holm_stands([0.05 / 3, 0.05 / 2, 0.05 + 1e-12]) == [True, True, False]
    assert holm_stands([0.05 / 2, 0.05]) == holm_by_adjusted_p([0.05 / 2, 0.05])


def test_only_a_resolved_width_can_stand_under_holm():
    """At p = 0.05 the interval ends on 0 (unresolved) while Holm keeps p <= 0.05: a call must
    exist before it can stand. Rows as :func:`contrast_verdicts` gives them, the middle one
    with a p under 5% but (as at the boundary) read unresolved."""
    verdicts = pd.DataFrame({"contrast": ["ta_chain − progressive_kd32"] * 3,
                             "w_bits": [4, 2, 1], "a_bits": [4, 2, 1],
                             "mean": [1.0, 1.0, 0.1], "std": [0.01, 0.01, 1.0], "n": [3, 3, 3],
                             "verdict": ["method", "unresolved", "unresolved"]})
    tested = verdict.family_wise(verdicts)
    assert (tested["p"] < 0.05).tolist() == [True, True, False]
    assert tested["holm"].tolist() == [True, False, False]


def test_a_width_is_one_training_only_when_every_seed_is():
    """A width where one seed's pair is one training but another seed's pair is two is a
    real comparison (for the second seed): it stays in the answer."""
    rows = [  # seed 0: progressive_kd32 is ta_chain's run; seed 1: trained on its own
        {"method": "ta_chain", "w_bits": 16, "a_bits": 16, "seed": 0, "run_id": "c0",
         "same_run_as": None},
        {"method": "progressive_kd32", "w_bits": 16, "a_bits": 16, "seed": 0, "run_id": "p0",
         "same_run_as": "c0"},
        {"method": "ta_chain", "w_bits": 16, "a_bits": 16, "seed": 1, "run_id": "c1",
         "same_run_as": None},
        {"method": "progressive_kd32", "w_bits": 16, "a_bits": 16, "seed": 1, "run_id": "p1",
         "same_run_as": None}]
    frame = pd.DataFrame(rows)
    assert one_training(frame, "ta_chain", "progressive_kd32") == set()
    both = frame.assign(same_run_as=[None, "c0", None, "c1"])
    assert one_training(both, "ta_chain", "progressive_kd32") == {(16, 16)}


def test_agreement_is_symmetric_when_a_mean_is_exactly_zero():
    """A mean of exactly 0 has no side: whichever grid comes first, the call is the same."""
    for resolved in (("method", +1.0), ("baseline", -1.0)):
        rows = [{"verdict": resolved[0], "mean": resolved[1]},
                {"verdict": "unresolved", "mean": 0.0}]
        assert agreement(*rows) == agreement(*rows[::-1])


def test_the_chance_count_is_over_the_tested_widths_only(tmp_path):
    """'About 0.05 × m would exclude 0 by chance' counts the m widths with an interval, not
    the one-seed widths beside them."""
    _chains(tmp_path, {2: [1.0, 1.2, 0.8]})  # one tested width (2 bit, three seeds)
    teacher = RunConfig(model="resnet8", method="teacher", seed=0, epochs=2)
    for bits in (3, 4, 8):  # three one-seed widths of ta_chain − progressive
        for method in ("ta_chain", "progressive"):
            _save(tmp_path, RunConfig(model="resnet8", method=method, w_bits=bits, a_bits=bits,
                                      seed=0, init_id=teacher.run_id(),
                                      teacher_id=teacher.run_id()), 40.0 + bits)
    frame = load_results(tmp_path)
    verdicts = contrast_verdicts(frame)
    assert len(verdicts) == 4 and (verdicts["verdict"] == "one seed").sum() == 3
    # 5% of 1 tested width is 0.05, written to one decimal: 0.1 (not 5% of all 4 rows, 0.2)
    assert "1 of 1 intervals exclude 0. At 95% each, about 0.1 of 1 would" in render_answer(frame)


def test_a_contrast_with_one_seed_at_some_widths_still_reads_its_tested_ones(tmp_path):
    """One width with a single seed does not turn the whole contrast into 'one seed, no
    interval yet': its three-seed width is still called by its interval, and the one-seed
    width, counted in the sentence's seeds, is named with its sign."""
    _chains(tmp_path, {2: [1.0, 1.2, 0.8]})
    teacher = RunConfig(model="resnet8", method="teacher", seed=0, epochs=2)
    for method in ("ta_chain", "progressive_kd32"):  # 4 bit: seed 0 only
        _save(tmp_path, RunConfig(model="resnet8", method=method, w_bits=4, a_bits=4, seed=0,
                                  init_id=teacher.run_id(), teacher_id=teacher.run_id()), 41.0)
    frame = load_results(tmp_path)
    verdicts = contrast_verdicts(frame).set_index("bits")["verdict"]
    assert verdicts.to_dict() == {"4": "one seed", "2": "method"}
    text = render_answer(frame)
    assert "the assistant is better at 2 bit (2: +1.00 [" in text
    assert "one seed, no interval yet, at 4 bit (4: +0.00 points)." in text
    assert "one seed, no interval yet (" not in text  # not the all-one-seed sentence


def test_the_contrast_table_counts_seeds_only_where_it_compares(tmp_path):
    """The row's n is over the widths with a comparison: a 'same run' width with more seeds
    does not credit the contrast with them."""
    _chains(tmp_path, {2: [1.0, 1.2, 0.8]})  # seeds 0-2 at 16 (same run) and 2 bit
    teacher = RunConfig(model="resnet8", method="teacher", seed=3, epochs=2)
    _save(tmp_path, teacher, 50.0)
    link16 = RunConfig(model="resnet8", method="ta_chain", w_bits=16, a_bits=16, seed=3,
                       init_id=teacher.run_id(), teacher_id=teacher.run_id())
    _save(tmp_path, link16, 48.0)  # seed 3: the 16-bit link only, so 4 seeds there
    _save(tmp_path, RunConfig(**{**link16.to_dict(), "method": "progressive_kd32"}), 48.0,
          same_run_as=link16.run_id())
    table = report._contrast_table(load_results(tmp_path))
    assert table.index.tolist() == ["ta_chain − progressive_kd32 (n = 3)"]
    assert table.iloc[0].tolist() == ["same run", table.iloc[0, 1]]


def test_teachers_of_several_epoch_counts_are_each_named(tmp_path):
    """Both places that state the teacher's epochs give every count the records hold, not one
    picked by position (the first row) or by size (the longest), in one wording."""
    _chains(tmp_path, {2: [1.0, 1.2, 0.8]})  # teachers of 2 epochs
    _save(tmp_path, RunConfig(model="resnet8", method="teacher", seed=3, epochs=5), 52.0)
    frame = load_results(tmp_path)
    assert " after 2 or 5 epochs" in verdict._grid_words(frame)
    assert "after 2 or 5 epochs" in report._epochs_sentence(frame)


def _widths_frame(folder, diffs: dict[int, list[float]]):
    """ta_chain and progressive_kd32 trained apart at each width w/w of ``diffs``, one seed per
    difference: ta_chain − progressive_kd32 = diffs[w][seed]."""
    for seed in range(len(next(iter(diffs.values())))):
        teacher = RunConfig(model="resnet8", method="teacher", seed=seed, epochs=2)
        _save(folder, teacher, 50.0)
        for bits, gains in diffs.items():
            for method, top1 in (("ta_chain", 40.0 + gains[seed]), ("progressive_kd32", 40.0)):
                _save(folder, RunConfig(model="resnet8", method=method, w_bits=bits, a_bits=bits,
                                        seed=seed, init_id=teacher.run_id(),
                                        teacher_id=teacher.run_id()), top1)
    return load_results(folder)


def test_unresolved_widths_read_widest_first_each_with_its_interval(tmp_path):
    """An unresolved width is shown with its own interval, widest width first as in the tables,
    and no half-width is offered as the smallest effect the seeds would have seen (an effect of
    that size is missed about half the time)."""
    # differences -d, 0, +d: mean 0, sd d, so each interval is 0 ± t(0.975, 2) d / sqrt(3)
    frame = _widths_frame(tmp_path, {8: [-1.0, 0.0, 1.0], 4: [-2.0, 0.0, 2.0],
                                     2: [-6.0, 0.0, 6.0]})
    t = stats.t.ppf(0.975, 2)  # 4.3027
    halves = [t * d / 3 ** 0.5 for d in (1.0, 2.0, 6.0)]  # 2.48, 4.97, 14.91
    assert contrast_verdicts(frame)["bits"].tolist() == ["8", "4", "2"]
    text = render_answer(frame)
    intervals = "; ".join(f"{bits}: +0.00 [{-half:+.2f}, {half:+.2f}]"
                          for bits, half in zip((8, 4, 2), halves))
    assert ("unresolved at 8 bit, 4 bit and 2 bit (each interval holds 0 and rules out only "
            f"differences beyond its ends; {intervals})") in text
    assert "4: +0.00 [-4.97, +4.97]" in text  # the hand value: 4.3027 × 2 / 1.7321
    assert "±" not in text and "could not be seen" not in text


def test_the_resolved_count_takes_both_sides_and_holm_counts_only_the_calls_that_stand(tmp_path):
    """'k of m intervals exclude 0' counts a width won by either side; Holm's sentence says how
    many of the m calls stand, which can be fewer than m."""
    frame = _widths_frame(tmp_path, {8: [4.9, 5.0, 5.1],       # t = 86.6: p ~ 1e-4
                                     4: [-2.0, -3.0, -4.0],    # t = 5.20: p ~ 0.035
                                     2: [-1.0, 0.0, 1.0]})     # mean 0: unresolved
    p4 = stats.ttest_1samp([-2.0, -3.0, -4.0], 0.0).pvalue
    assert 0.05 / 2 < p4 < 0.05  # resolved alone, but over Holm's second threshold
    assert contrast_verdicts(frame)["verdict"].tolist() == ["method", "baseline", "unresolved"]
    text = render_answer(frame)
    assert "2 of 3 intervals exclude 0." in text
    assert ("Holding all 3 to a 5% chance of any false call (Holm's correction of the same paired "
            "t-tests), 1 stand: `ta_chain − progressive_kd32` at 8 bit. Of the 2 calls above, 1 "
            f"does not stand: `ta_chain − progressive_kd32` at 4 bit (p = {p4:.2g}).") in text


def test_a_call_that_falls_under_holm_is_named_even_when_none_stands(tmp_path):
    frame = _widths_frame(tmp_path, {4: [-2.0, -3.0, -4.0], 2: [-2.1, -3.0, -4.0]})
    p = [stats.ttest_1samp(d, 0.0).pvalue for d in ([-2.0, -3.0, -4.0], [-2.1, -3.0, -4.0])]
    assert all(0.025 < value < 0.05 for value in p)  # each resolved, neither under Holm
    text = render_answer(frame)
    assert ("none stands. Of the 2 calls above, 2 do not stand: `ta_chain − progressive_kd32` "
            f"at 4 bit (p = {p[0]:.2g}), 2 bit (p = {p[1]:.2g}).") in text


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 8])
def test_the_smallest_signed_rank_p_is_scipys(n):
    """All n differences on one side: the exact Wilcoxon signed-rank test's two-sided p."""
    p = stats.wilcoxon(list(range(1, n + 1)), alternative="two-sided", method="exact").pvalue
    assert smallest_signed_rank_p(n) == pytest.approx(p)


@pytest.mark.parametrize("seeds, said", [(5, True), (6, False)])
def test_five_seeds_or_fewer_are_said_to_rest_on_normality(tmp_path, seeds, said):
    """With five seeds no distribution-free test reaches 5% (0.0625 at best); with six it can."""
    frame = _widths_frame(tmp_path, {4: [1.0 + 0.1 * s for s in range(seeds)]})
    text = render_answer(frame)
    assert (f"With {seeds} seeds the calls rest on the t-test's assumption" in text) is said
    if said:
        assert "smallest two-sided p is 2/2^5 = 0.0625)." in text


def test_a_grids_words_give_its_teachers_mean_and_how_many_seeds(tmp_path):
    """Beside another grid, a grid is named by its seed count (not its largest seed number) and
    its teachers' mean top-1 (not their median)."""
    frame = _chains(tmp_path, {2: [1.0, 1.2, 0.8]}, seeds=(0, 1, 2))
    teachers = frame["method"] == "teacher"
    frame.loc[teachers & (frame["seed"] == 2), "test_top1"] = 59.0  # 50, 50, 59: mean 53
    words = render_agreement(frame, frame)
    assert "resnet8 (preset `" in words and ", 3 seed(s), " in words
    assert ", teacher 53.00% after 2 epochs" in words and "50.00%" not in words
