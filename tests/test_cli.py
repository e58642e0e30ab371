"""`python -m kdlib`: exit codes and one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlib.cli import parse_overrides, UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "train_size=200", "--set", "val_size=100", "--set", "test_size=100",
        "--set", "batch_size=50"]


def smoke_by_default(args):
    """The CLI defaults to the quick preset; these tests train the smoke one unless told."""
    if args and args[0] in ("train", "run") and "--preset" not in args:
        return (args[0], "--preset", "smoke", *args[1:])
    return args


def kdlib(*args, env=None):
    args = smoke_by_default(args)
    return subprocess.run([sys.executable, "-m", "kdlib", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})})


def test_parse_overrides_literals():
    assert parse_overrides(["epochs=3", "lr=0.05", "nesterov=False", "schedule=cosine",
                            "milestones=[0.5]"]) == {
        "epochs": 3, "lr": 0.05, "nesterov": False, "schedule": "cosine", "milestones": [0.5]}
    with pytest.raises(UserError, match="not KEY=VALUE"):
        parse_overrides(["epochs"])
    with pytest.raises(UserError, match="not KEY=VALUE"):
        parse_overrides(["=3"])


@pytest.mark.parametrize("args, message", [
    (["train", "--w-bits", "0"], "w_bits=0 is not supported"),
    (["train", "--w-bits", "33"], "w_bits=33 is not supported"),
    (["train", "--method", "magic"], "method='magic' is unknown"),
    (["train", "--model", "vgg"], "model='vgg' is unknown"),
    (["train", "--set", "kd_temperature=0"], "kd_temperature=0 is invalid"),
    (["train", "--set", "quantizer=xnor"], "quantizer='xnor' is unknown"),
    (["train", "--preset", "fast"], "preset='fast' is unknown"),
    (["run", "--preset", "fast"], "preset='fast' is unknown"),
    (["train", "--set", "epochs"], "not KEY=VALUE"),
    (["run", "--only", "01", "05"], "--only 05 names no notebook; accepted: 01_baseline, "),
    (["train", "--method", "finetune", "--w-bits", "4"],
     "--method finetune starts from a trained model: pass --init-id RUN_ID (run ids are"),
    (["train", "--method", "direct_kd", "--init-id", "r"], "pass --teacher-id RUN_ID ("),
    (["train", "--method", "ta_chain"], "pass --init-id RUN_ID and --teacher-id RUN_ID ("),
])
@pytest.mark.slow
def test_bad_arguments_one_line_error(tmp_path, args, message):
    proc = kdlib(*args, "--results-dir", str(tmp_path / "res"),
                 "--data-dir", str(tmp_path / "nodata"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_missing_data_folder(tmp_path):
    proc = kdlib("train", "--results-dir", str(tmp_path / "res"),
                 "--data-dir", str(tmp_path / "nodata"), env={"KDLIB_OFFLINE": "1"})
    assert proc.returncode == 2 and str(tmp_path / "nodata") in proc.stderr
    assert not (tmp_path / "res" / "runs").exists()


@pytest.mark.slow
def test_the_command_line_imports_what_only_some_commands_need_on_first_use():
    """torchvision (whose import loads torch._dynamo) and scipy cost every `python -m kdlib`
    call, the lease's device steps included, about 1.7 s on this Xeon before they were
    imported where used (a record's environment, a t quantile). A record still names the
    torchvision it ran with."""
    heavy = ("torchvision", "scipy", "torch._dynamo", "matplotlib", "papermill")
    code = ("import sys, kdlib.cli; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    from kdlib.results import environment_info

    import torchvision
    assert environment_info()["versions"]["torchvision"] == torchvision.__version__


@pytest.mark.realdata
@pytest.mark.slow
def test_train_one_job_from_the_shell(real_data_root, tmp_path):
    proc = kdlib("train", "--model", "resnet8", "--w-bits", "4", "--data-dir", str(real_data_root),
                 "--results-dir", str(tmp_path), *TINY)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["run_id"].startswith("resnet8-individual-w4a4-s0-")
    assert (tmp_path / "runs" / f"{out['run_id']}.json").exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_run_stops_on_failing_notebook(real_data_root, tmp_path):
    proc = kdlib("run", "--model", "resnet8", "--only", "04", "--data-dir", str(real_data_root),
                 "--results-dir", str(tmp_path))  # 04 with no records to show
    assert proc.returncode == 1
    assert "notebook 04_results failed: FileNotFoundError" in proc.stderr
    assert (tmp_path / "executed" / "04_results.ipynb").exists()
    assert not (tmp_path / "runs").exists()
    logs = list((tmp_path / "logs").glob("run-*.log"))
    assert len(logs) == 1 and "Executing notebook" in logs[0].read_text()


@pytest.mark.realdata
@pytest.mark.slow
def test_the_notebooks_import_the_kdlib_of_the_checkout_that_runs_them(real_data_root, tmp_path):
    """Another kdlib on the path (as when the environment's editable install is another clone's)
    must not be what the kernels import."""
    other = tmp_path / "other_checkout" / "kdlib"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('the kdlib of another checkout')\n")
    proc = kdlib("run", "--model", "resnet8", "--only", "04", "--data-dir", str(real_data_root),
                 "--results-dir", str(tmp_path / "results"), env={"PYTHONPATH": str(other.parent)})
    assert "another checkout" not in proc.stderr
    # this kdlib ran: no records
    assert "notebook 04_results failed: FileNotFoundError" in proc.stderr


@pytest.mark.slow
def test_run_refuses_a_bad_chain_before_any_notebook(tmp_path):
    proc = kdlib("run", "--model", "resnet8", "--chain", "32", "8", "16", "--only", "02",
                 "--results-dir", str(tmp_path), *TINY)
    assert proc.returncode == 2 and "not descending" in proc.stderr
    assert not (tmp_path / "executed").exists() and not (tmp_path / "runs").exists()


def test_train_help_names_every_method_a_config_accepts(capsys):
    from kdlib.cli import build_parser
    from kdlib.config import METHODS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert all(f" {method} " in f" {shown} " for method in METHODS)


def _every_parser(parser):
    """``parser`` and its subcommands' parsers, all the way down (``lease prepare`` too)."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _every_parser(sub)


def test_no_help_text_shows_the_docstrings_rst_markup():
    """Docstrings are reStructuredText; --help is read in a terminal, where ``x`` and
    :func:`x` are noise."""
    from kdlib.cli import build_parser

    helps = {p.prog: p.format_help() for p in _every_parser(build_parser())}
    assert len(helps) > 10  # the lease subcommands are reached
    for markup in ("``", ":func:", ":mod:", ":class:", ":data:"):
        assert not [prog for prog, text in helps.items() if markup in text], markup


def test_run_gives_its_notebooks_the_data_root_of_the_command(tmp_path, monkeypatch):
    from kdlib import cli, notebook_runs

    seen = []
    monkeypatch.setattr(notebook_runs, "execute",
                        lambda name, *args, **kwargs: seen.append(os.environ.get("KDLIB_DATA")))
    monkeypatch.delenv("KDLIB_DATA", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # run puts this checkout first on it
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--preset", "smoke", "--only", "04",
                     "--results-dir", str(tmp_path / "results")]) == 0
    assert seen == [str(tmp_path / "data")]


