"""The README's numbers come from the committed result files."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from kdlib import report
from kdlib.presets import build_config
from kdlib.report import (newest_bench_file, published_table, render_bench, render_results,
                          replace_block)

ROOT = Path(__file__).resolve().parent.parent
CPU_BENCH = ROOT / "results" / "bench" / "vm-AMD_EPYC_family_26_model_2.json"  # a committed one


@pytest.mark.slow
def test_readme_blocks_match_result_files():
    proc = subprocess.run([sys.executable, "-m", "kdlib", "readme", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_replace_block_rewrites_only_between_markers():
    text = "a\n<!-- results:start -->\nold\n<!-- results:end -->\nz\n"
    assert replace_block(text, "results", "new") \
        == "a\n<!-- results:start -->\nnew\n<!-- results:end -->\nz\n"
    with pytest.raises(ValueError, match="no <!-- bench:start -->"):
        replace_block(text, "bench", "x")


def test_render_results_without_records(tmp_path):
    assert "No run records" in render_results(tmp_path)


def write_record(results_dir, run_id, method, bits, seed, top1, *, created_at, call_seconds=300.0,
                 wall_time_s=300.0, host="alpha", cpu_count=2, device="cpu", epochs=1,
                 cpu_model=None, gpu=None):
    """A run record as experiments.train_run writes it (a full smoke config), hand-set numbers."""
    w, a = bits if isinstance(bits, tuple) else (bits, bits)
    config = build_config("smoke", "resnet8", teacher=method == "teacher", overrides={
        "method": method, "w_bits": w, "a_bits": a, "seed": seed, "epochs": epochs,
        "train_size": 200, "val_size": 100, "test_size": 200}).to_dict()
    metrics = {"best_epoch": epochs, "best_val_top1": top1, "best_val_top5": top1,
               "test_top1": top1, "test_top5": top1, "final_test_top1": top1,
               "final_test_top5": top1}
    record = {"run_id": run_id, "config": config, "metrics": metrics, "history": [{"epoch": 1}],
              "wall_time_s": wall_time_s, "images_per_s": 100.0, "device": device,
              "model_size": {"params": 10, "storage_bits": 320}, "created_at": created_at,
              "call_seconds": call_seconds, "host": host, "cpu_count": cpu_count,
              **({"cpu_model": cpu_model} if cpu_model else {}), **({"gpu": gpu} if gpu else {}),
              "versions": {"torch": "2.5.0"}, "git_commit": "0123abc"}
    (results_dir / "runs").mkdir(parents=True, exist_ok=True)
    (results_dir / "runs" / f"{run_id}.json").write_text(json.dumps(record))


PUBLISHED = pd.DataFrame([
    {"source": "liao2020", "model": "resnet8", "method": "individual", "w_bits": 32, "a_bits": 32,
     "top1": 63.81},
    {"source": "liao2020", "model": "resnet8", "method": "individual", "w_bits": 4, "a_bits": 4,
     "top1": 60.8},
    {"source": "liao2020", "model": "resnet8", "method": "individual", "w_bits": 2, "a_bits": 2,
     "top1": 53.69},
    {"source": "liao2020", "model": "resnet8", "method": "kd_no_ta", "w_bits": 4, "a_bits": 4,
     "top1": 62.24},
    {"source": "shin2019", "model": "resnet8", "method": "kd_ternary", "w_bits": 2, "a_bits": 32,
     "top1": 67.0},
    {"source": "repdistiller", "model": "resnet8", "method": "individual", "w_bits": 32,
     "a_bits": 32, "top1": 69.06},
])

# Hand-written: teacher 40/42, individual 4-bit 10/12.5, 2/8-bit 5 (one seed), chain 4-bit 20/21.
# Wall times 600 + 600 + 5 x 300 s = 0.75 h; seed 0: 600 + 3 x 300 s = 0.42 h on alpha, whose
# records predate cpu_model; seed 1: 600 + 2 x 300 s = 0.33 h, of which 300 s on beta's GPU.
# The 2/32 published row has w != a: left out.
EXPECTED_RESULTS = (r"""| method \ bits   | 32           | 4            | 2/8   |
|:----------------|:-------------|:-------------|:------|
| teacher         | 41.00 ± 1.41 |              |       |
| individual      |              | 11.25 ± 1.77 | 5.00  |
| ta_chain        |              | 20.50 ± 0.71 |       |

