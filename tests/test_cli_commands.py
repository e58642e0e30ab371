"""`python -m kdlib summary` and `run`: what they print, the parameters they hand the notebooks."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlib.cli import build_parser, main, model_of, notebook_parameters
from kdlib.results import load_records, save_record

ROOT = Path(__file__).resolve().parent.parent
TINY = {"train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 50}


def forbid(monkeypatch, target, names, why):
    """Make calling any of ``names`` on ``target`` fail the test with ``why``."""
    def must_not_run(*args, **kwargs):
        raise AssertionError(why)

    for name in names:
        monkeypatch.setattr(target, name, must_not_run)


def assert_refused(capsys, refused, results_dir):
    """Exit 2's one-line error names ``refused``, and nothing was written."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and refused in err and len(err.splitlines()) == 1
    assert not results_dir.exists()


def _record(method, bits, seed, top1):
    metrics = {"best_epoch": 1, "best_val_top1": top1, "best_val_top5": top1, "test_top1": top1,
               "test_top5": top1, "final_test_top1": top1, "final_test_top5": top1}
    return {"run_id": f"r-{method}-{bits}-{seed}", "metrics": metrics, "history": [{"epoch": 1}],
            "config": {"model": "resnet8", "method": method, "w_bits": bits, "a_bits": bits,
                       "seed": seed}}


def test_summary_prints_mean_std_and_interval_per_group(tmp_path, capsys):
    for seed, top1 in enumerate([50.0, 52.0, 57.0]):
        save_record(tmp_path, _record("individual", 4, seed, top1))
    save_record(tmp_path, _record("teacher", 32, 0, 70.0))
    assert main(["summary", "--results-dir", str(tmp_path)]) == 0
    header, *rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    columns = ["model", "method", "w_bits", "a_bits", "mean", "std", "n", "ci95_low", "ci95_high"]
    assert set(columns) <= set(header)
    shown = [[row[header.index(c)] for c in columns] for row in rows]
    std = math.sqrt(((50 - 53) ** 2 + (52 - 53) ** 2 + (57 - 53) ** 2) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, df=2)
    assert shown == [
        ["resnet8", "individual", "4", "4", "53.00", f"{std:.2f}", "3", f"{53 - half:.2f}",
         f"{53 + half:.2f}"],
        ["resnet8", "teacher", "32", "32", "70.00", "NaN", "1", "NaN", "NaN"],
    ]


