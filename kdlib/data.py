"""CIFAR-100: files on disk -> uint8 tensors -> train/val/test splits -> on-device batches.

The whole dataset is small (50,000 + 10,000 images of 3x32x32 bytes = 184 MB), so it is kept as
uint8 tensors, moved to the training device once, and augmented there with batched tensor ops.
There is no DataLoader and there are no worker processes (the airbench recipe): on a GPU, a
Python-side, per-image pipeline would cost more time than the ResNet-20 step it feeds.

Reading the files
    The files are Python 2 pickles (protocol 2) of dicts holding numpy arrays. A pickle can run
    arbitrary code while it loads, so they are read with a restricted unpickler that knows only
    the few numpy globals an array needs and refuses everything else before it runs. Existing
    files are not md5-checked, because valid copies differ in bytes (e.g. a copy whose
    `filenames` field is a placeholder); their *content* is validated instead (dtype, shapes,
    label range, counts), with errors that name the file and what is wrong.
"""
from __future__ import annotations

import functools
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR100_URL",
    "CIFAR100_MD5",
    "NUM_CLASSES",
    "DataSplits",
    "UnsafePickleError",
    "resolve_data_root",
    "load_cifar100",
    "stratified_indices",
    "split_train_val",
    "load_splits",
    "normalize",
    "augment",
    "train_batches",
    "eval_batches",
]

# Per-channel mean/std of the 50,000 CIFAR-100 training images (pixel values scaled to [0, 1]).
# CIFAR-10's values are different; using them is a common, silent mistake.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # of the archive, checked after a download only
FOLDER_NAME = "cifar-100-python"
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
ROW_LENGTH = 3 * 32 * 32  # one image per row: 1024 red, then 1024 green, then 1024 blue bytes
PAD = 4  # random-crop padding, in pixels
ENV_VAR = "KDLIB_DATA"
OFFLINE_ENV_VAR = "KDLIB_OFFLINE"  # set (not "0") to forbid downloads

_HOW_TO_SUPPLY = (
    f"To supply it: set {ENV_VAR}=/path/containing/{FOLDER_NAME}, or pass that path as the data "
    f"root (--data-dir on the command line, data_dir in Python), or download the official "
    f"archive {CIFAR100_URL} and extract it there."
)


# --------------------------------------------------------------------------------------------
# Where the data lives
# --------------------------------------------------------------------------------------------
def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder expected to contain ``cifar-100-python/``: `root` if given, else
    ``$KDLIB_DATA`` if set and non-empty, else ``./data`` (relative to the working directory).
    """
    if root is None or str(root) == "":
        root = os.environ.get(ENV_VAR) or "data"
    return Path(root).expanduser().absolute()


def _dataset_folder(root: Path) -> Path:
    """`root/cifar-100-python`; also accepts a root that *is* that folder (a common slip)."""
    if root.name == FOLDER_NAME and (root / "meta").is_file() and not (root / FOLDER_NAME).exists():
        return root
    return root / FOLDER_NAME


def _download(root: Path) -> None:
    """Download and extract the official archive into `root`, md5-checking the archive.

    Any failure (offline, HTTP error, bad checksum) becomes a FileNotFoundError that says how
    to supply the data by hand, because that is what the user has to do next.
    """
    # Imported here and looked up as a module attribute: keeps `import kdlib.data` fast and lets
    # tests replace the downloader without touching the network.
    from torchvision.datasets import utils as tv_utils

    # the outermost folder the download creates: removed again if it fails, so a mistyped
    # root is not left behind as an empty folder
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    try:
        tv_utils.download_and_extract_archive(
            CIFAR100_URL,
            download_root=str(root),
            filename="cifar-100-python.tar.gz",
            md5=CIFAR100_MD5,
            remove_finished=True,
        )
    except Exception as err:  # noqa: BLE001 -- any failure means "no data here"
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise FileNotFoundError(
            f"CIFAR-100 not found in {root / FOLDER_NAME} and downloading it failed "
            f"({type(err).__name__}: {err}). {_HOW_TO_SUPPLY}"
        ) from err


def _find_or_download(root: Path, download: bool) -> Path:
    folder = _dataset_folder(root)
    if folder.is_dir():
        return folder
    if not download:
        raise FileNotFoundError(
            f"CIFAR-100 not found: no folder {folder} (download=False). {_HOW_TO_SUPPLY}"
        )
    if os.environ.get(OFFLINE_ENV_VAR, "") not in ("", "0"):
        # Tests and sandboxes set this: never reach for the network, fail with the same advice.
        raise FileNotFoundError(
            f"CIFAR-100 not found: no folder {folder} (downloads disabled by "
            f"{OFFLINE_ENV_VAR}={os.environ[OFFLINE_ENV_VAR]}). {_HOW_TO_SUPPLY}"
        )
    _download(root)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-100 download finished but {folder} does not exist. {_HOW_TO_SUPPLY}"
        )
    return folder


# --------------------------------------------------------------------------------------------
# Reading one file safely
# --------------------------------------------------------------------------------------------
class UnsafePickleError(ValueError):
    """A data file's pickle asked for a global outside the allow-list (nothing was executed)."""


