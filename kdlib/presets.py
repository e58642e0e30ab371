"""Every hyperparameter of a preset in one place.

A preset fixes the shared run settings (``run``), what differs for the 32-bit teacher
(``teacher_run``), and the pipeline grid (chain, methods, bit widths, seeds). Notebooks and
the CLI start from a preset and apply explicit overrides on top; ``build_config`` validates
the result once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdlib.config import RunConfig, validate

DEFAULT_CHAIN = (32, 16, 8, 4, 2, 1)
DEFAULT_PRESET = "quick"  # of the command line and make: the preset of the committed results
# Methods whose k-th link starts from the link before it (notebook 02) ...
CHAIN_METHODS = ("ta_chain", "progressive", "progressive_kd32")
# ... and methods that start from random weights or from the teacher (notebook 03).
STUDENT_METHODS = ("individual", "finetune", "direct_kd", "direct_kd_matched")
# Methods trained from random weights without a teacher: on the teacher's schedule (its epochs,
# lr, warm-up: ``teacher_run``), so that `individual` is the fair trained-alone baseline.
TEACHER_SCHEDULE_METHODS = ("teacher", "individual")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    run: dict[str, Any]  # RunConfig fields shared by every run of the grid
    teacher_run: dict[str, Any] = field(default_factory=dict)  # teacher-only overrides
    chain: tuple[int, ...] = DEFAULT_CHAIN  # TA chain, descending, starts at the 32-bit teacher
    chain_methods: tuple[str, ...] = CHAIN_METHODS  # along the chain, notebook 02
    methods: tuple[str, ...] = STUDENT_METHODS  # from random or teacher weights, notebook 03
    seeds: tuple[int, ...] = (0,)
    model: str = "resnet20"  # what the command line trains when --model is not given


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="seconds on a laptop CPU: a 200-image real-data slice, 1-2 epochs; "
                    "checks plumbing, numbers mean nothing",
        run=dict(train_size=200, val_size=100, test_size=200, epochs=1, batch_size=50, lr=0.05,
                 eval_batch_size=500),
        teacher_run=dict(epochs=2),
    ),
    "quick": Preset(
        name="quick",
        description="the whole grid on the full 45k/5k split of real CIFAR-100 and the full "
                    "10k test set, for a 2-core CPU: teacher 8 epochs (lr 0.2, 1 "
                    "warm-up epoch, cosine), `individual` on the teacher's schedule, every other "
                    "student 1 epoch per chain link (lr 0.05, cosine), channels_last",
        run=dict(train_size=None, val_size=5000, test_size=None, epochs=1, batch_size=128,
                 lr=0.05, weight_decay=5e-4, schedule="cosine", kd_temperature=4.0, kd_alpha=0.9,
                 channels_last=True),
        teacher_run=dict(epochs=8, lr=0.2, warmup_epochs=1),  # 6 epochs gave 49.35%, under 50
        seeds=(0, 1, 2),
    ),
    "quick_squeezenet": Preset(
        name="quick_squeezenet",
        description="SqueezeNet (about 3.3x ResNet-20's time per image here) on this 2-core CPU, "
                    "seeds 0, 1 and 2 for the contrasts' intervals: an 8k class-balanced training "
                    "subset and a 2.5k validation split (the full 10k test set), teacher 5 epochs "
                    "(lr 0.2, 1 warm-up epoch), `individual` on the teacher's schedule, 1 epoch "
                    "per chain link, the quick grid's methods but finetune",
        run=dict(train_size=8000, val_size=2500, test_size=None, epochs=1, batch_size=128,
                 lr=0.05, weight_decay=5e-4, schedule="cosine", kd_temperature=4.0, kd_alpha=0.9,
                 channels_last=True),
        teacher_run=dict(epochs=5, lr=0.2, warmup_epochs=1),
        methods=("individual", "direct_kd", "direct_kd_matched"),
        seeds=(0, 1, 2),
        model="squeezenet",
    ),
    "gpu": Preset(
        name="gpu",
        description="the quick grid's methods at GPU scale, its schedule chosen so that a "
                    "seed fits in about two 9-minute leases of a lent H100/H200 (17k img/s "
                    "over 4 runs side by side on an H200; the README has what a seed "
                    "took), seeds 0, 1 and 2 for the contrasts' intervals: full 45k/5k split "
                    "and 10k test set, teacher 15 epochs (lr 0.2, 1 warm-up epoch, cosine), "
                    "`individual` on the teacher's schedule, 2 epochs per chain link (lr 0.05, "
                    "cosine), channels_last",
        run=dict(train_size=None, val_size=5000, test_size=None, epochs=2, batch_size=128,
                 lr=0.05, weight_decay=5e-4, schedule="cosine", kd_temperature=4.0, kd_alpha=0.9,
                 channels_last=True, eval_batch_size=2500),
        teacher_run=dict(epochs=15, lr=0.2, warmup_epochs=1),
        seeds=(0, 1, 2),
    ),
    "paper": Preset(
        name="paper",
        description="full 45k/5k split, 200 epochs cosine, lr 0.1, wd 5e-4, batch 128 (a GPU job: "
                    "lease after lease, runs longer than a lease pausing at its end)",
        run=dict(train_size=None, val_size=5000, test_size=None, epochs=200, batch_size=128, lr=0.1,
                 weight_decay=5e-4, schedule="cosine", kd_temperature=4.0, kd_alpha=0.9,
                 channels_last=True, eval_batch_size=2500,
                 # decided before its first run (compile is in the run id), from the H200's
                 # figures (results/bench/NVIDIA_H200.json, README "On a GPU"): 8 compiled KD
                 # processes 60,174 img/s against 18,989 for the best eager count, 41 s to
                 # compile; levels exact with today's float64 division (spot check of
                 # 2026-12-04). Each compiled run checks its levels on its device first
                 # (kdlib.compile_check), and a lease whose benchmark found them inexact trains
                 # nothing (kdlib.lease.compile_undecided).
                 compile=True),
        seeds=(0, 1, 2),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_model(preset: str, model: str | None = None) -> str:
    """``model`` when given, else the model the preset trains (quick_squeezenet: SqueezeNet)."""
    return model or get_preset(preset).model


def build_config(preset: str, model: str | None = None, *, teacher: bool = False,
                 overrides: dict[str, Any] | None = None,
                 planned: dict[str, Any] | None = None) -> RunConfig:
    """Preset + (teacher overrides) + explicit overrides + planned fields -> one validated
    RunConfig.

    ``overrides`` (the user's: ``--set``, a notebook's ``overrides``) win over the preset, also
    for the teacher (an explicit ``epochs`` applies to every run). ``planned``: the fields the
    caller sets for this run itself (a grid's method, bits, seed, ids; `train`'s options).
    ``model`` defaults to the preset's. ValueError for an override of ``model``, ``preset`` or a
    planned field: it would be replaced, so it is refused rather than silently ignored.
    """
    planned = dict(planned or {})
    clash = sorted(set(overrides or {}) & ({"model", "preset"} | set(planned)))
    if clash:
        raise ValueError(f"overrides name {clash}, which this run's own arguments set: give them "
                         "as options (--model, --preset, --seed(s), --method(s), --chain, --bits, "
                         "--w-bits/--a-bits, --teacher-id, --init-id), not as --set/overrides")
    spec = get_preset(preset)
    fields: dict[str, Any] = {**spec.run, **(spec.teacher_run if teacher else {})}
    fields.update(overrides or {})
    fields.update(planned, model=model or spec.model, preset=preset)
    return validate(RunConfig.from_dict(fields))