@pytest.mark.parametrize("options, bar", [([], True), (["--no-progress"], False),
                                          (["--log-output"], False)])
def test_run_takes_no_progress_as_grid_and_train_do(options, bar, tmp_path, monkeypatch):
    from kdlib import cli, notebook_runs

    seen = []
    monkeypatch.setattr(notebook_runs, "execute",
                        lambda name, *args, progress_bar: seen.append(progress_bar))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    assert cli.main(["run", "--preset", "smoke", "--only", "04", *options,
                     "--results-dir", str(tmp_path / "results")]) == 0
    assert seen == [bar]


def test_every_option_says_what_it_does_and_the_lease_help_names_every_step():
    """`--help` is where a newcomer finds an option's default; a step missing from the lease
    command's one-line help is a step nobody finds."""
    import argparse

    from kdlib.cli import build_parser

    parsers = list(_every_parser(build_parser()))
    silent = [f"{p.prog} {a.option_strings[0]}" for p in parsers for a in p._actions
              if a.option_strings and not a.help]
    assert silent == []
    top = build_parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    lease_help = next(c.help for c in commands._choices_actions if c.dest == "lease")
    lease = commands.choices["lease"]
    steps = next(a for a in lease._actions if isinstance(a, argparse._SubParsersAction))
    assert all(f" {step} " in f" {lease_help} " for step in steps.choices), lease_help


@pytest.mark.parametrize("flag, progress", [([], True), (["--no-progress"], False)])
def test_train_draws_progress_bars_unless_told_not_to(flag, progress, tmp_path, monkeypatch):
    """A train whose output goes to a log wants no carriage-return bars in it, as grid's."""
    from kdlib import cli

    seen = []

    def execute(plan, **kwargs):
        seen.append(kwargs["progress"])
        return [{"run_id": plan[0].run_id(), "metrics": {}}]

    monkeypatch.setattr(cli, "execute", execute)
    assert cli.main(["train", "--preset", "smoke", "--results-dir", str(tmp_path), *flag]) == 0
    assert seen == [progress]
