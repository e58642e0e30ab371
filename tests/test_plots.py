"""The figures of notebook 04, read back from the returned Figure: what is drawn where."""
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from kdlib import plots
from kdlib.plots import METHOD_LABELS

NAN = float("nan")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def legend_entries(ax):
    """Label -> artist (Line2D, ErrorbarContainer or BarContainer) of every legend entry."""
    handles, labels = ax.get_legend_handles_labels()
    return dict(zip(labels, handles))


def error_halfwidths(container):
    """Half the length of each vertical bar of an ErrorbarContainer."""
    _line, _caps, (bars,) = container.lines
    return [abs(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]


def errorbar_data(container):
    """(x, y, half-length of each error bar) of an ErrorbarContainer drawn by ``ax.errorbar``."""
    x, y = (np.asarray(v, dtype=float).tolist() for v in container.lines[0].get_data())
    return x, y, error_halfwidths(container)


def test_accuracy_vs_bits_draws_means_errors_teacher_and_published():
    summary = pd.DataFrame([
        {"method": "individual", "w_bits": 8, "a_bits": 8, "mean": 60.0, "std": 1.5},
        {"method": "individual", "w_bits": 2, "a_bits": 2, "mean": 50.0, "std": NAN},  # one seed
        {"method": "ta_chain", "w_bits": 2, "a_bits": 2, "mean": 55.0, "std": 2.0},
        {"method": "ta_chain", "w_bits": 8, "a_bits": 8, "mean": 62.0, "std": 0.5},
        # drawn as a line
        {"method": "teacher", "w_bits": 32, "a_bits": 32, "mean": 70.0, "std": 0.0},
    ])
    published = pd.DataFrame([
        {"source": "liao2020", "method": "individual", "w_bits": 2, "a_bits": 2, "top1": 54.0,
         "selection": "test"},
        {"source": "liao2020", "method": "individual", "w_bits": 8, "a_bits": 8, "top1": 61.0,
         "selection": "test"},
        {"source": "liao2020", "method": "individual", "w_bits": 4, "a_bits": 4, "top1": 58.0,
         "selection": "test"},
        {"source": "liao2020", "method": "kd_no_ta", "w_bits": 8, "a_bits": 8, "top1": 63.0,
         "selection": "test"},
        # weights at 2 bits, activations at 32: not comparable with our 2-bit students
        {"source": "liao2020", "method": "individual", "w_bits": 2, "a_bits": 32, "top1": 66.0,
         "selection": "test"},
        # a source that does not say how it chose its epoch
        {"source": "zhou2018", "method": "ta_chain", "w_bits": 8, "a_bits": 8, "top1": 64.0,
         "selection": NAN},
        {"source": "shin2019", "method": "kd_ternary", "w_bits": 2, "a_bits": 32, "top1": 67.0,
         "selection": NAN},
        {"source": "repdistiller", "method": "individual", "w_bits": 32, "a_bits": 32, "top1": 69.0,
         "selection": "last_epoch"},
    ])
    fig = plots.plot_accuracy_vs_bits(summary, teacher_acc=70.0, published=published)
    ax = fig.axes[0]
    # bit widths left to right from 32 down, at 0, 1, 2; methods side by side at -0.12 .. +0.12
    assert list(ax.get_xticks()) == [0, 1, 2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "8", "2"]
    entries = legend_entries(ax)
    assert set(entries) == {
        METHOD_LABELS["individual"], METHOD_LABELS["ta_chain"], "32-bit teacher (70.0%)",
        "liao2020 individual (epoch chosen on test)", "liao2020 kd_no_ta (epoch chosen on test)",
        "repdistiller individual (last epoch)", "zhou2018 ta_chain (published)"}
    x, y, half = errorbar_data(entries[METHOD_LABELS["individual"]])
    assert x == pytest.approx([0.88, 1.88]) and y == [60.0, 50.0] \
        and half == pytest.approx([1.5, 0.0])
    x, y, half = errorbar_data(entries[METHOD_LABELS["ta_chain"]])
    assert x == pytest.approx([1.12, 2.12]) and y == [62.0, 55.0] \
        and half == pytest.approx([0.5, 2.0])
    assert list(entries["32-bit teacher (70.0%)"].get_ydata()) == [70.0, 70.0]
    # published numbers at the bit widths we ran (4 bits is not among them), in our method's colour
    liao = entries["liao2020 individual (epoch chosen on test)"]
    assert list(liao.get_xdata()) == [1, 2] and list(liao.get_ydata()) == [61.0, 54.0]
    kd_no_ta = entries["liao2020 kd_no_ta (epoch chosen on test)"]
    assert list(kd_no_ta.get_xdata()) == [1] and list(kd_no_ta.get_ydata()) == [63.0]
    assert to_rgba(kd_no_ta.get_color()) == to_rgba(plots.palette()["direct_kd"])
    rep = entries["repdistiller individual (last epoch)"]
    assert list(rep.get_xdata()) == [0] and list(rep.get_ydata()) == [69.0]
    zhou = entries["zhou2018 ta_chain (published)"]
    assert list(zhou.get_xdata()) == [1] and list(zhou.get_ydata()) == [64.0]


def test_accuracy_vs_bits_has_a_slot_only_for_the_students_widths_without_a_teacher_line():
    """The teacher's summary row is drawn only as the teacher_acc line: without that line the
    axis has no empty 32-bit slot, whatever else the summary holds."""
    summary = pd.DataFrame([
        {"method": "individual", "w_bits": 4, "a_bits": 4, "mean": 55.0, "std": 1.0},
        {"method": "ta_chain", "w_bits": 2, "a_bits": 2, "mean": 50.0, "std": 1.0},
        {"method": "teacher", "w_bits": 32, "a_bits": 32, "mean": 70.0, "std": 0.5},
    ])
    ax = plots.plot_accuracy_vs_bits(summary).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "2"]
    assert set(legend_entries(ax)) == {METHOD_LABELS["individual"], METHOD_LABELS["ta_chain"]}


