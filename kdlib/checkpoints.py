"""fit() checkpoints: written atomically after every epoch, read back with ``weights_only``.

A checkpoint holds only tensors and plain containers: the model and optimizer states, the
history so far, the best-validation weights, and (for a finished run) its result.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdlib.config import EXECUTION_ONLY_FIELDS, RunConfig

CHECKPOINT_FORMAT = 1


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a fit() checkpoint (``weights_only=True``); unreadable -> ``ValueError`` naming it."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated zip, pickle garbage, forbidden globals, ...
        raise ValueError(f"checkpoint {str(path)!r} is corrupted or not a kdlib checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "it was left in place: delete or move it to start this run over") from exc
    required = ("format", "config", "epoch", "model", "optimizer", "history", "best",
                "train_seconds", "train_images", "wall_time_s")
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is not a kdlib fit() checkpoint (missing "
                         f"{missing}); it was left in place: delete or move it to start over")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {ckpt['format']!r}; this kdlib "
                         f"reads format {CHECKPOINT_FORMAT}")
    return ckpt


def config_differences(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Names of the fields that change training and differ between ``stored`` and ``cfg``."""
    current = cfg.to_dict()
    names = sorted(set(stored) | set(current))
    return [n for n in names if n not in EXECUTION_ONLY_FIELDS
            and stored.get(n, "<missing>") != current.get(n, "<missing>")]


def epochs_done(path: str | os.PathLike) -> int:
    """The epochs a run's checkpoint holds (0 when there is none, or none that can be read:
    fit() then names the problem)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: nothing to resume
        return 0
