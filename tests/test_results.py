"""Run records: atomic save, loading into pandas, statistics over seeds."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from kdlib.fileio import atomic_open, write_json_atomic
from kdlib.results import (RECORD_VERSION, load_record, load_results, paired_gain, records_table,
                           results_table, save_record, seeds_label, summarise,
                           t_interval_halfwidth)


def _record(method, bits, seed, acc):
    return {"run_id": f"r-{method}-{bits}-{seed}",
            "config": {"model": "resnet20", "method": method, "w_bits": bits, "a_bits": bits,
                       "seed": seed},
            "metrics": {"best_epoch": 1, "best_val_top1": acc, "best_val_top5": acc,
                        "test_top1": acc, "test_top5": acc, "final_test_top1": acc,
                        "final_test_top5": acc},
            "history": [{"epoch": 1, "val_top1": acc}], "wall_time_s": 1.0, "images_per_s": 10.0,
            "model_size": {"params": 10, "storage_bits": 10 * bits}}


def test_save_and_load_round_trip(tmp_path):
    path = save_record(tmp_path, _record("individual", 4, 0, 50.0))
    assert path == tmp_path / "runs" / "r-individual-4-0.json"
    assert load_record(path)["metrics"]["test_top1"] == 50.0
    assert load_record(path)["record_version"] == RECORD_VERSION  # readers can tell formats apart
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("version", [RECORD_VERSION + 1, 0, "1", None])
def test_a_record_of_a_format_this_code_does_not_read_is_refused(tmp_path, version):
    """A record written by a newer kdlib (or with a broken version) is refused by name, not read
    with today's meaning of its fields; one without the field is a hand-made first-format one."""
    path = save_record(tmp_path, _record("individual", 4, 0, 50.0))
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "record_version": version}))
    with pytest.raises(ValueError, match=rf"{path.name} has record_version {version!r}; this "
                                         rf"kdlib reads 1 to {RECORD_VERSION}: update kdlib"):
        load_record(path)
    del record["record_version"]
    path.write_text(json.dumps(record))
    assert load_record(path)["metrics"]["test_top1"] == 50.0


@pytest.mark.parametrize("field", ["config", "metrics", "history"])
def test_save_rejects_incomplete_record(tmp_path, field):
    """A record without its config, metrics or history would break every later load_results
    (epochs_run counts the history): it is refused before anything is written."""
    record = {"run_id": "x", "config": {}, "metrics": {}, "history": []}
    del record[field]
    with pytest.raises(ValueError, match=rf"lacks field\(s\) \['{field}'\]"):
        save_record(tmp_path, record)
    assert not (tmp_path / "runs" / "x.json").exists()


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])  # a failure, Ctrl-C
def test_atomic_write_interrupted_mid_write_leaves_old_file_and_no_temporary(tmp_path,
                                                                            interruption):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(interruption):
        with atomic_open(target, "w") as handle:
            handle.write('{"v": 2, "trunc')
            raise interruption("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_is_on_disk_before_it_replaces_the_old_file_and_the_rename_after(
        tmp_path, monkeypatch):
    # a power cut must leave the old file or the whole new one: the data is fsynced before the
    # rename, and the folder (which holds the rename) after it
    import stat

    import kdlib.fileio as fileio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(info.st_mode) else info.st_size))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.path.basename(target)))
        real_replace(source, target)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    size = (tmp_path / "r.json").stat().st_size
    expected = [("fsync", size), ("replace", "r.json")]
    assert events == expected + ([("fsync", "folder")] if os.name == "posix" else [])


def test_atomic_open_refuses_modes_that_would_not_replace_the_whole_file(tmp_path):
    """Append or read modes make no sense for a file that is written anew and swapped in."""
    for mode in ("a", "r", "w+"):
        with pytest.raises(ValueError, match="accepted: 'w', 'wb'"):
            with atomic_open(tmp_path / "a.json", mode):
                pass
    assert os.listdir(tmp_path) == []


