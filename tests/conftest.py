"""Shared fixtures: the real CIFAR-100 (opt-in via $KDLIB_DATA) and a generated stand-in."""
from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """Folder containing the real ``cifar-100-python/``, from $KDLIB_DATA; never downloads."""
    root = os.environ.get("KDLIB_DATA")
    if not root or not (Path(root) / "cifar-100-python").is_dir():
        pytest.skip(
            "real CIFAR-100 not found: set KDLIB_DATA=/path/containing/cifar-100-python to enable"
        )
    return Path(root)


@pytest.fixture(scope="session")
def fake_data_root(tmp_path_factory) -> Path:
    """A small generated CIFAR-100 in the real format: 5 train / 2 test images per class."""
    return write_fake_cifar100(tmp_path_factory.mktemp("fake_cifar100"))