# The only globals a CIFAR-100 file needs: numpy's array reconstruction. Resolved from live
# objects (not by importing the named module), so both the name written by numpy 1.x
# ("numpy.core.multiarray", the official files) and numpy 2.x ("numpy._core.multiarray") work on
# any installed numpy without touching numpy's deprecated `numpy.core` shim.
_RECONSTRUCT = np.array(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED_GLOBALS`; anything else is refused before it runs."""

    def __init__(self, file, path: Path):
        # latin1: the files are Python 2 pickles; numpy documents latin1 as the encoding that
        # restores their arrays' raw bytes exactly.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"{self._path}: refused to load global '{module}.{name}' from the pickle "
                f"(a CIFAR-100 file needs only numpy array globals: {allowed}). The file is not a "
                f"genuine CIFAR-100 file; nothing in it was executed."
            ) from None


def _unpickle(path: Path) -> dict[str, object]:
    """Read one pickled dict with the restricted unpickler; keys come back as str."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-100 file missing: {path}. {_HOW_TO_SUPPLY}")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 -- a corrupt pickle can fail in many ways
        raise ValueError(
            f"{path}: not a readable CIFAR-100 pickle, the file is truncated or corrupt "
            f"({type(err).__name__}: {err}). Replace it with a fresh copy. {_HOW_TO_SUPPLY}"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # Python 2 str keys load as str under latin1; keys pickled as bytes (Python 3) stay bytes.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _require_key(d: dict, key: str, path: Path) -> object:
    if key not in d:
        raise ValueError(f"{path}: missing key {key!r}; keys present: {sorted(map(str, d))}")
    return d[key]


def _check_images(data: object, path: Path) -> np.ndarray:
    """`data` must be an N x 3072 uint8 array (one image per row, channel-major)."""
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{path}: 'data' must be a numpy array, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise ValueError(f"{path}: 'data' must have dtype uint8, got {data.dtype}")
    if data.ndim != 2 or data.shape[1] != ROW_LENGTH or data.shape[0] == 0:
        raise ValueError(
            f"{path}: 'data' must have shape (N, {ROW_LENGTH}) with N > 0 "
            f"(one 3x32x32 image per row), got {data.shape}"
        )
    return data


def _check_labels(labels: object, n_images: int, path: Path) -> np.ndarray:
    """`labels` must be N integers in 0..99, N = number of image rows."""
    try:
        arr = np.asarray(labels)
    except Exception as err:  # noqa: BLE001 -- e.g. a ragged list
        raise ValueError(f"{path}: 'fine_labels' is not a flat list of integers ({err})") from err
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: 'fine_labels' must be a flat list of integers, "
            f"got dtype {arr.dtype} with shape {arr.shape}"
        )
    if len(arr) != n_images:
        raise ValueError(
            f"{path}: {len(arr)} labels in 'fine_labels' but {n_images} images in 'data'; "
            "the counts must match"
        )
    bad = np.flatnonzero((arr < 0) | (arr >= NUM_CLASSES))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{path}: label {int(arr[i])} at index {i} is outside 0..{NUM_CLASSES - 1} "
            f"({len(bad)} bad labels in total)"
        )
    return np.array(arr, dtype=np.int64)  # a fresh, writable copy for torch.from_numpy


def _read_split_file(path: Path) -> tuple[Tensor, Tensor]:
    d = _unpickle(path)
    data = _check_images(_require_key(d, "data", path), path)
    labels = _check_labels(_require_key(d, "fine_labels", path), data.shape[0], path)
    if not (data.flags.writeable and data.flags.c_contiguous):
        data = np.ascontiguousarray(data).copy()  # torch.from_numpy wants writable memory
    images = torch.from_numpy(data).view(-1, *IMAGE_SHAPE)  # no copy
    return images, torch.from_numpy(labels)


def load_cifar100(
    root: str | os.PathLike | None = None, train: bool = True, download: bool = True
) -> tuple[Tensor, Tensor]:
    """Images (uint8 [N,3,32,32], CPU) and fine labels (int64 [N]) of the train or test file.

    `root` is the folder containing ``cifar-100-python/`` (see `resolve_data_root`). If that
    folder is missing and `download` is True, the official archive is downloaded and md5-checked;
    otherwise (or if the download fails) a FileNotFoundError says where it looked and how to
    supply the data. Corrupt or malformed files raise ValueError naming the file.
    """
    folder = _find_or_download(resolve_data_root(root), download)
    return _read_split_file(folder / ("train" if train else "test"))


# --------------------------------------------------------------------------------------------
# Splits (selection happens on the training images only)
# --------------------------------------------------------------------------------------------
def _check_labels_tensor(labels: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError("labels must be a 1-D integer tensor")


def stratified_indices(labels: Tensor, size: int, seed: int) -> Tensor:
    """Sorted int64 indices of a class-balanced random subset of `size` samples.

    Every class present in `labels` gets ``size // n_classes`` samples; the remainder (if any)
    goes one each to randomly chosen classes. Depends only on (`labels`, `size`, `seed`); the
    indices are on `labels.device`.
    """
    _check_labels_tensor(labels)
    n = len(labels)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= n:
        raise ValueError(f"size must be an integer in 0..{n} (number of labels), got {size!r}")
    if size == 0:
        return torch.zeros(0, dtype=torch.int64, device=labels.device)
    classes, class_of, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
    g = torch.Generator().manual_seed(seed)
    per_class = torch.full((len(classes),), size // len(classes), dtype=torch.int64)
    per_class[torch.randperm(len(classes), generator=g)[: size % len(classes)]] += 1
    short = torch.nonzero(per_class > counts).flatten()
    if len(short):
        c = int(short[0])
        raise ValueError(
            f"size {size} needs {int(per_class[c])} samples of class {int(classes[c])} but only "
            f"{int(counts[c])} exist; a class-balanced subset allows size <= "
            f"{len(classes) * int(counts.min())}"
        )
    # Vectorised (no loop over classes): shuffle, then stably group by class, so each class's
    # samples sit together in random order; keep the first per_class[c] of class c.
    shuffled = torch.randperm(n, generator=g)
    grouped = shuffled[torch.argsort(class_of[shuffled], stable=True)]
    first_of_class = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(n) - first_of_class[class_of[grouped]]
    chosen = grouped[rank_in_class < per_class[class_of[grouped]]]
    return torch.sort(chosen).values.to(labels.device)


def split_train_val(labels: Tensor, val_size: int = 5000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train_idx, val_idx): a seeded, class-stratified hold-out of `val_size` samples.

    Pass the *training* labels: the validation set is what model selection looks at, so it must
    never come from the test set. Both index tensors are sorted and disjoint; together they
    cover every sample.
    """
    _check_labels_tensor(labels)
    if (isinstance(val_size, bool) or not isinstance(val_size, int)
            or not 0 <= val_size < len(labels)):
        raise ValueError(f"val_size must be an integer in 0..{len(labels) - 1}, got {val_size!r}")
    val_idx = stratified_indices(labels, val_size, seed)
    in_val = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    in_val[val_idx] = True
    return torch.nonzero(~in_val).flatten(), val_idx


@dataclass
class DataSplits:
    """Train / validation / test images (uint8 [N,3,32,32]) and labels (int64 [N])."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def to(self, device: str | torch.device) -> "DataSplits":
        """The same splits with every tensor on `device` (done once, before training)."""
        return DataSplits(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __repr__(self) -> str:  # the default repr would print 184 MB of pixels
        sizes = ", ".join(
            f"{part}={len(getattr(self, part + '_labels'))}" for part in ("train", "val", "test")
        )
        return f"DataSplits({sizes}, device={self.train_images.device})"


def load_splits(
    root: str | os.PathLike | None = None,
    *,
    val_size: int = 5000,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> DataSplits:
    """Load CIFAR-100 and split it: validation held out of the 50k training images.

    `seed` fixes the validation split and the optional subsets; `train_size` / `test_size` take
    class-balanced subsets of the remaining training images / the test set (None = all; the
    test subset is for fast smoke runs, it is never used to select anything).
    """
    train_images, train_labels = load_cifar100(root, train=True, download=download)
    test_images, test_labels = load_cifar100(root, train=False, download=download)
    train_idx, val_idx = split_train_val(train_labels, val_size, seed)
    if train_size is not None:
        train_idx = train_idx[stratified_indices(train_labels[train_idx], train_size, seed)]
    if test_size is not None:
        keep = stratified_indices(test_labels, test_size, seed)
        test_images, test_labels = test_images[keep], test_labels[keep]
    return DataSplits(
        train_images=train_images[train_idx],
        train_labels=train_labels[train_idx],
        val_images=train_images[val_idx],
        val_labels=train_labels[val_idx],
        test_images=test_images,
        test_labels=test_labels,
    )


# --------------------------------------------------------------------------------------------
# On-device augmentation and batching
# --------------------------------------------------------------------------------------------
def _check_images_u8(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor)
               else type(images))
        raise ValueError(f"{name} must be a uint8 tensor [N,C,H,W], got {got}")


@functools.lru_cache(maxsize=None)
def _normalize_constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """(1/(255*std), mean/std) as [1,3,1,1] float32 on `device`, made once per device: creating
    them per batch would copy from the host each step, which on CUDA waits for the GPU."""
    mean = torch.tensor(CIFAR100_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (1.0 / (255.0 * std)).float().to(device), (mean / std).float().to(device)


def normalize(images_u8: Tensor) -> Tensor:
    """uint8 [N,3,H,W] -> float32 ``(x/255 - mean) / std`` with CIFAR-100's mean/std.

    Stays on the input's device and keeps its memory format.
    """
    _check_images_u8(images_u8, "images_u8")
    if images_u8.shape[1] != 3:
        raise ValueError(f"images_u8 must have 3 channels, got shape {tuple(images_u8.shape)}")
    scale, shift = _normalize_constants(images_u8.device)
    return images_u8.float().mul_(scale).sub_(shift)


def augment(images_u8: Tensor, generator: torch.Generator) -> Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image, then a horizontal flip with p=1/2.

    Batched on the images' device (`generator` must live there too): pad once, view every
    possible crop position with `unfold` (no copy), pick one position per image with a single
    advanced-indexing gather, and flip the chosen half with one `where`. Returns uint8, same shape.
    """
    _check_images_u8(images_u8, "images_u8")
    if generator.device.type != images_u8.device.type:
        raise ValueError(
            f"generator is on {generator.device} but images_u8 on {images_u8.device}; "
            "create the generator with torch.Generator(device=images_u8.device)"
        )
    n, _, h, w = images_u8.shape
    dev = images_u8.device
    padded = torch.nn.functional.pad(images_u8, (PAD, PAD, PAD, PAD))  # zeros
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # [N, C, 2*PAD+1, 2*PAD+1, H, W] view
    dy = torch.randint(0, 2 * PAD + 1, (n,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (n,), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    crops = windows[torch.arange(n, device=dev), :, dy, dx]  # [N, C, H, W]
    return torch.where(flip.view(n, 1, 1, 1), crops.flip(3), crops)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 64-bit seed for (seed, epoch): nearby pairs give unrelated streams."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


def _check_pair(images: Tensor, labels: Tensor, batch_size: int) -> None:
    _check_images_u8(images)
    if not isinstance(labels, Tensor) or labels.shape != (len(images),):
        raise ValueError(f"labels must be a 1-D tensor of length {len(images)} (one per image)")
    if labels.device != images.device:
        raise ValueError(f"images are on {images.device} but labels on {labels.device}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _finish(x_u8: Tensor, channels_last: bool) -> Tensor:
    x = normalize(x_u8)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_batches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    augment: bool = True,
    drop_last: bool = True,
    channels_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled (and by default augmented) batches, made on `images.device`.

    Yields normalized float32 x [B,3,32,32] and int64 y. The shuffle and augmentation come from a
    generator on that device seeded from (`seed`, `epoch`): the same pair gives the same batches
    (on the same kind of device), another epoch a different order. Arguments are checked now,
    not at the first batch.
    """
    _check_pair(images, labels, batch_size)
    if drop_last and len(images) < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {len(images)} training images, so "
            "drop_last=True would yield no batch; lower batch_size or pass drop_last=False"
        )
    generator = torch.Generator(device=images.device).manual_seed(_epoch_seed(seed, epoch))
    return _train_batch_iter(images, labels, batch_size, generator, augment, drop_last,
                             channels_last)


def _train_batch_iter(images, labels, batch_size, generator, do_augment, drop_last, channels_last):
    # `do_augment`, not `augment`: inside this function `augment` must mean the module function.
    n = len(images)
    order = torch.randperm(n, device=images.device, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx]
        if do_augment:
            x = augment(x, generator)
        yield _finish(x, channels_last), labels[idx]


def eval_batches(
    images: Tensor, labels: Tensor, batch_size: int, channels_last: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """All samples in order (last batch may be short), normalized, not augmented."""
    _check_pair(images, labels, batch_size)
    return _eval_batch_iter(images, labels, batch_size, channels_last)


def _eval_batch_iter(images, labels, batch_size, channels_last):
    for start in range(0, len(images), batch_size):
        yield (_finish(images[start : start + batch_size], channels_last),
               labels[start : start + batch_size])