def test_a_mixed_precision_setting_has_a_slot_of_its_own():
    """w4/a8 is not 4 bits: a grid that holds both draws them apart, labelled as the tables
    label them, and the axis says what w/a means."""
    rows = [("individual", 4, 4, 50.0), ("individual", 4, 8, 53.0), ("ta_chain", 4, 4, 52.0)]
    summary = pd.DataFrame([{"method": m, "w_bits": w, "a_bits": a, "mean": v, "std": 1.0}
                            for m, w, a, v in rows])
    ax = plots.plot_accuracy_vs_bits(summary).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4/8", "4"]
    assert "weights/activations where they differ" in ax.get_xlabel()
    x, y, _ = errorbar_data(legend_entries(ax)[METHOD_LABELS["individual"]])
    assert x == pytest.approx([-0.12, 0.88]) and y == [53.0, 50.0]
    gains = pd.DataFrame([{"method": "ta_chain", "w_bits": w, "a_bits": a, "mean": v,
                           "ci95_high": v + 1} for w, a, v in ((4, 4, 2.0), (4, 8, -1.0))])
    ax = plots.plot_gain_over_individual(gains).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4/8", "4"]
    bars = legend_entries(ax)[METHOD_LABELS["ta_chain"]].patches
    assert [(round(p.get_x() + p.get_width() / 2, 6), p.get_height()) for p in bars] == [
        (1.0, 2.0), (0.0, -1.0)]
    uniform = plots.plot_accuracy_vs_bits(summary[summary["a_bits"] == 4]).axes[0]
    assert uniform.get_xlabel() == "bit width (weights = activations)"
    plt.close("all")


def test_gain_over_individual_bars_and_intervals():
    gains = pd.DataFrame([
        {"method": "direct_kd", "w_bits": 4, "a_bits": 4, "mean": 2.0, "ci95_high": 3.0},
        # n = 1: no interval
        {"method": "direct_kd", "w_bits": 2, "a_bits": 2, "mean": 4.0, "ci95_high": NAN},
        {"method": "ta_chain", "w_bits": 4, "a_bits": 4, "mean": 3.0, "ci95_high": 5.0},
        {"method": "ta_chain", "w_bits": 2, "a_bits": 2, "mean": -1.0, "ci95_high": 0.5},
    ])
    fig = plots.plot_gain_over_individual(gains)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "2"]
    entries = legend_entries(ax)
    assert list(entries) == [METHOD_LABELS["direct_kd"], METHOD_LABELS["ta_chain"]]

    def bars(label):
        container = entries[label]
        centres = [p.get_x() + p.get_width() / 2 for p in container.patches]
        heights = [p.get_height() for p in container.patches]
        return centres, heights, error_halfwidths(container.errorbar)

    # two methods share each bit width's 0.8-wide slot: centres at -0.2 and +0.2
    assert bars(METHOD_LABELS["direct_kd"]) == (pytest.approx([-0.2, 0.8]), [2.0, 4.0],
                                                pytest.approx([1.0, 0.0]))
    assert bars(METHOD_LABELS["ta_chain"]) == (pytest.approx([0.2, 1.2]), [3.0, -1.0],
                                               pytest.approx([2.0, 1.5]))