"""
                    "Test top-1 (%) at the epoch of best validation accuracy; resnet8, preset "
                    "`smoke`, seed(s) 0, 1 (mean ± std over seeds). Teacher: 41.00% after 2 "
                    "epochs; `individual`: 1 epoch; every other student: 1 epoch(s) per chain "
                    "link. 200 training images (class-balanced subset), 100 validation images, "
                    "200 test images. 7 records of 7 trained runs, 0.75 h of training summed "
                    "over runs (seed 0: 0.42 h on an unrecorded CPU; seed 1: 0.33 h (0.25 h on "
                    "an unrecorded CPU; 0.08 h on an NVIDIA H200)), on cpu, cuda (host alpha, 2 "
                    "CPUs, torch 2.5.0; beta, 8 CPUs, torch 2.5.0).\n"
                    "\n"
                    "Not every cell has every seed (a cell is over the seeds it has; a contrast "
                    "pairs only the seeds both sides have): seed(s) 0, 1 for `teacher`, "
                    "`individual` at bits 4, `ta_chain`; seed(s) 0 for `individual` at bits 2/8.\n"
                    "\n"
                    "Published numbers for the same network (`kdlib/reference/published.csv`, "
                    "full training sets and schedules; liao2020 chose its epoch on the **test** "
                    "set, which flatters it, RepDistiller reports the last epoch):\n"
                    r"""