def test_summary_of_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["summary", "--results-dir", str(tmp_path / "nothing")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: no run records in {tmp_path / 'nothing' / 'runs'}\n"
    assert captured.out == ""


def test_notebook_parameters_per_notebook(tmp_path):
    args = build_parser().parse_args([
        "run", "--preset", "smoke", "--model", "resnet8", "--seeds", "0", "2",
        "--data-dir", "/data/c100", "--device", "cpu", "--set", "epochs=3",
        "--set", "schedule=cosine", "--chain", "32", "8", "4/8", "--bits", "4", "2/8",
        "--methods", "individual", "direct_kd"])
    common = {"preset": "smoke", "model": "resnet8", "seeds": [0, 2], "data_dir": "/data/c100",
              "results_dir": str(tmp_path), "overrides": {"epochs": 3, "schedule": "cosine"},
              "device": "cpu"}
    assert notebook_parameters(args, "01_baseline", tmp_path) == common
    assert notebook_parameters(args, "02_ta_chain", tmp_path) == {
        **common, "chain": [32, 8, "4/8"],
        "methods": ["ta_chain", "progressive", "progressive_kd32"]}
    assert notebook_parameters(args, "03_individual", tmp_path) == {
        **common, "bits": [4, "2/8"], "methods": ["individual", "direct_kd"]}
    assert notebook_parameters(args, "04_results", tmp_path) == {
        "preset": "smoke", "results_dir": str(tmp_path)}


def test_folders_inside_the_checkout_reach_the_notebooks_relative_to_their_folder(monkeypatch,
                                                                                  tmp_path):
    """The kernel runs in notebooks/: a folder of this checkout is named from there (the same text
    in every clone, so a rerun elsewhere leaves the committed notebooks as they are) and still
    names the same folder; a folder outside the checkout stays absolute."""
    monkeypatch.chdir(ROOT)  # --data-dir is relative to where the command is typed, not notebooks/
    args = build_parser().parse_args(["run", "--preset", "quick", "--data-dir", "data"])
    params = notebook_parameters(args, "01_baseline", ROOT / "results" / "quick")
    assert (params["results_dir"], params["data_dir"]) == ("../results/quick", "../data")
    assert (ROOT / "notebooks" / params["data_dir"]).resolve() == ROOT / "data"
    outside = notebook_parameters(args, "04_results", tmp_path / "elsewhere")
    assert outside["results_dir"] == str(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")  # a linked data folder: named as given
    assert notebook_parameters(args, "04_results", tmp_path / "link")["results_dir"] \
        == str(tmp_path / "link")


def test_train_names_a_trained_teacher_when_a_starting_point_is_missing(tmp_path, capsys):
    save_record(tmp_path,
                _record("teacher", 32, 0, 60.0) | {"run_id": "resnet8-teacher-w32a32-s0-abc"})
    assert main(["train", "--preset", "smoke", "--method", "finetune",
                 "--results-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "e.g. the teacher resnet8-teacher-w32a32-s0-abc)")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) \
        == ["resnet8-teacher-w32a32-s0-abc.json"]


@pytest.mark.parametrize("preset", ["quick", "quick_squeezenet"])
def test_train_builds_the_grids_own_run_for_each_method(preset, tmp_path, monkeypatch):
    """`train --method individual --w-bits 4` is the table's `individual` run (the teacher's
    schedule), so it finds its record instead of training a run the table cannot pool."""
    from kdlib import cli
    from kdlib.experiments import plan_grid

    built = []
    monkeypatch.setattr(cli, "execute", lambda plan, **_: built.extend(plan) or [
        {"run_id": cfg.run_id(), "metrics": {}} for cfg in plan])
    monkeypatch.setattr(cli, "_check_starting_points", lambda *_: None)
    grid = {(c.method, c.w_bits): c for c in plan_grid(preset=preset, seeds=[1])}
    teacher = grid["teacher", 32].run_id()
    starts = {"teacher": [], "individual": [], "finetune": ["--init-id", teacher],
              "direct_kd": ["--init-id", teacher, "--teacher-id", teacher]}
    for (method, bits), cfg in grid.items():
        if method in starts:
            assert main(["train", "--preset", preset, "--method", method, "--w-bits", str(bits),
                         "--seed", "1", "--results-dir", str(tmp_path), *starts[method]]) == 0
            assert built.pop().run_id() == cfg.run_id(), (method, bits)
    assert sum(method == "individual" for method, _ in grid) == 5


def test_the_preset_names_the_model_unless_the_command_line_does(tmp_path):
    """`--preset quick_squeezenet` alone trains SqueezeNet, not a ResNet-20 under its name."""
    from kdlib.experiments import plan_grid

    args = build_parser().parse_args(["run", "--preset", "quick_squeezenet"])
    assert notebook_parameters(args, "01_baseline", tmp_path)["model"] == "squeezenet"
    for command in ("grid", "train"):
        assert model_of(build_parser().parse_args([command, "--preset", "quick_squeezenet"])) \
            == "squeezenet"
    assert {c.model for c in plan_grid(preset="quick_squeezenet")} == {"squeezenet"}
    assert {c.model for c in plan_grid(preset="quick")} == {"resnet20"}
    explicit = build_parser().parse_args(["run", "--preset", "quick_squeezenet",
                                          "--model", "resnet8"])
    assert notebook_parameters(explicit, "01_baseline", tmp_path)["model"] == "resnet8"
    assert {c.model for c in plan_grid(preset="quick_squeezenet", model="resnet8")} == {"resnet8"}


def test_notebook_parameters_fill_unset_options_from_the_preset_not_the_notebook(tmp_path):
    """A notebook's own defaults are the smoke settings: `run` always injects the preset's grid."""
    args = build_parser().parse_args(["run", "--preset", "quick_squeezenet",
                                      "--model", "squeezenet"])
    for name in ("01_baseline", "02_ta_chain", "03_individual"):
        params = notebook_parameters(args, name, tmp_path)
        assert params["preset"] == "quick_squeezenet" and params["results_dir"] == str(tmp_path)
        assert (params["data_dir"], params["device"], params["overrides"]) == ("", "", {})
        assert params["seeds"] == [0, 1, 2]  # the notebooks' own: [0]
    assert notebook_parameters(args, "02_ta_chain", tmp_path)["methods"] == [
        "ta_chain", "progressive", "progressive_kd32"]
    assert notebook_parameters(args, "02_ta_chain", tmp_path)["chain"] == [32, 16, 8, 4, 2, 1]
    students = notebook_parameters(args, "03_individual", tmp_path)
    assert students["methods"] == ["individual", "direct_kd", "direct_kd_matched"]
    assert students["bits"] == [16, 8, 4, 2, 1]


def _injected_parameters(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return next("".join(c["source"]) for c in cells
                if "injected-parameters" in c["metadata"].get("tags", []))


@pytest.mark.realdata
@pytest.mark.slow
def test_run_smoke_preset_end_to_end(real_data_root, tmp_path):
    sets = [a for k, v in {**TINY, "epochs": 1}.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(
        [sys.executable, "-m", "kdlib", "run", "--preset", "smoke", "--model", "resnet8",
         "--chain", "32", "4",
         "--bits", "4", "--methods", "individual", "--data-dir", str(real_data_root),
         "--results-dir", str(tmp_path), *sets],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == (f"done: records in {tmp_path / 'runs'}, "
                                            f"executed notebooks in {tmp_path / 'executed'}")
    all_records = load_records(tmp_path)
    records = {(r["config"]["method"], r["config"]["w_bits"]): r for r in all_records}
    # --chain 32 4, --bits 4, --methods individual: nothing at other widths, no other student method
    assert {("teacher", 32), ("ta_chain", 4), ("individual", 4)} <= set(records)
    assert {w for _, w in records} == {32, 4}
    assert not {"finetune", "direct_kd"} & {m for m, _ in records}
    for record in all_records:
        config = record["config"]
        assert (config["model"], config["preset"], config["seed"], config["epochs"]) \
            == ("resnet8", "smoke", 0, 1)
        assert {k: config[k] for k in TINY} == TINY
        assert len(record["history"]) == 1
    teacher_id = records[("teacher", 32)]["run_id"]
    assert records[("ta_chain", 4)]["config"]["teacher_id"] == teacher_id
    assert records[("individual", 4)]["config"]["init_id"] is None
    executed = json.loads((tmp_path / "executed" / "02_ta_chain.ipynb").read_text())
    assert executed["metadata"]["papermill"]["input_path"] == "notebooks/02_ta_chain.ipynb"
    assert executed["metadata"]["papermill"]["output_path"] \
        == str(tmp_path / "executed" / "02_ta_chain.ipynb")
    assert "injected-parameters" in [c["id"] for c in executed["cells"]]
    for name in ("01_baseline", "02_ta_chain", "03_individual", "04_results"):
        shown = json.dumps([c.get("outputs", []) for c in json.loads(
            (tmp_path / "executed" / f"{name}.ipynb").read_text())["cells"]])
        # reads the same in every clone
        assert "Warning" not in shown and str(ROOT) not in shown, name
    injected = _injected_parameters(tmp_path / "executed" / "02_ta_chain.ipynb")
    assert 'model = "resnet8"' in injected and "chain = [32, 4]" in injected
    assert f'data_dir = "{real_data_root}"' in injected
    with open(tmp_path / "summary.csv", newline="") as handle:
        summary = [row for row in csv.DictReader(handle)
                   if (row["method"], int(row["w_bits"])) in records]
    # one seed: one summary row (n = 1) per run; the other rows are the chain's contrasts
    assert sorted((row["method"], int(row["w_bits"]), row["n"]) for row in summary) == sorted(
        (r["config"]["method"], r["config"]["w_bits"], "1") for r in all_records)

    # run again on the same records: nothing the notebooks show changed, so no file does
    shown = sorted([*(tmp_path / "executed").glob("*.ipynb"),
                    *(tmp_path / "figures").glob("*.png")])
    before = {path: path.read_bytes() for path in shown}
    again = subprocess.run([sys.executable, "-m", "kdlib", "run", "--preset", "smoke",
                            "--only", "04", "--results-dir", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(before) > 5 and {path: path.read_bytes() for path in shown} == before


def test_train_with_only_w_bits_quantizes_activations_alike(tmp_path, monkeypatch):
    import kdlib.cli as cli

    planned = []
    monkeypatch.setattr(cli, "execute", lambda plan, **kw: planned.extend(plan) or [
        {"run_id": plan[0].run_id(), "metrics": {}}])
    assert main(["train", "--preset", "smoke", "--model", "resnet8", "--w-bits", "4",
                 "--results-dir", str(tmp_path)]) == 0
    assert [(c.w_bits, c.a_bits) for c in planned] == [(4, 4)]
    planned.clear()
    assert main(["train", "--preset", "smoke", "--model", "resnet8", "--w-bits", "4",
                 "--a-bits", "8", "--results-dir", str(tmp_path)]) == 0
    assert [(c.w_bits, c.a_bits) for c in planned] == [(4, 8)]
    planned.clear()
    assert main(["train", "--preset", "smoke", "--model", "resnet8", "--w-bits", "4",
                 "--set", "a_bits=8", "--results-dir", str(tmp_path)]) == 0
    assert [(c.w_bits, c.a_bits) for c in planned] == [(4, 8)]  # --set a_bits is not overruled


@pytest.mark.parametrize("key, flag", [("seed", "--seed"), ("method", "--method"),
                                       ("teacher_id", "--teacher-id"), ("init_id", "--init-id")])
def test_train_refuses_a_set_of_a_field_that_has_its_own_option(tmp_path, capsys, key, flag):
    assert main(["train", "--preset", "smoke", "--set", f"{key}=3",
                 "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"overrides name ['{key}']" in err and flag in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, refused", [
    (["grid", "--jobs", "4"], "--jobs is read by --executor processes only, not serial"),
    (["run", "--executor", "ray", "--jobs", "4"], "--jobs is read by --executor processes only"),
    (["grid", "--executor", "processes", "--address", "auto"],
     "--address is read by --executor ray"),
    (["grid", "--cpus-per-run", "4"], "--cpus-per-run is read by --executor ray only, not serial"),
    (["run", "--executor", "processes", "--gpus-per-run", "1"], "--gpus-per-run is read by"),
    (["grid", "--max-retries", "1"], "--max-retries is read by --executor ray only"),
    (["grid", "--executor", "ray", "--threads", "2"], "a Ray run's torch threads are its --cpus"),
    (["grid", "--no-span"], "--no-span is read with --budget-min only"),
    (["grid", "--executor", "processes", "--bench-dir", "b"], "--bench-dir is read with --budget"),
    (["run", "--only", "04", "--bits", "4"], "--bits is read by notebook 03 only"),
    (["run", "--only", "01", "03", "--chain-methods", "ta_chain"], "--chain-methods is read by "
                                                                    "notebook 02 only"),
    (["run", "--only", "01", "--chain", "32", "4"], "--chain is read by notebook 02 / 03 only"),
    (["run", "--only", "04", "--seeds", "1"], "--seeds is read by notebook 01 / 02 / 03 only"),
    (["run", "--only", "02", "--methods", "finetune"], "--methods is read by notebook 03 only"),
    # not a count of anything: --jobs 0 wrote the log of a `run` it refused, --threads -1
    # crashed in torch and --threads 0 was ignored
    (["run", "--executor", "processes", "--jobs", "0"], "--jobs 0: give a whole number >= 1"),
    (["grid", "--threads", "-1"], "--threads -1: give a whole number >= 1"),
    (["grid", "--executor", "processes", "--threads", "0"], "--threads 0: give a whole"),
    # what the notebooks would refuse only after the executor trained their runs
    (["run", "--executor", "processes", "--seeds", "1", "1"], "seeds=[1, 1] has duplicates"),
    (["run", "--executor", "processes", "--only", "02", "--chain-methods", "ta_chain",
      "ta_chain"], "methods=['ta_chain', 'ta_chain'] has duplicates"),
])
def test_an_option_nothing_would_read_is_refused_before_anything_runs(
        argv, refused, tmp_path, capsys, monkeypatch):
    """`grid --jobs 4` without `--executor processes` trained one run at a time, and `run
    --only 04 --bits 4` showed no 4-bit students, silently."""
    import kdlib.cli as cli

    why = "planned or trained despite an ignored option"
    forbid(monkeypatch, cli, ("plan_grid", "execute", "execute_processes", "execute_ray",
                              "import_ray"), why)
    forbid(monkeypatch, cli.notebook_runs, ("execute",), why)
    assert main([*argv, "--preset", "smoke", "--results-dir", str(tmp_path / "r")]) == 2
    assert_refused(capsys, refused, tmp_path / "r")


@pytest.mark.parametrize("argv, expected", [
    (["grid"], {"jobs": 2, "address": None, "cpus_per_run": 1, "gpus_per_run": 0.0,
                "max_retries": 3}),
    (["grid", "--executor", "processes", "--jobs", "4", "--threads", "2", "--budget-min", "5",
      "--no-span", "--bench-dir", "b"], {"jobs": 4, "threads": 2, "no_span": True}),
    (["run", "--executor", "ray", "--address", "auto", "--cpus-per-run", "4",
      "--gpus-per-run", "0.5", "--max-retries", "1"],
     {"jobs": 2, "address": "auto", "cpus_per_run": 4, "gpus_per_run": 0.5, "max_retries": 1}),
    (["grid", "--executor", "ray", "--max-retries", "0", "--gpus-per-run", "0"],
     {"max_retries": 0, "gpus_per_run": 0.0}),  # asked for no retries: not the default 3
])
def test_options_the_executor_reads_pass_and_the_rest_take_their_defaults(argv, expected):
    from kdlib.cli import executor_options

    args = build_parser().parse_args(argv)
    executor_options(args)
    assert {name: getattr(args, name) for name in expected} == expected


def _planned(argv, tmp_path, monkeypatch):
    """What `run` hands the processes executor (the notebooks themselves are not executed)."""
    import kdlib.cli as cli

    handed = []
    monkeypatch.setattr(cli, "execute_processes", lambda plan, **kw: handed.extend(plan))
    monkeypatch.setattr(cli.notebook_runs, "execute", lambda *a, **kw: None)
    assert main(["run", "--preset", "smoke", "--model", "resnet8", "--executor", "processes",
                 "--results-dir", str(tmp_path / "r"), *argv]) == 0
    return [(c.method, c.w_bits, c.a_bits, c.seed) for c in handed]


def test_run_hands_the_executor_what_the_selected_notebooks_train_and_nothing_else(
        tmp_path, monkeypatch, capsys):
    """`run --only 01 --executor processes` trained the whole grid before notebook 01, and
    `--bits 3` trained the students at the chain's widths too, which no notebook asked for."""
    from kdlib.experiments import plan_grid

    assert _planned(["--only", "01", "--seeds", "0", "1"], tmp_path, monkeypatch) \
        == [("teacher", 32, 32, 0), ("teacher", 32, 32, 1)]
    assert _planned(["--only", "02", "--chain", "32", "8", "--chain-methods", "progressive"],
                    tmp_path, monkeypatch) == [("teacher", 32, 32, 0), ("progressive", 8, 8, 0)]
    assert _planned(["--only", "03", "--bits", "3", "--methods", "finetune"], tmp_path,
                    monkeypatch) == [("teacher", 32, 32, 0), ("finetune", 3, 3, 0)]
    # all four notebooks: the grid, each run once, dependencies first
    grid = plan_grid(preset="smoke", model="resnet8", seeds=[0, 1])
    assert _planned(["--seeds", "0", "1"], tmp_path, monkeypatch) \
        == [(c.method, c.w_bits, c.a_bits, c.seed) for c in grid]
    assert f"notebooks 01 02 03 04: {len(grid)} runs" in capsys.readouterr().out
    assert _planned(["--only", "04"], tmp_path, monkeypatch) == []  # 04 only reads records
    assert _planned(["--only", "0", "--seeds", "0"], tmp_path, monkeypatch) \
        == _planned(["--seeds", "0"], tmp_path, monkeypatch)  # a prefix of every notebook


OPTIONS_REACH = [
    (["train", "--data-dir", "D", "--device", "cpu"], "execute",
     {"data_dir": "D", "device": "cpu"}, None),
    (["grid", "--data-dir", "D", "--device", "cpu", "--no-progress", "--threads", "3"],
     "execute", {"data_dir": "D", "device": "cpu", "progress": False, "threads": 3}, None),
    (["grid", "--data-dir", "D", "--device", "cpu", "--budget-min", "5", "--no-span",
      "--bench-dir", "B"], "execute", {"data_dir": "D", "device": "cpu", "progress": True},
     {"seconds": 300.0, "span": False, "jobs": 1, "records": 1}),
    (["grid", "--executor", "processes", "--jobs", "3", "--threads", "2", "--data-dir", "D",
      "--device", "cpu"], "execute_processes",
     {"jobs": 3, "threads": 2, "data_dir": "D", "device": "cpu", "tensorboard": False}, None),
    (["grid", "--executor", "processes", "--jobs", "3", "--budget-min", "0.5", "--device",
      "cpu"], "execute_processes", {"jobs": 3, "threads": 1},
     {"seconds": 30.0, "span": True, "jobs": 3, "records": 1}),
    (["run", "--executor", "processes", "--jobs", "3", "--data-dir", "D", "--device", "cpu"],
     "execute_processes", {"jobs": 3, "data_dir": "D", "device": "cpu", "tensorboard": False},
     None),
    *[([command, "--executor", "ray", "--address", "auto", "--cpus-per-run", "2",
        "--gpus-per-run", "0.5", "--max-retries", "1", "--data-dir", "D", "--device", "cuda"],
       "execute_ray", {"address": "auto", "cpus_per_run": 2, "gpus_per_run": 0.5,
                       "max_retries": 1, "data_dir": "D", "device": "cuda",
                       "tensorboard": False}, None) for command in ("grid", "run")],
]


@pytest.mark.parametrize("argv, executor, expected, budget", OPTIONS_REACH)
def test_what_the_command_line_asks_for_reaches_the_executor(argv, executor, expected, budget,
                                                             tmp_path, monkeypatch):
    """Every option an executor reads is handed to it (none silently dropped for its default),
    --no-tensorboard reaches the serial loop as the environment its runs read, --threads sets
    the serial loop's torch threads, and --budget-min is a budget of that many minutes, with
    --no-span, the folder's records and the runs side by side it estimates for."""
    import kdlib.cli as cli
    from kdlib.tblog import TENSORBOARD_ENV

    handed, expected = [], dict(expected)

    def executor_of(name):
        def called(plan, **kwargs):
            handed.append((name, kwargs, os.environ[TENSORBOARD_ENV], torch.get_num_threads()))
            return [{"run_id": cfg.run_id(), "metrics": {}} for cfg in plan]
        return called

    for name in ("execute", "execute_processes", "execute_ray"):
        monkeypatch.setattr(cli, name, executor_of(name))
    monkeypatch.setattr(cli, "import_ray", lambda: None)  # whether or not Ray is installed
    monkeypatch.setattr(cli.notebook_runs, "execute", lambda *a, **kw: None)
    monkeypatch.setenv(TENSORBOARD_ENV, "1")  # restored after the test: main sets it
    monkeypatch.setenv("KDLIB_DATA", os.environ.get("KDLIB_DATA", "data"))  # and run these
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    results = tmp_path / "r"
    save_record(results, _record("teacher", 32, 0, 60.0))
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--preset", "smoke", "--model", "resnet8", "--no-tensorboard",
                     "--results-dir", str(results)]) == 0
    finally:
        torch.set_num_threads(threads)
    (name, kwargs, tensorboard, torch_threads), = handed
    assert name == executor and tensorboard == "0"
    if "threads" in expected and executor == "execute":
        assert torch_threads == expected.pop("threads")
    assert {key: kwargs[key] for key in expected} == expected
    assert Path(kwargs["results_dir"]).resolve() == results.resolve()
    given = kwargs.get("budget")
    assert budget == (given and {"seconds": given.seconds, "span": given.span,
                                 "jobs": given.timer.jobs, "records": len(given.timer.records)})


def test_a_failed_run_exits_1_and_a_failed_notebook_stops_the_ones_after_it(tmp_path,
                                                                           monkeypatch, capsys):
    """A script driving the workbook must see a failure: a run of the grid that failed (exit
    1, named on one line, not a usage error), or a notebook, after which no later notebook
    runs on top of the results it did not make."""
    import kdlib.cli as cli
    from kdlib.executors import GridRunError

    def grid_fails(plan, **kwargs):
        raise GridRunError("1 runs failed: r: RuntimeError: loss is nan")

    monkeypatch.setattr(cli, "execute_processes", grid_fails)
    assert main(["grid", "--preset", "smoke", "--executor", "processes",
                 "--results-dir", str(tmp_path / "g")]) == 1
    assert capsys.readouterr().err == "error: 1 runs failed: r: RuntimeError: loss is nan\n"
    executed = []

    def notebook(name, parameters, folder, progress_bar):
        executed.append(name)
        if name == "02_ta_chain":
            raise cli.notebook_runs.NotebookFailed("ValueError: nan", folder / f"{name}.ipynb")

    monkeypatch.setattr(cli.notebook_runs, "execute", notebook)
    monkeypatch.setenv("KDLIB_DATA", os.environ.get("KDLIB_DATA", "data"))  # run sets these
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    assert main(["run", "--preset", "smoke", "--results-dir", str(tmp_path / "n")]) == 1
    assert executed == ["01_baseline", "02_ta_chain"]
    assert "error: notebook 02_ta_chain failed: ValueError: nan" in capsys.readouterr().err


@pytest.mark.parametrize("argv, refused", [
    (["--cpus-per-run", "0"], "cpus_per_run=0 is invalid"),
    (["--device", "cuda"], "device='cuda' with gpus_per_run=0"),
    (["--budget-min", "5"], "--budget-min works with --executor serial or processes, not ray"),
])
def test_what_ray_cannot_honour_is_refused_before_any_run_starts(argv, refused, tmp_path,
                                                                 monkeypatch, capsys):
    """Exit 2 and one line, before Ray is handed anything: a budget would be silently
    ignored there, and a bad resource request is the user's mistake, not a failed run. A
    budget is refused before Ray is imported or the grid planned (installing Ray would not
    help)."""
    import kdlib.cli as cli

    why = "trained despite a refused request"
    if "--budget-min" in argv:
        forbid(monkeypatch, cli, ("import_ray", "_grid_plan"), why)
    else:
        monkeypatch.setattr(cli, "import_ray", lambda: None)  # whether or not Ray is installed
    forbid(monkeypatch, cli, ("execute_ray",), why)
    assert main(["grid", "--preset", "smoke", "--executor", "ray", *argv,
                 "--results-dir", str(tmp_path / "r")]) == 2
    assert_refused(capsys, refused, tmp_path / "r")


@pytest.mark.parametrize("executor", ["processes", "ray"])
def test_run_of_notebook_04_alone_starts_no_executor(executor, tmp_path, monkeypatch):
    """04 only reads records: no worker pool or Ray instance is started for it."""
    import kdlib.cli as cli

    monkeypatch.setattr(cli, "import_ray", lambda: None)
    forbid(monkeypatch, cli, ("execute_processes", "execute_ray"),
           "an executor started with nothing to train")
    monkeypatch.setattr(cli.notebook_runs, "execute", lambda *a, **kw: None)
    monkeypatch.setenv("KDLIB_DATA", os.environ.get("KDLIB_DATA", "data"))  # run sets these
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    assert main(["run", "--preset", "smoke", "--only", "04", "--executor", executor,
                 "--results-dir", str(tmp_path / "r")]) == 0