def test_the_temporary_file_lives_beside_its_target(tmp_path):
    """In the target's folder, so that the rename is one file system's (atomic) rename."""
    target = tmp_path / "a.json"
    with atomic_open(target, "w") as handle:
        handle.write("{}")
        temporaries = os.listdir(tmp_path)
    assert len(temporaries) == 1 and temporaries[0].startswith(".a.json.") \
        and temporaries[0].endswith(".tmp")
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_folder_that_refuses_fsync_still_gets_the_file(tmp_path, monkeypatch):
    """Some network file systems refuse to fsync a directory: the write succeeds anyway."""
    import stat

    import kdlib.fileio as fileio

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError("fsync of a directory refused")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_json_records_are_sorted_indented_newline_ended_and_keep_nan(tmp_path):
    """Stable, diffable record files: keys sorted, one per line, a final newline; a NaN metric
    (a diverged run) is written, not refused."""
    obj = {"b": 1, "a": {"d": float("nan"), "c": [1, 2]}}
    write_json_atomic(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text()
    assert text == json.dumps(obj, indent=1, sort_keys=True) + "\n"
    assert text.index('"a"') < text.index('"b"') and "NaN" in text
    assert len(text.splitlines()) > 1 and text.endswith("}\n")


def test_corrupt_record_is_named(tmp_path):
    bad = tmp_path / "runs" / "bad.json"
    bad.parent.mkdir()
    bad.write_text('{"run_id": ')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        load_results(tmp_path)


@pytest.mark.parametrize("content", [[1, 2], {"config": {}}, {"run_id": "x"}])
def test_a_json_file_that_is_not_a_run_record_is_named(tmp_path, content):
    """A stray JSON file in runs/ is refused with its name, not read as a run that then fails
    with a KeyError far from its cause."""
    stray = tmp_path / "runs" / "stray.json"
    stray.parent.mkdir()
    stray.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"stray\.json lacks run_id/config"):
        load_results(tmp_path)


def test_load_results_empty_and_full(tmp_path):
    empty = load_results(tmp_path)
    assert empty.empty  # and has the columns, so that filtering it finds nothing, not a KeyError
    assert empty[(empty["method"] == "individual") & (empty["seed"] == 0)]["test_top1"].empty
    for seed, acc in enumerate([50.0, 52.0, 54.0]):
        save_record(tmp_path, _record("individual", 4, seed, acc))
    frame = load_results(tmp_path)
    assert len(frame) == 3 and set(frame["seed"]) == {0, 1, 2}
    assert {"test_top1", "storage_bits", "wall_time_s"} <= set(frame.columns)
    assert frame["storage_bits"].tolist() == [40] * 3 and frame["params"].tolist() == [10] * 3


def test_packed_size_comes_from_the_record_else_from_the_file_in_the_checkout(tmp_path):
    """A clone without a run's packed file (seeds > 0) still sizes it by its record; records
    older than the field are sized by the file where the checkout has it, and an alias by the
    file of the run it points to. The packed-models table lists only files that are there."""
    from kdlib.report import render_packed_models

    (tmp_path / "models").mkdir()
    recorded = _record("individual", 4, 1, 50.0) | {"packed_bytes": 1234}
    old_with_file = _record("individual", 4, 0, 52.0)
    (tmp_path / "models" / f"{old_with_file['run_id']}.packed").write_bytes(b"x" * 777)
    alias = _record("direct_kd", 4, 0, 52.0) | {"same_run_as": old_with_file["run_id"]}
    old_without_file = _record("individual", 4, 2, 54.0)
    # a file of another size than its record states (a stale copy): the record's size wins
    stale = _record("individual", 4, 3, 56.0) | {"packed_bytes": 555}
    (tmp_path / "models" / f"{stale['run_id']}.packed").write_bytes(b"x" * 999)
    for record in (recorded, old_with_file, alias, old_without_file, stale):
        save_record(tmp_path, record)
    frame = load_results(tmp_path).set_index("run_id")
    assert frame.loc[recorded["run_id"], "packed_bytes"] == 1234
    assert frame.loc[old_with_file["run_id"], "packed_bytes"] == 777
    assert frame.loc[alias["run_id"], "packed_bytes"] == 777
    assert pd.isna(frame.loc[old_without_file["run_id"], "packed_bytes"])
    assert frame.loc[stale["run_id"], "packed_bytes"] == 555
    # whose file each row's is: the alias's is the run it is recorded as
    assert frame.loc[alias["run_id"], "trained_as"] == old_with_file["run_id"]
    assert frame.loc[stale["run_id"], "trained_as"] == stale["run_id"]
    assert frame["packed_file"].to_dict() == {
        recorded["run_id"]: False, old_with_file["run_id"]: True, alias["run_id"]: True,
        old_without_file["run_id"]: False, stale["run_id"]: True}
    seed1 = render_packed_models(tmp_path, seed=1)  # seed 1's size is recorded, its file absent
    assert "individual" not in seed1 and "1.2" not in seed1
    seed0 = render_packed_models(tmp_path, seed=0)
    assert "| individual           | 0.8  |" in seed0
    assert "| direct_kd            | 0.8* |" in seed0  # the alias: marked, not one more file
    assert "\\* Not a file of its own: the same training run as another method's" in seed0
    assert "Not a file of its own" not in render_packed_models(tmp_path, seed=3)