| source method \ bits    | 32    | 4     | 2     |
|:------------------------|:------|:------|:------|
| liao2020 individual     | 63.81 | 60.80 | 53.69 |
| liao2020 kd_no_ta       |       | 62.24 |       |
| repdistiller individual | 69.06 |       |       |""")


def write_hand_made_results(results_dir):
    write_record(results_dir, "t0", "teacher", 32, 0, 40.0, epochs=2, wall_time_s=600.0,
                 call_seconds=600.0, created_at="2026-01-01T10:00:00+00:00")
    write_record(results_dir, "t1", "teacher", 32, 1, 42.0, epochs=2, wall_time_s=600.0,
                 call_seconds=600.0, created_at="2026-01-01T10:30:00+00:00")
    write_record(results_dir, "i4-0", "individual", 4, 0, 10.0,
                 created_at="2026-01-01T10:40:00+00:00")
    write_record(results_dir, "i4-1", "individual", 4, 1, 12.5,
                 created_at="2026-01-01T10:45:00+00:00")
    write_record(results_dir, "i28-0", "individual", (2, 8), 0, 5.0,
                 created_at="2026-01-01T10:50:00+00:00")
    write_record(results_dir, "c4-0", "ta_chain", 4, 0, 20.0,
                 created_at="2026-01-01T11:00:00+00:00")
    write_record(results_dir, "c4-1", "ta_chain", 4, 1, 21.0,
                 created_at="2026-01-01T12:20:00+01:00",
                 host="beta", cpu_count=8, device="cuda", cpu_model="Big CPU", gpu="NVIDIA H200")


def test_render_results_from_hand_written_records(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(report, "load_published", lambda model: asked.append(model) or PUBLISHED)
    write_hand_made_results(tmp_path)
    assert render_results(tmp_path) == EXPECTED_RESULTS
    assert asked == ["resnet8"]


def test_a_method_missing_a_seed_is_named_under_the_table(tmp_path, monkeypatch):
    """A third seed of the teacher and the chain, but not of `individual`, must be said, not
    silently averaged over; so must a width of one method that has fewer seeds than its others."""
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    noon = "2026-01-01T12:00:00+00:00"
    write_record(tmp_path, "t0", "teacher", 32, 0, 40.0, epochs=2, created_at=noon)
    write_record(tmp_path, "t1", "teacher", 32, 1, 42.0, epochs=2, created_at=noon)
    for seed in (0, 1):
        write_record(tmp_path, f"i4-{seed}", "individual", 4, seed, 10.0 + seed, created_at=noon)
        write_record(tmp_path, f"c4-{seed}", "ta_chain", 4, seed, 20.0 + seed, created_at=noon)
    assert "has every seed" not in render_results(tmp_path)
    write_record(tmp_path, "t2", "teacher", 32, 2, 41.0, epochs=2, created_at=noon)
    write_record(tmp_path, "c4-2", "ta_chain", 4, 2, 22.0, created_at=noon)
    text = render_results(tmp_path)
    assert "seed(s) 0, 1, 2 for `teacher`, `ta_chain`; seed(s) 0, 1 for `individual`." in text
    write_record(tmp_path, "c2-0", "ta_chain", 2, 0, 15.0, created_at=noon)
    text = render_results(tmp_path)
    assert ("seed(s) 0, 1, 2 for `teacher`, `ta_chain` at bits 4; seed(s) 0, 1 for "
            "`individual`; seed(s) 0 for `ta_chain` at bits 2." in text)


def test_a_full_split_says_how_many_images_trained(tmp_path, monkeypatch):
    """No train_size: every training image but the validation split, as many as that leaves."""
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    write_hand_made_results(tmp_path)
    for path in (tmp_path / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        record["config"].update(train_size=None, val_size=2500)
        path.write_text(json.dumps(record))
    assert "All 47,500 training images, 2500 validation images" in render_results(tmp_path)


def _edit_record(results_dir, run_id, **fields):
    path = results_dir / "runs" / f"{run_id}.json"
    record = json.loads(path.read_text())
    for key, value in fields.items():
        if key in ("lr", "epochs"):
            record["config"][key] = value
        else:
            record[key] = value
    path.write_text(json.dumps(record))


def test_a_record_of_another_methods_run_adds_no_training_time(tmp_path, monkeypatch):
    """A `same_run_as` record (one training shown under two names) is counted as a record, not
    as a trained run, and its copied wall time is not summed again."""
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    write_hand_made_results(tmp_path)
    write_record(tmp_path, "k4-0", "direct_kd", 4, 0, 20.0, created_at="2026-01-01T11:05:00+00:00")
    _edit_record(tmp_path, "k4-0", same_run_as="c4-0")
    text = render_results(tmp_path)
    assert "8 records of 7 trained runs, 0.75 h of training summed over runs (seed 0: 0.42 h" \
        in text
    assert "| direct_kd       |              | 20.00*       |" in text


def test_one_seed_is_said_to_have_no_error_bars(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    write_record(tmp_path, "t0", "teacher", 32, 0, 40.0, epochs=2,
                 created_at="2026-01-01T10:00:00+00:00")
    write_record(tmp_path, "i4-0", "individual", 4, 0, 10.0, epochs=2,
                 created_at="2026-01-01T10:40:00+00:00")
    text = render_results(tmp_path)
    assert "seed(s) 0 (one seed: no error bars)." in text and "mean ± std" not in text


def test_individual_is_called_the_fair_baseline_only_on_the_teachers_schedule(tmp_path,
                                                                             monkeypatch):
    """The claim needs the teacher's epochs and learning rate both; the hand-made records
    (individual: 1 epoch, teacher: 2) make no such claim."""
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    claim = "`individual`: 2 epochs (the teacher's own schedule: the fair trained-alone baseline)"
    write_record(tmp_path, "t0", "teacher", 32, 0, 40.0, epochs=2,
                 created_at="2026-01-01T10:00:00+00:00")
    write_record(tmp_path, "i4-0", "individual", 4, 0, 10.0, epochs=2,
                 created_at="2026-01-01T10:40:00+00:00")
    assert claim in render_results(tmp_path)
    _edit_record(tmp_path, "i4-0", lr=0.2)  # the teacher's epochs, another learning rate
    text = render_results(tmp_path)
    assert "`individual`: 2 epochs." in text and "fair trained-alone" not in text
    _edit_record(tmp_path, "i4-0", lr=0.05, epochs=1)
    assert "fair trained-alone" not in render_results(tmp_path)


def test_runs_from_a_modified_working_tree_are_counted_under_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    write_hand_made_results(tmp_path)
    assert "modified working tree" not in render_results(tmp_path)
    _edit_record(tmp_path, "i4-0", git_commit="0123abc+dirty")
    _edit_record(tmp_path, "c4-1", git_commit="0123abc+dirty")
    assert ("**2 of 7 trained runs were made from a modified working tree** (their `git_commit` "
            "ends in `+dirty`): the code") in render_results(tmp_path)
    # one training shown under a second name is one dirty run, and the records say so apart
    write_record(tmp_path, "k4-1", "direct_kd", 4, 1, 21.0, created_at="2026-01-01T12:30:00+00:00")
    _edit_record(tmp_path, "k4-1", same_run_as="c4-1", git_commit="0123abc+dirty")
    assert ("**2 of 7 trained runs were made from a modified working tree** (their `git_commit` "
            "ends in `+dirty`; 3 of the 8 records, counting each name a run is shown under): "
            "the code") in render_results(tmp_path)


def test_a_model_without_published_numbers_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "load_published",
                        lambda model: PUBLISHED[PUBLISHED["model"] == model])
    write_hand_made_results(tmp_path)
    assert "Published numbers for the same network" in render_results(tmp_path)
    for path in (tmp_path / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        record["config"]["model"] = "squeezenet"
        path.write_text(json.dumps(record))
    text = render_results(tmp_path)
    assert "No published numbers for squeezenet" in text and "source method" not in text


def test_published_table_from_the_shipped_csv():
    table = published_table("resnet20")
    assert list(table.columns) == ["32", "16", "8", "4", "2", "1"]
    assert table.loc["liao2020 ta_chain", "2"] == "57.84" \
        and table.loc["liao2020 individual", "1"] == "37.00"
    assert table.loc["lqnet_repro lqnet", "2"] == "63.10" \
        and table.loc["lqnet_repro lqnet", "32"] == ""
    assert "shin2019 kd_ternary" not in table.index  # 2-bit weights, 32-bit activations
    assert not any(name.startswith("takd2020") for name in table.index)  # a resnet8 source


def _bench_file(folder, name, date, mtime):
    path = folder / name
    path.write_text(json.dumps({"date": date}))
    os.utime(path, (mtime, mtime))
    return path


def test_newest_bench_file_goes_by_the_date_inside(tmp_path):
    assert newest_bench_file(tmp_path) is None
    _bench_file(tmp_path, "a.json", "2026-03-01T12:00:00+00:00", mtime=3_000_000)
    newest = _bench_file(tmp_path, "b.json", "2026-03-01T10:00:00-03:00",  # 13:00 UTC
                         mtime=1_000_000)
    _bench_file(tmp_path, "c.json", "2026-02-01T12:00:00+00:00", mtime=9_000_000)  # touched last
    assert newest_bench_file(tmp_path) == newest
    tie = _bench_file(tmp_path, "d.json", "2026-03-01T13:00:00+00:00", mtime=2_000_000)
    assert newest_bench_file(tmp_path) == tie  # same instant as b: the later file name
    (tmp_path / "e.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match=r"e\.json has no readable 'date'"):
        newest_bench_file(tmp_path)


def test_render_bench_shows_the_newest_benchmark(tmp_path):
    measured = json.loads(CPU_BENCH.read_text())
    for name, date, mtime in [("old.json", "2025-12-01T08:00:00+00:00", 9_000_000),
                              ("new.json", "2025-12-02T08:00:00+00:00", 1_000_000)]:
        (tmp_path / name).write_text(json.dumps({**measured, "date": date}))
        os.utime(tmp_path / name, (mtime, mtime))
    rendered = render_bench(tmp_path)
    assert "2025-12-02T08:00:00+00:00" in rendered and "2025-12-01" not in rendered
    assert render_bench(tmp_path / "none") == "_No benchmark yet: `make bench` creates one._"


def blank_blocks(text):
    """The README with every generated block emptied: the hand-written text around them."""
    return re.sub(r"(<!-- (\w+):start -->\n).*?(\n<!-- \2:end -->)", r"\1\3", text, flags=re.S)


def block(text, name):
    return re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S).group(1)


@pytest.fixture
def stale_readme(tmp_path, monkeypatch):
    """A copy of the checkout's README, its results block stale, where `readme` writes."""
    from kdlib import cli

    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    text = replace_block((ROOT / "README.md").read_text(), "results", "old numbers")
    (tmp_path / "README.md").write_text(text)
    write_hand_made_results(tmp_path / "results")
    return tmp_path / "README.md"