def test_gain_bars_share_each_slot_in_method_order_whatever_the_rows_order():
    """paired_gain lists methods alphabetically; the bars keep the tables' method order
    (finetune before direct_kd) and split each bit width's 0.8-wide slot among the methods."""
    gains = pd.DataFrame([
        {"method": "direct_kd", "w_bits": 4, "a_bits": 4, "mean": 1.0, "ci95_high": 1.5},
        {"method": "finetune", "w_bits": 4, "a_bits": 4, "mean": 2.0, "ci95_high": 2.5},
        {"method": "ta_chain", "w_bits": 4, "a_bits": 4, "mean": 3.0, "ci95_high": 3.5},
    ])
    ax = plots.plot_gain_over_individual(gains).axes[0]
    entries = legend_entries(ax)
    assert list(entries) == [METHOD_LABELS[m] for m in ("finetune", "direct_kd", "ta_chain")]
    bars = {label: [(p.get_x() + p.get_width() / 2, p.get_width(), p.get_height())
                    for p in container.patches] for label, container in entries.items()}
    third = 0.8 / 3
    assert bars == {METHOD_LABELS["finetune"]: [(pytest.approx(-third), pytest.approx(third), 2.0)],
                    METHOD_LABELS["direct_kd"]: [(pytest.approx(0.0), pytest.approx(third), 1.0)],
                    METHOD_LABELS["ta_chain"]: [(pytest.approx(third), pytest.approx(third), 3.0)]}


def _record(run_id, method, w_bits, seed, val_top1, init_id=None):
    return {"run_id": run_id,
            "config": {"method": method, "w_bits": w_bits, "a_bits": w_bits, "seed": seed,
                       "init_id": init_id},
            "history": [{"epoch": e, "val_top1": v} for e, v in enumerate(val_top1, 1)]}


def test_chain_curves_follow_the_init_links_one_after_another():
    records = [
        _record("c1", "ta_chain", 1, 0, [5.0], init_id="c8"),
        _record("f8", "finetune", 8, 0, [97.0], init_id="t0"),  # from the teacher, no link
        _record("i4", "individual", 4, 0, [99.0]),  # not part of the chain
        _record("t1", "teacher", 32, 1, [99.0, 99.0]),  # another seed
        _record("c8", "ta_chain", 8, 0, [15.0, 25.0, 30.0], init_id="t0"),
        _record("t0", "teacher", 32, 0, [10.0, 20.0]),
    ]
    fig = plots.plot_chain_curves(records, seed=0)
    ax = fig.axes[0]
    entries = legend_entries(ax)
    assert list(entries) == ["32-bit teacher", "8-bit", "1-bit"]
    curves = {label: (list(line.get_xdata()), list(line.get_ydata()))
              for label, line in entries.items()}
    assert curves == {"32-bit teacher": ([1, 2], [10.0, 20.0]),
                      "8-bit": ([3, 4, 5], [15.0, 25.0, 30.0]), "1-bit": ([6], [5.0])}
    separators = [line.get_xdata()[0] for line in ax.get_lines()
                  if line.get_label().startswith("_")]
    assert separators == [0.5, 2.5, 5.5]


def test_accuracy_vs_size_means_over_seeds_at_each_storage():
    kib = 8 * 1024  # bits per KiB
    frame = pd.DataFrame([
        {"method": "teacher", "storage_bits": 100 * kib, "test_top1": 70.0},
        {"method": "teacher", "storage_bits": 100 * kib, "test_top1": 72.0},
        {"method": "individual", "storage_bits": 20 * kib, "test_top1": 50.0},
        {"method": "individual", "storage_bits": 20 * kib, "test_top1": 54.0},
        {"method": "individual", "storage_bits": 10 * kib, "test_top1": 40.0},
        {"method": "individual", "storage_bits": NAN, "test_top1": 99.0},  # a record without a size
        {"method": "ta_chain", "storage_bits": 10 * kib, "test_top1": 45.0},
        {"method": "ta_chain", "storage_bits": 10 * kib, "test_top1": 47.0},
    ])
    fig = plots.plot_accuracy_vs_size(frame)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "model size (KiB, quantized layers at their bit width, log scale)"
    entries = legend_entries(ax)
    assert set(entries) == {"teacher", METHOD_LABELS["individual"], METHOD_LABELS["ta_chain"]}
    assert errorbar_data(entries["teacher"]) == ([100.0], [71.0], pytest.approx([math.sqrt(2)]))
    assert errorbar_data(entries[METHOD_LABELS["individual"]]) == (
        [10.0, 20.0], [40.0, 52.0], pytest.approx([0.0, math.sqrt(8)]))
    assert errorbar_data(entries[METHOD_LABELS["ta_chain"]]) == ([10.0], [46.0],
                                                                 pytest.approx([math.sqrt(2)]))
    teacher_line = entries["teacher"].lines[0]
    assert teacher_line.get_marker() == "s" \
        and to_rgba(teacher_line.get_color()) == to_rgba("black")


