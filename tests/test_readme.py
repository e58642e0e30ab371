"""The README's numbers come from the committed result files."""
import subprocess
import sys
from pathlib import Path

import pytest

from kdlib.report import render_results, replace_block

ROOT = Path(__file__).resolve().parent.parent


def test_readme_blocks_match_result_files():
    proc = subprocess.run([sys.executable, "-m", "kdlib", "readme", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_replace_block_rewrites_only_between_markers():
    text = "a\n<!-- results:start -->\nold\n<!-- results:end -->\nz\n"
    assert replace_block(text, "results", "new") == "a\n<!-- results:start -->\nnew\n<!-- results:end -->\nz\n"
    with pytest.raises(ValueError, match="no <!-- bench:start -->"):
        replace_block(text, "bench", "x")


def test_render_results_without_records(tmp_path):
    assert "No run records" in render_results(tmp_path)
