"""`python -m kdlib grid` and what `run` tells a newcomer before it trains anything."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlib import cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "train_size=200", "--set", "val_size=100", "--set", "test_size=100",
        "--set", "batch_size=50"]
GRID = ["--preset", "smoke", "--model", "resnet8", "--seeds", "0", "--chain", "32", "4",
        "--chain-methods", "ta_chain", "--methods", "finetune", "direct_kd", *TINY]


def kdlib(*args):
    return subprocess.run([sys.executable, "-m", "kdlib", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "KDLIB_OFFLINE": "1"})


@pytest.mark.realdata
def test_grid_trains_without_notebooks_then_announces_everything_skipped(real_data_root, tmp_path):
    args = ["--data-dir", str(real_data_root), "--results-dir", str(tmp_path), *GRID]
    first = kdlib("grid", *args, "--threads", "1", "--no-progress")
    assert first.returncode == 0, first.stderr
    # teacher, ta_chain 4-bit, finetune 4-bit, direct_kd 4-bit (= ta_chain's first link)
    assert "grid: 4 runs" in first.stdout and "0 already have records" in first.stdout
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert sorted(r["config"]["method"] for r in records) == ["direct_kd", "finetune", "ta_chain", "teacher"]
    assert sum(bool(r.get("same_run_as")) for r in records) == 1
    assert len(list((tmp_path / "models").glob("*.packed"))) == 3  # one per trained run
    again = kdlib("grid", *args)
    assert again.returncode == 0, again.stderr
    assert "4 already have records" in again.stdout and "0 to train" in again.stdout
    assert "delete" in again.stdout  # and how to start over


def test_announce_plan_counts_records_it_finds(tmp_path, capsys):
    args = cli.build_parser().parse_args(["grid", *GRID, "--results-dir", str(tmp_path)])
    cli._announce_plan(args, tmp_path)
    out = capsys.readouterr().out
    assert out.startswith("grid: 4 runs (preset smoke, seeds [0]); 0 already have records")
    assert "to retrain" not in out  # nothing to start over from yet


def test_executed_notebook_is_replaced_only_when_its_outputs_change(tmp_path):
    def notebook(path, text, when):
        cell = {"cell_type": "code", "source": "print(1)", "metadata": {"papermill": {"start_time": when}},
                "outputs": [{"output_type": "stream", "name": "stdout", "text": text}]}
        path.write_text(json.dumps({"cells": [cell], "metadata": {"papermill": {"end_time": when}}}))

    a, b, c = tmp_path / "a.ipynb", tmp_path / "b.ipynb", tmp_path / "c.ipynb"
    notebook(a, "1\n", "10:00")
    notebook(b, "1\n", "11:00")  # run again: other times, same outputs
    notebook(c, "2\n", "11:00")
    assert cli._outputs(a) == cli._outputs(b)
    assert cli._outputs(a) != cli._outputs(c)
    assert cli._outputs(tmp_path / "missing.ipynb") is None


def test_an_executed_notebook_names_its_paths_from_the_checkout_and_its_injected_cell_by_a_fixed_id(tmp_path):
    import nbformat

    notebook = nbformat.v4.new_notebook()
    injected = nbformat.v4.new_code_cell("preset = 'quick'", metadata={"tags": ["injected-parameters"]})
    notebook.cells = [nbformat.v4.new_code_cell("x = 1"), injected]
    notebook.metadata["papermill"] = {"input_path": str(cli.REPO_ROOT / "notebooks" / "01_baseline.ipynb"),
                                      "output_path": str(tmp_path / ".01_baseline.running.ipynb")}
    running = tmp_path / ".01_baseline.running.ipynb"
    nbformat.write(notebook, running)
    first_id = notebook.cells[0].id
    for target, shown in ((cli.REPO_ROOT / "results" / "quick" / "executed" / "01_baseline.ipynb",
                           "results/quick/executed/01_baseline.ipynb"),
                          (tmp_path / "01_baseline.ipynb", str(tmp_path / "01_baseline.ipynb"))):
        cli._name_paths_from_the_checkout(running, target)  # writes the running copy only
        written = nbformat.read(running, as_version=4)
        assert written.metadata["papermill"]["input_path"] == "notebooks/01_baseline.ipynb"
        assert written.metadata["papermill"]["output_path"] == shown
        assert [c.id for c in written.cells] == [first_id, "injected-parameters"]
        nbformat.validate(written)