def test_accuracy_vs_size_sizes_every_seed_of_a_setting_by_its_packed_files():
    """Seed 0 keeps a packed file, the other seeds none, and two files of one layout differ by
    header bytes: each setting is still one point, at its files' median size."""
    kib = 1024
    frame = pd.DataFrame([
        {"method": "individual", "storage_bits": 8 * 20 * kib, "packed_bytes": 21 * kib + 10,
         "test_top1": 50.0},
        {"method": "individual", "storage_bits": 8 * 20 * kib, "packed_bytes": NAN,
         "test_top1": 54.0},
        {"method": "direct_kd", "storage_bits": 8 * 20 * kib, "packed_bytes": 21 * kib + 30,
         "test_top1": 60.0},
        {"method": "direct_kd", "storage_bits": 8 * 20 * kib, "packed_bytes": NAN,
         "test_top1": 62.0},
        {"method": "individual", "storage_bits": 8 * 10 * kib, "packed_bytes": NAN,
         "test_top1": 40.0},
        {"method": "individual", "storage_bits": NAN, "packed_bytes": NAN,
         "test_top1": 99.0},  # a record without a size: not drawn, not counted as on paper
    ])
    ax = plots.plot_accuracy_vs_size(frame).axes[0]
    entries = legend_entries(ax)
    assert errorbar_data(entries[METHOD_LABELS["individual"]]) == (
        [10.0, 21.0 + 20 / kib], [40.0, 52.0], pytest.approx([0.0, math.sqrt(8)]))
    assert errorbar_data(entries[METHOD_LABELS["direct_kd"]]) == (
        [21.0 + 20 / kib], [61.0], pytest.approx([math.sqrt(2)]))
    # the 10 KiB setting has no file: the axis says that some sizes are on paper
    assert ax.get_xlabel() == (
        "model size (KiB, packed weights file, log scale)"
        "\non paper (quantized layers at their bit width) where no run kept a file")
    filed_only = plots.plot_accuracy_vs_size(frame[frame["storage_bits"] != 8 * 10 * kib]).axes[0]
    assert filed_only.get_xlabel() == "model size (KiB, packed weights file, log scale)"


def test_accuracy_vs_size_places_a_setting_at_the_median_of_its_files_not_their_mean():
    """Three seeds kept files, one of them an outlier: the point sits at the middle file."""
    kib = 1024
    sizes = [21 * kib, 21 * kib + 10, 30 * kib]  # the median is the middle one, the mean is not
    frame = pd.DataFrame([{"method": "individual", "storage_bits": 8 * 20 * kib,
                           "packed_bytes": b, "test_top1": 50.0 + i}
                          for i, b in enumerate(sizes)])
    ax = plots.plot_accuracy_vs_size(frame).axes[0]
    x, _y, _half = errorbar_data(legend_entries(ax)[METHOD_LABELS["individual"]])
    assert x == pytest.approx([sorted(sizes)[1] / kib])