def test_cli_readme_rewrites_the_blocks_then_check_agrees(stale_readme, tmp_path,
                                                          monkeypatch, capsys):
    from kdlib import cli

    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    before = stale_readme.read_text()
    results, bench = tmp_path / "results", tmp_path / "bench"
    args = ["--results-dir", str(results), "--bench-dir", str(bench)]
    assert cli.main(["readme", *args]) == 0
    assert capsys.readouterr().out == f"README.md updated from {results} and {bench}\n"
    after = stale_readme.read_text()
    assert block(after, "results") == EXPECTED_RESULTS
    assert block(after, "bench") == "_No benchmark yet: `make bench` creates one._"
    # no quick_squeezenet beside these results: nothing to set beside their answer
    assert block(after, "agreement") == "_Two grids' answers are compared once both have records._"
    assert blank_blocks(after) == blank_blocks(before)  # nothing outside the blocks changed
    assert cli.main(["readme", "--check", *args]) == 0
    assert capsys.readouterr().out == "README.md agrees with the result files\n"
    written = stale_readme.stat().st_mtime_ns
    assert cli.main(["readme", *args]) == 0  # nothing to change: says so, leaves the file
    assert capsys.readouterr().out == "README.md already agrees with the result files: unchanged\n"
    assert stale_readme.stat().st_mtime_ns == written


