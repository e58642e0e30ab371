"""A small generated CIFAR-100 in the exact on-disk format, for tests and offline smoke runs.

The official files were written by Python 2's cPickle (protocol 2): every string, including the
dict keys and the arrays' raw bytes, is a Python 2 ``str`` (pickle opcode BINSTRING), and arrays
are rebuilt through numpy's ``_reconstruct``. Python 3 writes ``bytes`` at protocol 2 through a
call to ``_codecs.encode`` instead, which a strict reader rightly refuses. So this writer emits
bytes as BINSTRING like Python 2 did; the files then load exactly like the originals (keys come
back as str under ``encoding="latin1"``) and exercise the same reading path.

The images are random noise: fine for testing formats, shapes, splits and plumbing, meaningless
for accuracy.
"""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np

FOLDER_NAME = "cifar-100-python"
NUM_FINE = 100
NUM_COARSE = 20


class _Python2StylePickler(pickle._Pickler):  # the pure-Python pickler lets us change one opcode
    """Protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_bytes_as_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes_as_py2_str


def write_pickle(obj: object, path: str | os.PathLike) -> None:
    """Pickle `obj` to `path` the way the official files were written (protocol 2, Python 2
    strings). Tests use it to write deliberately broken variants in the genuine format."""
    with open(path, "wb") as f:
        _Python2StylePickler(f, protocol=2).dump(obj)


def fine_to_coarse(fine: np.ndarray) -> np.ndarray:
    """A fixed fine->coarse map with 5 fine classes per coarse class (like CIFAR-100's, not it)."""
    return fine // (NUM_FINE // NUM_COARSE)


def _split_dict(rng: np.random.Generator, per_class: int, train: bool) -> dict[bytes, object]:
    """One file's dict: `per_class` random images of each fine class, in shuffled order."""
    fine = rng.permutation(np.repeat(np.arange(NUM_FINE), per_class))
    n = len(fine)
    kind = "train" if train else "test"
    return {
        b"filenames": [f"fake_{kind}_{i:05d}.png".encode() for i in range(n)],
        b"batch_label": b"training batch 1 of 1" if train else b"testing batch 1 of 1",
        # Python ints in lists, as in the originals (not numpy arrays).
        b"fine_labels": [int(v) for v in fine],
        b"coarse_labels": [int(v) for v in fine_to_coarse(fine)],
        b"data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
    }


def _meta_dict() -> dict[bytes, object]:
    return {
        b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(NUM_FINE)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(NUM_COARSE)],
    }


def write_fake_cifar100(
    root: str | os.PathLike,
    n_train_per_class: int = 5,
    n_test_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}`` with generated data; return `root`.

    Same seed -> byte-identical files. `root` is created if needed.
    """
    for name, value in (("n_train_per_class", n_train_per_class),
                        ("n_test_per_class", n_test_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    root = Path(root)
    folder = root / FOLDER_NAME
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_pickle(_split_dict(rng, n_train_per_class, train=True), folder / "train")
    write_pickle(_split_dict(rng, n_test_per_class, train=False), folder / "test")
    write_pickle(_meta_dict(), folder / "meta")
    return root
