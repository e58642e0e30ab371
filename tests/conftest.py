"""Shared fixtures: the real CIFAR-100 (opt-in via $KDLIB_DATA) and a generated stand-in."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kdlib.fake_data import write_fake_cifar100

# Tests never download: a missing data folder must fail fast with the "how to supply" message.
# Set in the environment so that subprocesses and papermill kernels inherit it.
os.environ["KDLIB_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test tensors are tiny: one intra-op thread is faster, and far faster on a shared, busy
    CPU, where every OpenMP parallel region waits for its descheduled threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NO_REAL_DATA = "real CIFAR-100 not found"
HOW_TO_ENABLE = "set KDLIB_DATA=/path/containing/cifar-100-python to enable"


REPO_ROOT = Path(__file__).resolve().parent.parent


def committed_records() -> list[Path]:
    """The run records git tracks (results/<preset>/runs/*.json): not the ignored ones a local
    `train --preset smoke` or a failed run leaves, which tests of the committed results must
    not read."""
    listed = subprocess.run(["git", "ls-files", "results/*/runs/*.json"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO_ROOT / name for name in sorted(listed)]


def on_ci() -> bool:
    """CI services set CI=true (some CI=1); there every real-data test must run."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """Folder containing the real ``cifar-100-python/``, from $KDLIB_DATA; never downloads.

    Missing: a skip locally, an error on CI, where a skip would hide that the end-to-end,
    resume, kill and concurrency tests never ran.
    """
    root = os.environ.get("KDLIB_DATA")
    if not root or not (Path(root) / "cifar-100-python").is_dir():
        where = f"KDLIB_DATA={root!r}" if root else "KDLIB_DATA is unset"
        if on_ci():
            pytest.fail(f"{NO_REAL_DATA} on CI ({where}): real-data tests must run there; "
                        f"{HOW_TO_ENABLE}", pytrace=False)
        pytest.skip(f"{NO_REAL_DATA} ({where}): {HOW_TO_ENABLE}")
    return Path(root)


def pytest_terminal_summary(terminalreporter) -> None:
    """One line saying how many tests the missing real data skipped, and how to run them."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and NO_REAL_DATA in str(r.longrepr[2])]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test(s) skipped for lack of the real CIFAR-100: {HOW_TO_ENABLE} "
            "(on CI, CI=true, they error instead)", yellow=True)


@pytest.fixture(scope="session")
def fake_data_root(tmp_path_factory) -> Path:
    """A small generated CIFAR-100 in the real format: 5 train / 2 test images per class."""
    return write_fake_cifar100(tmp_path_factory.mktemp("fake_cifar100"))