def test_cli_readme_check_fails_when_a_number_is_out_of_date(stale_readme, tmp_path, capsys):
    from kdlib import cli

    args = ["--results-dir", str(tmp_path / "results"), "--bench-dir", str(tmp_path / "bench")]
    assert cli.main(["readme", *args]) == 0
    edited = stale_readme.read_text().replace("20.50 ± 0.71", "20.60 ± 0.71")
    stale_readme.write_text(edited)
    capsys.readouterr()
    assert cli.main(["readme", "--check", *args]) == 2
    assert capsys.readouterr().err == ("error: README.md is out of date with the result files "
                                       "(blocks results): run python -m kdlib readme\n")
    assert stale_readme.read_text() == edited  # --check never writes


def test_the_changed_blocks_are_named_in_the_readmes_order():
    from kdlib.report import changed_blocks

    old = ("intro\n<!-- a:start -->\n1\n<!-- a:end -->\ntext\n<!-- b:start -->\n2\n"
           "<!-- b:end -->\n<!-- c:start -->\n3\n<!-- c:end -->\n")
    assert changed_blocks(old, old) == []
    assert changed_blocks(old, old.replace("\n3\n", "\n3.1\n").replace("\n1\n", "\n0\n")) \
        == ["a", "c"]
    assert changed_blocks(old, old.replace("text", "prose")) == []  # only the blocks


def test_cli_readme_check_fails_on_a_shown_figure_older_than_its_records(stale_readme, tmp_path,
                                                                      capsys):
    """The README shows results/quick/figures/*.png: drawn from other records than
    results/quick/runs holds now (or missing), --check names them and the command that redraws."""
    from kdlib import cli, plots
    from kdlib.results import drawn_from_digest

    args = ["--results-dir", str(tmp_path / "results"), "--bench-dir", str(tmp_path / "bench")]
    assert cli.main(["readme", *args]) == 0  # no results/quick here: nothing to check
    quick = tmp_path / "results" / "quick"
    write_hand_made_results(quick)
    capsys.readouterr()
    assert cli.main(["readme", "--check", *args]) == 2
    err = capsys.readouterr().err
    assert "chain_contrasts.png, accuracy_vs_bits.png of " in err
    assert "(python -m kdlib run --preset quick --only 04)" in err
    fig = plt.figure()
    for name in ("chain_contrasts.png", "accuracy_vs_bits.png"):
        plots.save_figure(fig, quick / "figures" / name, drawn_from_digest(quick))
    assert cli.main(["readme", "--check", *args]) == 0
    write_record(quick, "c4-2", "ta_chain", 4, 2, 22.0, created_at="2026-01-02T10:00:00+00:00")
    assert cli.main(["readme", "--check", *args]) == 2
    assert capsys.readouterr().err.count(".png") == 2
    assert cli.main(["readme", *args]) == 0  # writes the README, warns
    assert "warning: figures the README shows were drawn from other records" in (
        capsys.readouterr().err)


def test_cpu_and_gpu_benchmarks_render_in_their_own_blocks(tmp_path):
    measured = json.loads(CPU_BENCH.read_text())
    gpu = {**measured, "date": "2099-01-01T00:00:00+00:00",
           "machine": {**measured["machine"], "gpu": "NVIDIA H200", "device": "cuda:0"}}
    (tmp_path / "vm.json").write_text(json.dumps(measured))
    (tmp_path / "NVIDIA_H200.json").write_text(json.dumps(gpu))
    # the newer GPU file is not the CPU's
    assert newest_bench_file(tmp_path) == tmp_path / "vm.json"
    assert newest_bench_file(tmp_path, gpu=True) == tmp_path / "NVIDIA_H200.json"
    assert "2099-01-01" in render_bench(tmp_path, gpu=True)
    assert "No GPU benchmark yet" in render_bench(tmp_path / "none", gpu=True)