def test_summarise_matches_independent_statistics():
    accs = np.array([50.0, 52.0, 57.0])
    frame = pd.DataFrame({"model": "m", "method": "individual", "w_bits": 4, "a_bits": 4,
                          "seed": [0, 1, 2], "test_top1": accs})
    row = summarise(frame).iloc[0]
    assert row["n"] == 3
    assert math.isclose(row["mean"], accs.mean())
    assert math.isclose(row["std"], accs.std(ddof=1))
    t_975_df2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom
    half = t_975_df2 * accs.std(ddof=1) / math.sqrt(3)
    assert math.isclose(row["ci95_high"] - row["mean"], half, rel_tol=1e-9)
    single = summarise(frame.iloc[:1]).iloc[0]
    assert single["n"] == 1 and math.isnan(single["ci95_low"])


def test_paired_gain_pairs_by_seed():
    rows = []
    for seed, (base, kd) in enumerate([(50.0, 53.0), (60.0, 62.0), (40.0, 44.0)]):
        rows += [{"model": "m", "method": "individual", "w_bits": 2, "a_bits": 2, "seed": seed,
                  "test_top1": base},
                 {"model": "m", "method": "ta_chain", "w_bits": 2, "a_bits": 2, "seed": seed,
                  "test_top1": kd}]
    gain = paired_gain(pd.DataFrame(rows)).iloc[0]
    assert gain["method"] == "ta_chain" and math.isclose(gain["mean"], 3.0)
    assert math.isclose(gain["std"], np.std([3.0, 2.0, 4.0], ddof=1))


def _rows(method, bits, accs, model="m", first_seed=0):
    return [{"model": model, "method": method, "w_bits": bits, "a_bits": bits, "seed": seed,
             "test_top1": acc}
            for seed, acc in enumerate(accs, first_seed)]


def test_paired_gain_interval_matches_a_paired_t_test():
    from scipy import stats

    base, kd = [50.0, 60.0, 40.0, 55.0], [53.0, 62.0, 44.0, 55.5]
    frame = pd.DataFrame(_rows("individual", 2, base) + _rows("ta_chain", 2, kd))
    gain = paired_gain(frame).iloc[0]
    expected = stats.ttest_rel(kd, base).confidence_interval(0.95)
    assert gain["n"] == 4 and math.isclose(gain["mean"], np.mean(np.subtract(kd, base)))
    assert math.isclose(gain["ci95_low"], expected.low, rel_tol=1e-9)
    assert math.isclose(gain["ci95_high"], expected.high, rel_tol=1e-9)
    # pairing removes the between-seed spread: the paired interval is far narrower than the
    # one of the difference of two independent means
    independent = stats.ttest_ind(kd, base).confidence_interval(0.95)
    assert gain["ci95_high"] - gain["ci95_low"] < (independent.high - independent.low) / 4


def test_paired_gain_leaves_out_teacher_baseline_and_unpaired_seeds():
    frame = pd.DataFrame(
        _rows("individual", 2, [50.0, 60.0, 40.0])
        + _rows("ta_chain", 2, [53.0, 62.0, 44.0, 99.0])  # seed 3 has no individual run
        + _rows("direct_kd", 2, [51.0, 70.0])
        + _rows("individual", 32, [70.0, 71.0, 72.0])
        + _rows("teacher", 32, [80.0, 80.0, 80.0])  # would pair with individual at 32 bits
        + _rows("individual", 2, [0.0, 0.0, 0.0], model="other"))  # another model's baseline
    gains = paired_gain(frame)
    assert list(zip(gains["method"], gains["w_bits"], gains["n"])) == [("direct_kd", 2, 2),
                                                                       ("ta_chain", 2, 3)]
    ta = gains[gains["method"] == "ta_chain"].iloc[0]
    assert math.isclose(ta["mean"], 3.0) and math.isclose(ta["std"], 1.0)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * s / sqrt(n)
    assert math.isclose(ta["ci95_low"], 3.0 - half) and math.isclose(ta["ci95_high"], 3.0 + half)
    kd = gains[gains["method"] == "direct_kd"].iloc[0]
    assert math.isclose(kd["mean"], 5.5)


