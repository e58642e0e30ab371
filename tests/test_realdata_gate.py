"""The real-data gate of tests/conftest.py: locally a skip plus a hint, on CI an error."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_REALDATA_TEST = '''
import pytest


@pytest.fixture(autouse=True)
def one_thread():
    """Overrides the suite's fixture of that name: this test needs no torch (a 3 s import)."""
    yield


@pytest.mark.realdata
def test_needs_real_data(real_data_root):
    assert (real_data_root / "cifar-100-python").is_dir()
'''


def run_tiny_realdata_suite(folder: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """pytest in a subprocess on one real-data test, under the suite's own conftest.py."""
    shutil.copy(ROOT / "tests" / "conftest.py", folder / "conftest.py")
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n"
                                       "    realdata: needs the real CIFAR-100\n")
    (folder / "test_tiny_realdata.py").write_text(TINY_REALDATA_TEST)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "KDLIB_DATA")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # nbval & co. are slow to import and not needed
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "test_tiny_realdata.py"],
                          cwd=folder, env={**env, **env_vars}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def suite_dir(tmp_path):
    folder = tmp_path / "suite"
    folder.mkdir()
    return folder


def test_missing_real_data_is_an_error_on_ci(suite_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_tiny_realdata_suite(suite_dir, CI="true", KDLIB_DATA=str(empty))
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "1 error" in proc.stdout and "skipped" not in proc.stdout
    assert f"real CIFAR-100 not found on CI (KDLIB_DATA='{empty}')" in proc.stdout


def test_missing_real_data_is_a_skip_with_a_summary_line_locally(suite_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_tiny_realdata_suite(suite_dir, KDLIB_DATA=str(empty))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 skipped" in proc.stdout
    assert ("1 test(s) skipped for lack of the real CIFAR-100: "
            "set KDLIB_DATA=/path/containing/cifar-100-python to enable") in proc.stdout


def test_present_real_data_runs_on_ci(suite_dir, tmp_path):
    (tmp_path / "data" / "cifar-100-python").mkdir(parents=True)
    proc = run_tiny_realdata_suite(suite_dir, CI="true", KDLIB_DATA=str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed" in proc.stdout and "skipped for lack" not in proc.stdout