def test_gpu_block_lists_the_runs_still_missing(tmp_path, monkeypatch):
    from kdlib.experiments import plan_grid
    from kdlib.presets import get_preset

    seeds = get_preset("gpu").seeds
    plan = plan_grid(preset="gpu", seeds=list(seeds))
    a_seed = len(plan) // len(seeds)
    empty = report.render_gpu(tmp_path / "gpu", tmp_path / "bench")
    assert "No `gpu` run yet" in empty \
        and f"Still missing, {len(plan)} of {len(plan)} runs" in empty
    assert f"seed 0: all {a_seed}. seed 1: all {a_seed}" in empty
    teacher = plan[0]
    write_record(tmp_path / "gpu", teacher.run_id(), "teacher", 32, 0, 61.5,
                 created_at="2026-12-02T10:00:00+00:00", device="cuda:0")
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    rendered = report.render_gpu(tmp_path / "gpu", tmp_path / "bench")
    assert f"Still missing, {len(plan) - 1} of {len(plan)} runs" in rendered
    assert "seed 0: ta_chain 16, 8, 4, 2, 1;" in rendered and f"seed 1: all {a_seed}" in rendered
    assert "teacher 32" not in rendered
    assert "61.50" in rendered  # the table of what has come in
    individual = next(cfg for cfg in plan if cfg.method == "individual" and cfg.w_bits == 8)
    checkpoint = tmp_path / "gpu" / "checkpoints" / f"{individual.run_id()}.pt"
    checkpoint.parent.mkdir()
    torch.save({"epoch": 6}, checkpoint)  # paused at a lease's end
    assert "paused" not in report.render_gpu(tmp_path / "gpu", tmp_path / "bench")
    seed_1 = next(cfg for cfg in plan if cfg.method == "teacher" and cfg.seed == 1)
    torch.save({"epoch": 3}, checkpoint.parent / f"{seed_1.run_id()}.pt")  # a seed just begun
    from kdlib.results import note_paused  # what `lease receive` writes, and git keeps

    assert note_paused(tmp_path / "gpu") == {individual.run_id(): 6, seed_1.run_id(): 3}
    checkpoint.unlink()  # a fresh clone: checkpoints/ is ignored
    rendered = report.render_gpu(tmp_path / "gpu", tmp_path / "bench")
    assert f"individual 16, 8 (paused at epoch 6 of {individual.epochs}), 4" in rendered
    assert (f"seed 1: all {a_seed}, of which teacher 32 (paused at epoch 3 of "
            f"{seed_1.epochs})") in rendered
    write_record(tmp_path / "gpu", individual.run_id(), "individual", 8, 0, 50.0,
                 created_at="2026-12-02T11:00:00+00:00", device="cuda:0")
    rendered = report.render_gpu(tmp_path / "gpu", tmp_path / "bench")
    assert "individual 16, 4" in rendered and "paused at epoch 6" not in rendered  # finished since