def test_paired_gain_of_one_seed_has_no_interval():
    gain = paired_gain(pd.DataFrame(_rows("individual", 4, [50.0])
                                    + _rows("ta_chain", 4, [52.0]))).iloc[0]
    assert gain["n"] == 1 and gain["mean"] == 2.0
    assert math.isnan(gain["ci95_low"]) and math.isnan(gain["ci95_high"])


@pytest.mark.parametrize("std, n", [(float("nan"), 5), (float("inf"), 5), (2.0, 1), (2.0, 0)])
def test_t_interval_halfwidth_is_nan_without_a_finite_spread(std, n):
    assert math.isnan(t_interval_halfwidth(std, n))


def test_seeds_label_gives_the_range_when_widths_have_different_seed_counts():
    assert seeds_label([3, 3, 3]) == "n = 3"
    assert seeds_label(pd.Series([3, 2, 3, 1])) == "n = 1–3"
    assert seeds_label([10, 3, 10]) == "n = 3–10"  # by number, whatever order they come in


def test_t_interval_halfwidth_formula():
    t_95_df4 = 2.776445105197793  # Student t quantile 0.975, 4 degrees of freedom
    assert math.isclose(t_interval_halfwidth(2.0, 5), t_95_df4 * 2.0 / math.sqrt(5), rel_tol=1e-12)
    t_90_df4 = 2.1318467863266495  # quantile 0.95: the 90% interval
    assert math.isclose(t_interval_halfwidth(2.0, 5, confidence=0.9), t_90_df4 * 2.0 / math.sqrt(5),
                        rel_tol=1e-12)


def test_results_table_shape():
    frame = pd.DataFrame([{"model": "m", "method": m, "w_bits": b, "a_bits": b, "seed": s,
                           "test_top1": 10.0 * b + s}
                          for m in ("ta_chain", "individual") for b in (1, 8) for s in (0, 1)])
    table = results_table(summarise(frame))
    assert list(table.index) == ["individual", "ta_chain"]
    assert list(table.columns) == ["8", "1"]
    assert table.loc["individual", "8"] == "80.50 ± 0.71"


def test_atomic_writes_are_readable_by_others_on_a_shared_folder(tmp_path):
    import stat

    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_tables_order_methods_teacher_first_and_bits_widest_first():
    from kdlib.results import in_bits_order, in_method_order
    assert in_method_order(["ta_chain", "zzz_new", "teacher", "individual"]) == [
        "teacher", "individual", "ta_chain", "zzz_new"]
    # methods it does not know, in name order: the same table row order on every call
    new = ["new_f", "new_b", "new_e", "new_a", "new_d", "new_c"]
    assert in_method_order(["individual", *new]) == ["individual", *sorted(new)]
    assert in_bits_order(["2", "16", "2/8", "32", "4"])[:2] == ["32", "16"]
    assert in_bits_order(["1", "8", "8"]) == ["8", "1"]


