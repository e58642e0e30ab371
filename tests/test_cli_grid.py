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
@pytest.mark.slow
def test_grid_trains_without_notebooks_then_announces_everything_skipped(real_data_root, tmp_path):
    args = ["--data-dir", str(real_data_root), "--results-dir", str(tmp_path), *GRID]
    first = kdlib("grid", *args, "--threads", "1", "--no-progress")
    assert first.returncode == 0, first.stderr
    # teacher, ta_chain 4-bit, finetune 4-bit, direct_kd 4-bit (= ta_chain's first link)
    assert "grid: 4 runs" in first.stdout and "0 already have records" in first.stdout
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert sorted(r["config"]["method"] for r in records) \
        == ["direct_kd", "finetune", "ta_chain", "teacher"]
    assert sum(bool(r.get("same_run_as")) for r in records) == 1
    assert len(list((tmp_path / "models").glob("*.packed"))) == 3  # one per trained run
    again = kdlib("grid", *args)
    assert again.returncode == 0, again.stderr
    assert "4 already have records" in again.stdout and "0 to train" in again.stdout
    assert "delete" in again.stdout  # and how to start over


def test_announce_plan_counts_records_it_finds(tmp_path, capsys):
    args = cli.build_parser().parse_args(["grid", *GRID, "--results-dir", str(tmp_path)])
    cli._announce_plan("grid", cli._grid_plan(args), args, tmp_path)
    out = capsys.readouterr().out
    assert out.startswith("grid: 4 runs (preset smoke, seeds [0]); 0 already have records")
    assert "to retrain" not in out  # nothing to start over from yet