def test_a_lease_filled_grid_states_its_answer_as_it_fills(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    gpu = tmp_path / "gpu"
    write_record(gpu, "t0", "teacher", 32, 0, 61.0, created_at="2026-12-02T10:00:00+00:00")
    assert "The answer so far" not in report.render_gpu(gpu, tmp_path / "bench")  # no contrast
    for seed, (chain, control) in enumerate([(50.0, 51.0), (50.5, 51.8), (49.9, 51.2)]):
        write_record(gpu, f"c{seed}", "ta_chain", 8, seed, chain,
                     created_at="2026-12-02T10:00:00+00:00")
        write_record(gpu, f"p{seed}", "progressive_kd32", 8, seed, control,
                     created_at="2026-12-02T10:00:00+00:00")
        rendered = report.render_gpu(gpu, tmp_path / "bench")
        assert "**The answer so far** (resnet8, preset `smoke`" in rendered
        assert ("one seed, no interval yet (8: -1.00 points)" in rendered) is (seed == 0)
    assert "n = 3 seeds: the 32-bit teacher is better at 8 bit (8: -1.20 [" in rendered
    assert "| ta_chain − progressive_kd32 (n = 3) " in rendered
    assert rendered.index("The answer so far") < rendered.index("Still missing")
    for seed, (chain, control) in enumerate([(40.0, 41.0), (40.4, 41.0)]):  # 4 bit: 2 seeds yet
        write_record(gpu, f"c4-{seed}", "ta_chain", 4, seed, chain,
                     created_at="2026-12-02T10:00:00+00:00")
        write_record(gpu, f"p4-{seed}", "progressive_kd32", 4, seed, control,
                     created_at="2026-12-02T10:00:00+00:00")
    rendered = report.render_gpu(gpu, tmp_path / "bench")  # no width credited with 3 seeds
    assert "| ta_chain − progressive_kd32 (n = 2–3) " in rendered
    assert "n = 2–3 seeds: the 32-bit teacher is better at 8 bit" in rendered


def test_a_grid_block_shows_the_figures_notebook_04_drew_and_sets_its_answer_beside_another(
        tmp_path, monkeypatch):
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    gpu, quick = tmp_path / "gpu", tmp_path / "quick"
    write_record(gpu, "t0", "teacher", 32, 0, 61.0, created_at="2026-12-02T10:00:00+00:00",
                 epochs=3)
    assert "![" not in report.render_gpu(gpu, tmp_path / "bench")  # none drawn yet
    (gpu / "figures").mkdir()
    (gpu / "figures" / "chain_contrasts.png").write_bytes(b"drawn")
    rendered = report.render_gpu(gpu, tmp_path / "bench")
    assert ("![resnet8, preset gpu: the chain's three paired contrasts per bit width"
            in rendered) and f"]({gpu / 'figures' / 'chain_contrasts.png'})" in rendered
    assert "accuracy_vs_bits.png" not in rendered  # only what exists
    assert rendered.index("chain_contrasts.png") < rendered.index("Still missing")
    assert "beside" not in rendered
    write_record(quick, "t0", "teacher", 32, 0, 54.0, created_at="2026-12-02T10:00:00+00:00")
    rendered = report.render_gpu(gpu, tmp_path / "bench", beside=quick)
    assert ("**resnet8 (preset `smoke`, 1 seed(s), 200 training images, teacher 61.00% after 3 "
            "epochs) beside resnet8 (preset `smoke`, 1 seed(s), 200 training images, teacher "
            "54.00% after 1 epoch)**: no contrast that both test") in rendered


@pytest.mark.parametrize("block, preset, folder", [
    ("paper", "paper", "paper_dir"),
    ("squeezenet", "quick_squeezenet", "squeezenet_dir")])
def test_a_grid_block_shows_its_runs_as_they_come_in(tmp_path, monkeypatch, block, preset, folder):
    """The paper grid (lease after lease) and SqueezeNet's (session after session): the table,
    the answer once there is one (`render_progress`, tested with the gpu block), the runs
    still missing."""
    from kdlib.experiments import plan_grid
    from kdlib.presets import get_preset

    plan = plan_grid(preset=preset, seeds=list(get_preset(preset).seeds))
    readme = f"x\n<!-- {block}:start -->\nold\n<!-- {block}:end -->\n"
    monkeypatch.setattr(report, "replace_block", lambda text, name, body: (
        text.replace("old", body) if name == block else text))
    results = {folder: tmp_path / preset}
    rendered = report.render_readme(readme, tmp_path / "quick", tmp_path / "bench", **results)
    assert f"No `{preset}` run yet" in rendered
    assert f"Still missing, {len(plan)} of {len(plan)} runs of preset `{preset}`" in rendered
    write_record(tmp_path / preset, plan[0].run_id(), "teacher", 32, 0, 69.1,
                 created_at="2026-12-05T10:00:00+00:00", device="cuda:0")
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    rendered = report.render_readme(readme, tmp_path / "quick", tmp_path / "bench", **results)
    assert "69.10" in rendered and f"Still missing, {len(plan) - 1} of {len(plan)}" in rendered


@pytest.mark.parametrize("folder", ["quick", "quick_squeezenet", "gpu"])
def test_the_costs_block_reads_the_cpu_records_of_every_folder(tmp_path, monkeypatch, folder):
    """'Estimated from the rates that the committed records measured': all of them, the gpu
    preset's CPU runs too (they once were left out, and with them the newest processor)."""
    seen = []
    monkeypatch.setattr(report, "render_costs", lambda presets, runs: seen.append(runs) or "")
    monkeypatch.setattr(report, "replace_block", lambda text, name, body: text)
    write_record(tmp_path / folder, "i4-0", "individual", 4, 0, 10.0, cpu_model="New CPU",
                 created_at="2026-12-05T10:00:00+00:00")
    write_record(tmp_path / folder, "t0", "teacher", 32, 0, 40.0, device="cuda:0",
                 created_at="2026-12-05T11:00:00+00:00")
    report.render_readme("x", tmp_path / "quick", tmp_path / "bench",
                         gpu_dir=tmp_path / "gpu", squeezenet_dir=tmp_path / "quick_squeezenet",
                         paper_dir=tmp_path / "paper")
    (runs,) = seen
    assert runs["run_id"].tolist() == ["i4-0"]  # the CPU record, not the GPU one
    assert runs["cpu_model"].tolist() == ["New CPU"]


def test_the_map_of_the_package_names_every_module():
    """"How it fits together" lists kdlib's modules and subpackages: a new one must appear there."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How it fits together"):]
    listing = re.search(r"^kdlib/\s+(.*?)^results/", section, re.S | re.M)
    named = {name.strip() for name in listing.group(1).split("·")}
    package = ROOT / "kdlib"
    modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("__")}
    subpackages = {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert named == modules | subpackages


def test_every_figure_the_readme_shows_is_committed():
    """An image link that points nowhere renders as a broken picture on the project page."""
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    missing = [link for link in links if link not in tracked]
    assert not missing, f"README shows figures that are not committed: {missing}"


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation but '-' dropped,
    spaces as '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("document", ["README.md", "kdlib/lease/README.md"])
def test_every_link_between_the_documents_lands(document):
    """A relative link names a tracked file, and its #anchor a heading there: the lease
    mechanics live in kdlib/lease/README.md, which the README points to."""
    text = (ROOT / document).read_text()
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    assert links, f"{document} links nowhere: the pattern no longer finds its links"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (ROOT / document).parent / path if path else ROOT / document
        relative = target.resolve().relative_to(ROOT).as_posix()
        assert relative in tracked, f"{document} links to {link}, which is not committed"
        if anchor:
            assert anchor in heading_anchors(target.read_text()), \
                f"{document} links to {link}: no such heading in {relative}"


@pytest.mark.realdata
@pytest.mark.slow
def test_use_a_trained_model_lines_give_back_the_records_accuracy(real_data_root,
                                                                  monkeypatch, capsys):
    """The README's three lines, run on a committed 1-bit model, print its record's test top-1.
    (This model scores 42.31 in NCHW against its record's 42.30: the layout matters.)"""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use a trained model"):]
    code = section[section.index("```python\n") + len("```python\n"):
                   section.index("```\n", section.index("```python"))]
    named = re.search(r'load_packed\("(results/quick/models/[^"]+\.packed)"\)', code)
    packed = ROOT / named.group(1)  # a committed file, so that the lines run as copied
    assert subprocess.run(["git", "ls-files", "--error-unmatch", named.group(1)], cwd=ROOT,
                          capture_output=True).returncode == 0
    record = json.loads((ROOT / "results" / "quick" / "runs" / f"{packed.stem}.json").read_text())
    monkeypatch.setenv("KDLIB_DATA", str(real_data_root))
    monkeypatch.chdir(ROOT)
    exec(code, {})  # noqa: S102
    printed = capsys.readouterr().out
    assert f"'top1': {record['metrics']['test_top1']}," in printed


def test_every_rendered_table_escapes_pipes_in_cells_and_labels():
    """report, costs and verdict write their tables through markdown_table: a bare '|' would
    end a GitHub cell early. A column of formatted numbers is written as formatted (the
    README's two decimals), not re-parsed as numbers."""
    from kdlib.markdown import markdown_table

    frame = pd.DataFrame({"a|b": ["x || y", 4.30], "mean": ["4.30", "10.00"]},
                         index=pd.Index(["p|q", "r"], name="i|j"))
    lines = markdown_table(frame).splitlines()
    assert lines[0].split() == ["|", r"i\|j", "|", r"a\|b", "|", "mean", "|"]
    cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]
    assert cells == [[r"p\|q", r"x \|\| y", "4.30"], ["r", "4.3", "10.00"]]


def test_the_epochs_sentence_gives_the_teachers_mean_and_the_chain_links_own_epochs(tmp_path,
                                                                                    monkeypatch):
    """The teachers' top-1 under the table is their mean over seeds (as the table's ± is), and
    `direct_kd_matched`, trained k times a link's epochs, is not counted as a chain link."""
    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    noon = "2026-01-01T12:00:00+00:00"
    for seed, top1 in enumerate((40.0, 40.0, 49.0)):  # mean 43.00, median 40.00
        write_record(tmp_path, f"t{seed}", "teacher", 32, seed, top1, epochs=2, created_at=noon)
        write_record(tmp_path, f"c4-{seed}", "ta_chain", 4, seed, 20.0, epochs=1, created_at=noon)
        write_record(tmp_path, f"m2-{seed}", "direct_kd_matched", 2, seed, 15.0, epochs=3,
                     created_at=noon)
    text = render_results(tmp_path)
    assert ("Teacher: 43.00% after 2 epochs; every other student: 1 epoch(s) per chain link; "
            "`direct_kd_matched`: k times that") in text


def test_a_grid_block_says_when_every_planned_run_has_a_record(tmp_path, monkeypatch):
    """Once the last planned run is recorded the block says the grid is complete, rather than
    listing 'still missing, 0 of N runs'."""
    from kdlib.experiments import plan_grid

    monkeypatch.setattr(report, "load_published", lambda model: PUBLISHED)
    plan = plan_grid(preset="smoke", seeds=[0])
    for cfg in plan:
        write_record(tmp_path, cfg.run_id(), cfg.method, (cfg.w_bits, cfg.a_bits), cfg.seed,
                     50.0, created_at="2026-12-02T10:00:00+00:00")
    lines = report.render_progress(tmp_path, "smoke")
    assert lines[-1] == "Every run of preset `smoke` has a record."
    assert "Still missing" not in "\n".join(lines)