def test_save_figure_creates_the_folder_and_a_png(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = plots.save_figure(fig, tmp_path / "figures" / "line.png")
    assert path == tmp_path / "figures" / "line.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_figure_drawn_from_other_records_than_now_is_stale(tmp_path, monkeypatch):
    import kdlib.results
    from kdlib.results import drawn_from_digest

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text('{"run_id": "a"}')
    fig, ax = plt.subplots()
    drawn = plots.save_figure(fig, tmp_path / "figures" / "drawn.png", drawn_from_digest(tmp_path))
    unstamped = plots.save_figure(fig, tmp_path / "figures" / "unstamped.png")
    assert plots.figure_stamp(drawn) == drawn_from_digest(tmp_path)
    assert plots.figure_stamp(unstamped) is None
    assert plots.stale_figures(tmp_path) == [unstamped]
    assert plots.stale_figures(tmp_path, ["drawn.png", "gone.png"]) == [
        tmp_path / "figures" / "gone.png"]  # a named figure that is missing counts
    assert plots.stale_figures(tmp_path, []) == []  # no figure named: none is stale
    (tmp_path / "runs" / "b.json").write_text('{"run_id": "b"}')  # a record more
    assert plots.stale_figures(tmp_path, ["drawn.png"]) == [drawn]
    (tmp_path / "runs" / "b.json").unlink()
    assert plots.stale_figures(tmp_path, ["drawn.png"]) == []
    (tmp_path / "runs" / "a.json").write_text('{"run_id": "a", "more": 1}')  # a record changed
    assert plots.stale_figures(tmp_path, ["drawn.png"]) == [drawn]
    (tmp_path / "runs" / "a.json").write_text('{"run_id": "a"}')
    assert plots.stale_figures(tmp_path, ["drawn.png"]) == []
    published = tmp_path / "published.csv"  # the published numbers the figures show, changed
    row = b"new,resnet20,cifar100,individual,4,4,50.0,test,\n"
    published.write_bytes(kdlib.results.PUBLISHED.read_bytes() + row)
    monkeypatch.setattr(kdlib.results, "PUBLISHED", published)
    assert plots.stale_figures(tmp_path, ["drawn.png"]) == [drawn]


def test_chain_contrasts_bars_are_the_paired_means_with_their_intervals():
    contrasts = pd.DataFrame([
        {"contrast": "ta_chain − progressive_kd32", "w_bits": 4, "a_bits": 4, "mean": 0.5,
         "ci95_low": -0.5, "ci95_high": 1.5, "n": 3},
        {"contrast": "ta_chain − progressive_kd32", "w_bits": 1, "a_bits": 1, "mean": -1.0,
         "ci95_low": float("nan"), "ci95_high": float("nan"), "n": 1},
        {"contrast": "ta_chain − progressive", "w_bits": 1, "a_bits": 1, "mean": 2.0,
         "ci95_low": 1.0, "ci95_high": 3.0, "n": 3},
    ])
    fig = plots.plot_chain_contrasts(contrasts)
    ax = fig.axes[0]
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights == [-1.0, 0.5, 2.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "ta_chain − progressive_kd32 (n = 1–3)", "ta_chain − progressive (n = 3)"]
    half_widths = sorted(float(np.ptp(seg[:, 1])) / 2 for c in ax.collections
                         for seg in c.get_segments())
    assert half_widths == [0.0, 1.0, 1.0]  # one seed: no interval drawn
    assert "95% paired interval" in ax.get_title()
    plt.close(fig)


def test_a_width_where_both_sides_are_one_training_is_labelled_not_drawn_as_a_zero():
    row = {"contrast": "ta_chain − progressive_kd32", "a_bits": 16, "w_bits": 16, "mean": 0.0,
           "ci95_low": 0.0, "ci95_high": 0.0, "n": 3}
    contrasts = pd.DataFrame([row, {**row, "w_bits": 2, "a_bits": 2, "mean": -1.0,
                                    "ci95_low": -2.0, "ci95_high": 0.0, "n": 2}])
    fig = plots.plot_chain_contrasts(contrasts,
                                     same_run={("ta_chain − progressive_kd32", 16, 16)})
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [-1.0]  # no bar at 16
    assert ax.get_xlim() == (-0.5, 1.5)  # but its slot, where the label stands
    assert [t.get_text().strip() for t in ax.texts if "same" in t.get_text()] == ["same run"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "ta_chain − progressive_kd32 (n = 2)"]  # 16 bits' three seeds compared nothing
    plt.close(fig)
    only_same = plots.plot_chain_contrasts(contrasts.iloc[:1],
                                           same_run={("ta_chain − progressive_kd32", 16, 16)})
    assert [t.get_text() for t in only_same.axes[0].get_legend().get_texts()] == [
        "ta_chain − progressive_kd32"]
    plt.close(only_same)


def test_a_same_run_label_stands_in_its_own_contrasts_slot_at_its_width():
    """Two contrasts share each width's slot: the 'same run' label names the contrast and width
    whose sides are one training, not its neighbour's bar or another width."""
    contrasts = pd.DataFrame([
        {"contrast": name, "w_bits": b, "a_bits": b, "mean": 1.0, "ci95_low": 0.5,
         "ci95_high": 1.5, "n": 3}
        for name in ("ta_chain − progressive_kd32", "ta_chain − progressive") for b in (8, 4)])
    fig = plots.plot_chain_contrasts(contrasts, same_run={("ta_chain − progressive", 8, 8)})
    ax = fig.axes[0]
    # 8 bits at slot 0, the second contrast's half of it centred at +0.2
    assert [(round(t.get_position()[0], 6), t.get_text().strip()) for t in ax.texts
            if "same" in t.get_text()] == [(0.2, "same run")]
    assert sorted(round(p.get_x() + p.get_width() / 2, 6) for p in ax.patches) == [-0.2, 0.8, 1.2]
    plt.close(fig)


def test_chain_contrasts_mark_the_calls_that_stand_beyond_their_error_bars():
    """* at the far end of each interval that Holm's correction keeps (above a gain, below a
    loss), none elsewhere, and a note that says what * means."""
    # two seeds: the fewest with an interval; weights at 2 bits with 8-bit activations
    contrasts = pd.DataFrame([
        {"contrast": "ta_chain − progressive_kd32", "w_bits": w, "a_bits": a, "mean": m,
         "ci95_low": m - 0.5, "ci95_high": m + 0.5, "n": 2}
        for w, a, m in ((8, 8, 1.0), (4, 4, -2.0), (2, 8, 3.0), (1, 1, 0.2))])
    fig = plots.plot_chain_contrasts(contrasts, stands={("ta_chain − progressive_kd32", 8, 8),
                                                        ("ta_chain − progressive_kd32", 4, 4),
                                                        ("ta_chain − progressive_kd32", 2, 8)})
    ax = fig.axes[0]
    assert "95% paired interval" in ax.get_title()
    marks = sorted((round(float(a.xy[1]), 6), a.get_va()) for a in ax.texts if a.get_text() == "*")
    assert marks == [(-2.5, "top"), (1.5, "bottom"), (3.5, "bottom")]
    assert any("Holm" in a.get_text() for a in ax.texts)
    plt.close(fig)
    unmarked = plots.plot_chain_contrasts(contrasts)
    assert not [a for a in unmarked.axes[0].texts if a.get_text() == "*"]
    plt.close(unmarked)


def test_chain_contrasts_with_one_seed_say_so_and_draw_no_error_bars():
    contrasts = pd.DataFrame([
        {"contrast": "ta_chain − progressive", "w_bits": b, "a_bits": b, "mean": m,
         "ci95_low": float("nan"), "ci95_high": float("nan"), "n": 1}
        for b, m in ((4, 0.5), (1, -1.0))])
    fig = plots.plot_chain_contrasts(contrasts, stands=set())  # nothing is tested with one seed
    ax = fig.axes[0]
    assert ax.get_title().endswith("(one seed: no interval yet)")
    assert not [seg for c in ax.collections for seg in c.get_segments()]
    assert not [t for t in ax.texts if "Holm" in t.get_text()]  # no note on calls never made
    plt.close(fig)


def test_figures_of_no_rows_draw_empty_axes():
    """A grid with no pairs yet (one method trained, or none) still gets its figures, empty."""
    for fig in (plots.plot_gain_over_individual(pd.DataFrame()),
                plots.plot_chain_contrasts(pd.DataFrame()),
                plots.plot_accuracy_vs_bits(pd.DataFrame(columns=["method", "w_bits", "a_bits",
                                                                  "mean", "std"]))):
        ax = fig.axes[0]
        assert list(ax.get_xticks()) == [] and not ax.patches and ax.get_legend() is None
    plt.close("all")


def test_every_student_method_has_a_place_and_a_label_in_the_figures():
    """The figures draw the methods of `METHOD_ORDER` under their `METHOD_LABELS`: a method
    added to `kdlib.config.METHODS` without both would be left out of every figure, silently
    (the tables would still show it, last)."""
    from kdlib.config import METHODS
    from kdlib.results import METHOD_ORDER

    students = [m for m in METHODS if m != "teacher"]
    assert sorted(METHOD_ORDER) == sorted(students), \
        "add the method to METHOD_ORDER in kdlib/results.py"
    assert sorted(METHOD_LABELS) == sorted(students), \
        "add the method's legend label to METHOD_LABELS in kdlib/plots.py"
