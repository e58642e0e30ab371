"""Live training curves: one TensorBoard scalar per history key and epoch (the JSON record
stays the source of truth; these are for watching a long run)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

TENSORBOARD_ENV = "KDLIB_TENSORBOARD"  # "0": fit writes no TensorBoard scalars by default
# history key -> TensorBoard tag; keys a row lacks (train_ce/train_kd of non-KD runs) are skipped
TENSORBOARD_TAGS = {"train_loss": "train/loss", "train_top1": "train/top1",
                    "train_ce": "train/ce", "train_kd": "train/kd", "val_top1": "val/top1",
                    "val_top5": "val/top5", "val_loss": "val/loss",
                    "teacher_val_top1": "val/teacher_top1", "lr": "lr",
                    "images_per_s": "images_per_s"}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_dir(setting: bool | str | os.PathLike | None,
                    checkpoint: Path | None) -> Path | None:
    """The folder ``fit(tensorboard=setting)`` writes its scalars to, or None for none."""
    if setting is False:
        return None
    if setting is not None and setting is not True:
        return Path(setting)
    in_results = checkpoint is not None and checkpoint.parent.name == "checkpoints"
    default = checkpoint.parent.parent / "tb" / checkpoint.stem if in_results else None
    if setting is True and default is None:
        raise ValueError(f"tensorboard=True with checkpoint_path={checkpoint!r}: no results "
                         "folder to write tb/<run_id> into; pass tensorboard=FOLDER instead")
    if setting is None and (os.environ.get(TENSORBOARD_ENV, "1") == "0"
                            or not tensorboard_available()):
        return None
    return default


@contextlib.contextmanager
def scalar_writer(folder: Path | None, epochs_done: int):
    """A SummaryWriter on ``folder`` (None: no writer) that hides the steps after
    ``epochs_done`` left by an interrupted session; closed (flushed) on exit."""
    if folder is None:
        yield None
        return
    if not tensorboard_available():
        raise ImportError(f"TensorBoard scalars for {folder} need the tensorboard package: "
                          "pip install -e '.[tb]', or pass tensorboard=False")
    from torch.utils.tensorboard import SummaryWriter  # lazy: optional and slow to import

    writer = SummaryWriter(str(folder), purge_step=epochs_done + 1)
    try:
        yield writer
    finally:
        writer.close()


def write_scalars(writer, row: dict) -> None:
    """One epoch's history row as scalars at global step ``row["epoch"]``, flushed at once
    so the curves are live."""
    if writer is None:
        return
    for key, tag in TENSORBOARD_TAGS.items():
        if key in row:
            writer.add_scalar(tag, row[key], global_step=row["epoch"])
    writer.flush()
