"""Learning-rate schedules as pure functions of a (fractional) epoch.

``lr_at(epoch, cfg)`` is the only thing :func:`kdlib.train.fit` calls. It is evaluated **per
step** at the fractional epoch ``e + i / steps_per_epoch`` (``e`` = epochs completed, ``i`` =
step within the epoch, both 0-based), so warm-up and cosine decay are smooth within an epoch.
Evaluated at whole numbers it is the usual per-epoch schedule. Consequences of the per-step
convention:

* cosine reaches exactly 0 at ``epoch == cfg.epochs``; the last training step uses
  ``lr_at(epochs - 1/steps_per_epoch)``, a small positive value;
* multistep milestones are fractions of ``cfg.epochs``; the learning rate drops at the first
  step whose fractional epoch is ``>= milestone * epochs`` (at an epoch boundary whenever
  ``milestone * epochs`` is a whole number, e.g. 0.5 * 200 = 100);
* warm-up (``cfg.warmup_epochs`` > 0) rises linearly from ``lr / 10`` at epoch 0 towards ``lr``
  at ``warmup_epochs``; the cosine decay then runs over the remaining
  ``epochs - warmup_epochs`` epochs, the multistep factor applies from epoch 0 (it is 1 during
  warm-up unless a milestone falls inside it).

Every function here is pure: same arguments, same number, no state.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

WARMUP_START_FACTOR = 0.1  # warm-up starts at lr / 10


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear ramp from ``WARMUP_START_FACTOR`` at epoch 0 to 1 at ``warmup_epochs``; 1 after."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return 1.0
    frac = max(epoch, 0.0) / warmup_epochs
    return WARMUP_START_FACTOR + (1.0 - WARMUP_START_FACTOR) * frac


def cosine_factor(epoch: float, epochs: float, warmup_epochs: float = 0) -> float:
    """Half-cosine from 1 at ``warmup_epochs`` to 0 at ``epochs`` (1 before, 0 after)."""
    span = epochs - warmup_epochs
    if span <= 0:
        return 1.0 if epoch < epochs else 0.0
    t = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def multistep_factor(epoch: float, epochs: float, milestones: Sequence[float],
                     gamma: float) -> float:
    """``gamma ** k`` where ``k`` = number of milestones (fractions of ``epochs``) already
    passed."""
    passed = sum(1 for m in milestones if epoch >= m * epochs)
    return gamma ** passed


def lr_factor(epoch: float, cfg) -> float:
    """Multiplier of ``cfg.lr`` at fractional ``epoch`` (see module docstring)."""
    warm = warmup_factor(epoch, cfg.warmup_epochs)
    if cfg.schedule == "cosine":
        return warm * cosine_factor(epoch, cfg.epochs, cfg.warmup_epochs)
    if cfg.schedule == "multistep":
        return warm * multistep_factor(epoch, cfg.epochs, cfg.milestones, cfg.lr_gamma)
    raise ValueError(f"schedule={cfg.schedule!r} is unknown; accepted: cosine, multistep")


def lr_at(epoch: float, cfg) -> float:
    """Learning rate at fractional ``epoch`` (0 <= epoch <= cfg.epochs) for config ``cfg``."""
    return cfg.lr * lr_factor(epoch, cfg)