def test_a_changed_record_or_weights_file_is_not_changed_code(tmp_path, monkeypatch):
    """Records and weights change under results/ while a grid runs (a record moved aside to
    retrain a run): the runs' code is still the commit. A changed tracked file elsewhere is."""
    import subprocess

    from kdlib.results import git_commit

    monkeypatch.delenv("KDLIB_GIT_COMMIT", raising=False)
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True,  # noqa: E731
                                       capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) is None  # no checkout: no commit, rather than an empty one
    git("init", "-q")
    for name in ("kdlib/train.py", "notebooks/04_results.py", "results/quick/runs/a.json",
                 "results/quick/models/a.packed"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    sha = git("rev-parse", "HEAD")
    package = tmp_path / "kdlib"
    (tmp_path / "results/quick/runs/a.json").unlink()
    (tmp_path / "results/quick/models/a.packed").write_text("1")
    (tmp_path / "untracked.py").write_text("1")
    assert git_commit(package) == sha
    (tmp_path / "notebooks/04_results.py").write_text("1")  # outside the package: code still
    assert git_commit(package) == sha + "+dirty"
    git("checkout", "--", "notebooks")
    (tmp_path / "kdlib/train.py").write_text("1")
    assert git_commit(package) == sha + "+dirty"
    (tmp_path / ".git" / "index").write_text("garbage")  # git status fails, rev-parse does not
    assert git_commit(package) is None  # a tree that may be modified is not stated as clean


def test_summarise_lists_the_widest_bits_first():
    frame = pd.DataFrame([_record("individual", b, s, 50.0 + b + s)["config"]
                          | {"test_top1": 50.0 + b + s} for b in (2, 8, 4) for s in (0, 1)])
    out = summarise(frame, by=["model", "method", "w_bits", "a_bits"])
    assert list(out["w_bits"]) == sorted(out["w_bits"], reverse=True)


def test_shared_cells_marks_a_cell_only_when_all_its_runs_are_aliases():
    from kdlib.results import shared_cells

    rows = [{"method": "direct_kd", "w_bits": 8, "a_bits": 8, "same_run_as": "x"},
            {"method": "direct_kd", "w_bits": 8, "a_bits": 8, "same_run_as": "y"},
            {"method": "direct_kd", "w_bits": 4, "a_bits": 4, "same_run_as": "z"},
            {"method": "direct_kd", "w_bits": 4, "a_bits": 4, "same_run_as": None}]
    assert shared_cells(pd.DataFrame(rows)) == {("direct_kd", "8")}
    # a frame without the column (nothing recorded as another run) marks nothing
    assert shared_cells(pd.DataFrame(rows).drop(columns="same_run_as")) == set()


def test_noted_paused_forgets_runs_recorded_since(tmp_path):
    from kdlib.results import PAUSED_FILE, noted_paused

    (tmp_path / PAUSED_FILE).write_text(json.dumps({"r-individual-4-0": 3, "r-individual-2-0": 5}))
    save_record(tmp_path, _record("individual", 4, 0, 50.0))
    assert noted_paused(tmp_path) == {"r-individual-2-0": 5}


def test_summarise_counts_only_seeds_with_a_value():
    """A seed without a number (NaN metric) is not a seed of the mean: n, and so the
    t-interval's degrees of freedom, count only the values there are."""
    from scipy import stats

    accs = [50.0, 52.0, float("nan"), 57.0]
    frame = pd.DataFrame({"model": "m", "method": "individual", "w_bits": 4, "a_bits": 4,
                          "seed": [0, 1, 2, 3], "test_top1": accs})
    row = summarise(frame).iloc[0]
    finite = [50.0, 52.0, 57.0]
    low, high = stats.t.interval(0.95, df=2, loc=np.mean(finite), scale=stats.sem(finite))
    assert row["n"] == 3 and math.isclose(row["mean"], np.mean(finite))
    assert math.isclose(row["ci95_low"], low) and math.isclose(row["ci95_high"], high)


def test_summarise_keeps_a_group_whose_key_is_missing():
    """A group keyed by NaN (train_size None: the full training set) is summarised like any
    other, not dropped."""
    frame = pd.DataFrame({"method": "individual", "train_size": [None, None, 5000.0, 5000.0],
                          "seed": [0, 1, 0, 1], "test_top1": [60.0, 62.0, 40.0, 44.0]})
    out = summarise(frame, by=["method", "train_size"])
    assert len(out) == 2 and out["n"].tolist() == [2, 2]
    full = out[out["train_size"].isna()].iloc[0]
    assert full["mean"] == 61.0 and math.isclose(full["std"], math.sqrt(2.0))


def test_difference_text_shows_the_interval_from_two_seeds_on():
    """Two seeds already have an interval (df = 1): it is written, only one seed is bare."""
    from kdlib.results import difference_text

    assert difference_text(1.5, 0.5, 2.5, 2) == "+1.50 [+0.50, +2.50]"
    assert difference_text(-0.25, -1.0, 0.5, 3) == "-0.25 [-1.00, +0.50]"
    assert difference_text(1.5, float("nan"), float("nan"), 1) == "+1.50"


def test_paired_gain_lists_the_widest_bits_first():
    """Like every table of the workbook: per method, the widest bit width first."""
    frame = pd.DataFrame(_rows("individual", 2, [50.0, 60.0])
                         + _rows("ta_chain", 2, [51.0, 61.0])
                         + _rows("individual", 8, [70.0, 71.0])
                         + _rows("ta_chain", 8, [72.0, 73.0]))
    gains = paired_gain(frame)
    assert gains["w_bits"].tolist() == [8, 2] and gains["mean"].tolist() == [2.0, 1.0]


def test_results_table_names_how_many_settings_clash():
    """Two settings of one method at one width: the error counts both of them."""
    summary = pd.DataFrame({"model": "m", "method": "ta_chain", "w_bits": 4, "a_bits": 4,
                            "setting": ["a", "b"], "mean": [50.0, 51.0], "std": [1.0, 1.0],
                            "n": [3, 3]})
    with pytest.raises(ValueError, match="'ta_chain' has 2 settings at 4 bits"):
        results_table(summary)
    two_models = summary.assign(model=["resnet20", "squeezenet"], setting="a")
    with pytest.raises(ValueError, match="'ta_chain' has 2 settings at 4 bits.*a results "
                                         r"folder of its own \(--results-dir\)$"):
        results_table(two_models)  # a table has one cell for both: never drop one silently


def test_epochs_run_counts_the_history_rows(tmp_path):
    """epochs_run is the number of epochs the record's history holds."""
    record = _record("individual", 4, 0, 50.0)
    record["history"] = [{"epoch": e, "val_top1": 40.0 + e} for e in (1, 2, 3)]
    save_record(tmp_path, record)
    assert load_results(tmp_path)["epochs_run"].tolist() == [3]


def test_packed_models_are_sized_in_kibibytes(tmp_path):
    """The table's unit is KiB (1024 bytes), as the packed files' sizes are read: 10240 bytes
    is 10.0 KiB, where dividing by 1000 would say 10.2."""
    from kdlib.report import render_packed_models

    (tmp_path / "models").mkdir()
    record = _record("individual", 4, 0, 50.0)
    (tmp_path / "models" / f"{record['run_id']}.packed").write_bytes(b"x" * 10240)
    save_record(tmp_path, record)
    table = render_packed_models(tmp_path, seed=0)
    assert "| 10.0 |" in table and "10.2" not in table


def test_the_packed_models_table_says_what_the_smallest_files_header_takes(tmp_path):
    """Read from the smallest-bit file itself (a real packed file), and left out where the
    file is none."""
    from kdlib.export import save_packed
    from kdlib.export.packed import header_size
    from kdlib.models import create_model
    from kdlib.report import render_packed_models
    from kdlib.results import packed_path

    for bits in (4, 1):
        record = _record("individual", bits, 0, 50.0)
        path = save_packed(create_model("resnet8", num_classes=100, w_bits=bits, a_bits=bits),
                           packed_path(tmp_path, record["run_id"]), model_name="resnet8")
        save_record(tmp_path, record | {"packed_bytes": path.stat().st_size})
    header = header_size(path)  # the 1-bit file's
    assert (f"In a 1-bit file, preamble and header (model, run id, tensor table) take "
            f"{header / 1024:.1f} KiB, {100 * header / path.stat().st_size:.0f}% of it."
            in render_packed_models(tmp_path))
    path.write_bytes(b"x" * 100)  # no packed file: no sentence, the table still
    assert "preamble" not in render_packed_models(tmp_path)


def test_records_table_keeps_each_records_bits_seed_and_metrics():
    """What the notebooks show of a pipeline's records: one row per run, weight and activation
    bits apart (4/8 is not 4/4)."""
    mixed = _record("individual", 4, 2, 50.0)
    mixed["config"]["a_bits"] = 8
    table = records_table([mixed, _record("ta_chain", 2, 0, 40.0)])
    assert table[["method", "w_bits", "a_bits", "seed", "test_top1"]].values.tolist() == [
        ["individual", 4, 8, 2, 50.0], ["ta_chain", 2, 2, 0, 40.0]]


def test_a_record_states_the_commit_of_the_code_imported_not_a_later_one(monkeypatch):
    """A run states the code it ran, read when kdlib was imported: not the commit the tree (or
    the environment) names when the record is written hours later."""
    import kdlib.results as results

    monkeypatch.setenv("KDLIB_GIT_COMMIT", "a-later-commit")
    assert results.environment_info()["git_commit"] == results.CODE_COMMIT != "a-later-commit"


def test_the_newest_record_names_the_machine_whatever_its_file_order(tmp_path):
    """load_results keeps each record's date: the costs name the processor of the newest
    record first, even when its file sorts before an older one's."""
    from kdlib.costs import machines

    for seed, day, cpu in ((0, "05", "new box"), (1, "01", "old box")):
        save_record(tmp_path, _record("individual", 4, seed, 50.0)
                    | {"created_at": f"2026-12-{day}T10:00:00+00:00", "cpu_model": cpu})
    assert machines(load_results(tmp_path)) == ["new box", "old box"]
