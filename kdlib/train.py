"""The training loop: :func:`fit` over :func:`train_epoch` over :func:`kdlib.step.run_step`.

``fit`` is a short orchestration of named pieces: resume from a checkpoint (``_resume``), one
epoch (:func:`train_epoch`), the batch loss (:func:`kdlib.step.batch_loss`), a validation row
per epoch, and the final test evaluation (``_test_at_final_and_best``). It trains ``model`` on
``data.train_*`` with the hyperparameters of one :class:`~kdlib.config.RunConfig`, selects the
epoch with the best validation top-1 (the earliest of tied epochs), evaluates the test split for
the record only (at the best-val weights and at the final weights), and returns a
:class:`FitResult` with ``model`` holding the best-val weights.

Decisions (documented here because they change numbers):

* **Optimizer**: SGD with momentum ``cfg.momentum`` (Nesterov if ``cfg.nesterov`` and momentum
  > 0) and weight decay ``cfg.weight_decay`` on **all** parameters (BatchNorm and biases
  included), as in the ResNet-CIFAR, TAKD and Apprentice reference code.
* **Schedule**: :func:`kdlib.schedules.lr_at` evaluated **per step** at the fractional epoch
  ``e + i / steps_per_epoch``. History's ``lr`` is the rate of the epoch's first step.
* **Losses**: ``cfg.method`` in (direct_kd, ta_chain) needs a ``teacher``; other methods must
  not get one (a mismatch is a ``ValueError``, never a silent plain-CE run).
  ``kd_mode == "hinton"``: the teacher runs in ``eval()`` under ``torch.inference_mode()`` with
  its quantized weights computed once (:func:`kdlib.quant.freeze_quantized_weights`, undone at
  the end) and never receives gradients; loss :func:`kdlib.losses.kd_loss`.
  ``kd_mode == "apprentice"``: teacher and student train together
  (:func:`kdlib.losses.apprentice_losses`); the teacher has its own SGD with the same
  hyperparameters and schedule; the teacher ends with its final (not best) weights, and
  history gets ``teacher_val_top1``.
* **train_loss / train_top1** are means over the epoch's training batches (augmented, train
  mode) of the optimised loss and the student's top-1.
* **Non-finite loss**: a device-side flag records the first step whose loss is nan/inf; it is
  read every ``NONFINITE_CHECK_EVERY`` steps and at the end of the epoch (one host sync per
  check, none per step), and raises :class:`NonFiniteLossError` naming epoch and step. The
  epoch's checkpoint is then not written, so the last good checkpoint stays untouched.
* **Randomness**: batches come from ``kdlib.data.train_batches(seed=cfg.seed, epoch=e)``; the
  global torch RNG (dropout, if a model has any) is reseeded from ``(cfg.seed, e)`` at the start
  of every epoch inside ``torch.random.fork_rng`` (the caller's RNG state is left untouched).
  Hence a resumed run continues exactly where the interrupted one would have been (on CPU).
* **Checkpoints** (``checkpoint_path``): written atomically after every epoch; hold only tensors
  and plain containers, read back with ``torch.load(weights_only=True)``. Restarting with the
  same arguments resumes from the last completed epoch; a checkpoint of a finished run returns
  its stored result without training. A checkpoint whose config differs (any field but
  ``eval_batch_size`` and ``preset``) or that cannot be read raises ``ValueError`` naming the
  file; the file is never deleted or overwritten in that case.
* **TensorBoard** (``tensorboard`` argument): one scalar per history key of
  :data:`kdlib.tblog.TENSORBOARD_TAGS` per epoch (global step = epoch), written by ``fit`` after the
  validation pass and before the epoch's checkpoint, never inside a step. By default (None) a run
  whose checkpoint lies in a results folder (``<results_dir>/checkpoints/<run_id>.pt``) writes to
  ``<results_dir>/tb/<run_id>/`` when tensorboard is installed and ``$KDLIB_TENSORBOARD`` is not
  ``0``. A resumed run purges what the interrupted session wrote after its last checkpoint. The
  JSON record stays the source of truth.
* **Deadline** (``deadline``, a :class:`kdlib.budget.Deadline`): a budgeted run starts an epoch
  only if it is expected to end (the last one with its test pass) before the deadline; else
  ``fit`` raises :class:`RunSuspended` after the last epoch's checkpoint, and the same call
  later resumes there. Needs a ``checkpoint_path``.
* **Speed**: metrics accumulate on the device; the only per-epoch syncs are the non-finite
  checks and the end-of-epoch read-out. ``images_per_s`` = training images / training seconds
  (evaluation excluded). ``cuda_graphs`` on CUDA: each fit() call runs a few eager steps, then
  replays the step's forward and backward as one CUDA graph (:class:`kdlib.step.GraphedStep`; the
  same kernels, so the same arithmetic; the SGD update stays eager).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.std import TqdmWarning, tqdm as text_tqdm

with warnings.catch_warnings():  # in a kernel without ipywidgets, tqdm.auto warns (with this
    warnings.simplefilter("ignore", TqdmWarning)  # machine's paths) and falls back to text bars
    from tqdm.auto import tqdm

from kdlib.checkpoints import CHECKPOINT_FORMAT, config_differences, cpu_state, load_checkpoint
from kdlib.config import RunConfig
from kdlib.data import eval_batches, train_batches
from kdlib.device import pick_device, sync
from kdlib.fileio import torch_save_atomic
from kdlib.schedules import lr_at
from kdlib.step import Trainer, autocast, frozen_teacher, make_trainer, run_step
from kdlib.tblog import scalar_writer, tensorboard_dir, write_scalars

if TYPE_CHECKING:
    from kdlib.budget import Deadline

__all__ = ["fit", "evaluate", "FitResult", "NonFiniteLossError", "RunSuspended", "pick_device",
           "load_checkpoint", "train_epoch"]

NONFINITE_CHECK_EVERY = 25  # steps between reads of the device-side non-finite flag


class NonFiniteLossError(FloatingPointError):
    """The training loss became nan or inf; the message names the epoch and step."""


# ----------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000,
             device: str | torch.device | None = None, *, precision: str = "exact",
             channels_last: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent, 0..100) and mean CE of ``model`` on uint8 ``images``.

    Runs in ``eval()`` under ``torch.inference_mode()`` (the model's train/eval mode is restored
    afterwards). ``device=None``: the device of the model's parameters.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("evaluate() got an empty split (0 images)")
    images, labels = images.to(device), labels.to(device)
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.inference_mode():
            for x, y in eval_batches(images, labels, batch_size, channels_last=channels_last):
                with autocast(device, precision):
                    logits = model(x)
                logits = logits.float()
                loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit = top == y[:, None]
                correct1 += hit[:, 0].sum()
                correct5 += hit.any(dim=1).sum()
        c1, c5, loss = (t.item() for t in (correct1, correct5, loss_sum))
    finally:
        model.train(was_training)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n}


# ----------------------------------------------------------------------------- result
@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # 1-based epoch whose weights are returned
    best_val_top1: float = float("nan")
    best_val_top5: float = float("nan")
    test_top1: float = float("nan")  # at the best-val weights
    test_top5: float = float("nan")
    final_test_top1: float = float("nan")  # at the weights after the last epoch
    final_test_top5: float = float("nan")
    wall_time_s: float = 0.0  # training + evaluation, summed over resumed sessions
    train_images_per_s: float = 0.0  # training images / pure training seconds
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitResult":
        return cls(**d)


# ----------------------------------------------------------------------------- one epoch
def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def _progress_bar(total: int, desc: str, enabled: bool):
    """tqdm.auto bar (notebook widget or text); plain text bar if ipywidgets are missing."""
    try:
        return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
    except ImportError:  # tqdm.notebook without ipywidgets
        return text_tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


def _format_summary(row: dict, epochs: int, is_best: bool) -> str:
    line = (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  "
            f"train loss {row['train_loss']:.4f} top1 {row['train_top1']:5.2f}%  |  "
            f"val top1 {row['val_top1']:5.2f}% top5 {row['val_top5']:5.2f}% "
            f"loss {row['val_loss']:.4f}")
    if "teacher_val_top1" in row:
        line += f"  teacher val top1 {row['teacher_val_top1']:5.2f}%"
    line += f"  |  {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s"
    return line + ("  *best" if is_best else "")


def train_epoch(trainer: Trainer, data, epoch: int, *, progress: bool = True,
                checkpoint: Path | None = None) -> dict[str, float]:
    """Train one epoch of ``data.train_*`` (already on the trainer's device).

    Returns ``train_loss`` and ``train_top1`` (means over the epoch's batches), ``steps`` and
    ``train_seconds``; when the steps use teacher logits also ``train_ce`` and ``train_kd``, the
    epoch means of the student's two loss terms. Metrics accumulate on the device; the host
    reads them once at the end, plus the non-finite flag every ``NONFINITE_CHECK_EVERY`` steps
    (``checkpoint`` is only named in that error).
    """
    cfg, device = trainer.cfg, trainer.device
    n_train = int(data.train_labels.shape[0])
    steps = n_train // cfg.batch_size  # train_batches drops the last partial batch
    epoch_start = time.perf_counter()
    torch.manual_seed(_epoch_seed(cfg.seed, epoch))
    trainer.model.train()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    terms_sum = (torch.zeros(2, dtype=torch.float32, device=device)
                 if trainer.uses_teacher_logits else None)
    bar = _progress_bar(steps, f"epoch {epoch + 1}/{cfg.epochs}", progress)
    batches = train_batches(data.train_images, data.train_labels, cfg.batch_size,
                            seed=cfg.seed, epoch=epoch, channels_last=cfg.channels_last)
    step = -1
    try:
        for step, (x, y) in enumerate(batches):
            loss, total, logits = run_step(trainer, x, y, lr_at(epoch + step / steps, cfg),
                                           terms_sum=terms_sum)
            with torch.no_grad():
                loss_sum += loss
                correct += (logits.argmax(dim=1) == y).sum()
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(total), step, bad_step)
            bar.update(1)
            if (step + 1) % NONFINITE_CHECK_EVERY == 0:
                _raise_if_nonfinite(bad_step, epoch, steps, checkpoint)
    finally:
        bar.close()
    if step + 1 != steps:
        raise RuntimeError(f"train_batches yielded {step + 1} batches, expected {steps} "
                           f"({n_train} images // batch_size {cfg.batch_size})")
    sync(device)
    seconds = time.perf_counter() - epoch_start
    _raise_if_nonfinite(bad_step, epoch, steps, checkpoint)
    stats = {"train_loss": loss_sum.item() / steps,
             "train_top1": 100.0 * correct.item() / (steps * cfg.batch_size),
             "steps": steps, "train_seconds": seconds}
    if terms_sum is not None:
        ce, kd = terms_sum.tolist()
        stats.update(train_ce=ce / steps, train_kd=kd / steps)
    return stats


# ----------------------------------------------------------------------------- fit
@dataclass
class _Progress:
    """What survives an interruption: written into every checkpoint, read back on resume."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_top1": -math.inf,
                                                "val_top5": float("nan"), "state": None})
    train_seconds: float = 0.0
    train_images: int = 0
    wall_before: float = 0.0  # wall seconds of earlier sessions
    epochs_done: int = 0
    result: dict | None = None  # set once the run has finished


def _resume(path: Path | None, trainer: Trainer) -> _Progress:
    """The progress stored in ``path`` (model and optimizers restored from it), or a fresh one."""
    cfg = trainer.cfg
    if path is None or not path.exists():
        return _Progress()
    ckpt = load_checkpoint(path)
    diff = config_differences(ckpt["config"], cfg)
    if diff:
        detail = ", ".join(f"{n}: checkpoint {ckpt['config'].get(n, '<missing>')!r} vs "
                           f"now {cfg.to_dict().get(n, '<missing>')!r}" for n in diff)
        raise ValueError(f"checkpoint {str(path)!r} was written with a different config "
                         f"(fields {diff}: {detail}); use another checkpoint path or delete it")
    if ckpt["epoch"] > cfg.epochs:
        raise ValueError(f"checkpoint {str(path)!r} is at epoch {ckpt['epoch']} > "
                         f"epochs={cfg.epochs}")
    try:
        trainer.model.load_state_dict(ckpt["model"])
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        if trainer.mode == "apprentice":
            trainer.teacher.load_state_dict(ckpt["teacher"])
            trainer.teacher_optimizer.load_state_dict(ckpt["teacher_optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model/teacher: "
                         f"{exc}") from exc
    return _Progress(history=[dict(row) for row in ckpt["history"]], best=dict(ckpt["best"]),
                     train_seconds=float(ckpt["train_seconds"]),
                     train_images=int(ckpt["train_images"]), wall_before=float(ckpt["wall_time_s"]),
                     epochs_done=int(ckpt["epoch"]), result=ckpt.get("result"))


def _save_checkpoint(path: Path | None, trainer: Trainer, progress: _Progress, wall: float,
                     model_state: dict | None = None) -> None:
    if path is None:
        return
    ckpt = {"format": CHECKPOINT_FORMAT, "config": trainer.cfg.to_dict(),
            "epoch": progress.epochs_done,
            "model": model_state if model_state is not None else cpu_state(trainer.model),
            "optimizer": trainer.optimizer.state_dict(), "history": progress.history,
            "best": progress.best, "train_seconds": progress.train_seconds,
            "train_images": progress.train_images, "wall_time_s": progress.wall_before + wall,
            "result": progress.result}
    if trainer.mode == "apprentice":
        ckpt["teacher"] = cpu_state(trainer.teacher)
        ckpt["teacher_optimizer"] = trainer.teacher_optimizer.state_dict()
    torch_save_atomic(ckpt, path)


def _validation_row(trainer: Trainer, data, epoch: int, epoch_stats: dict, started: float,
                    ev: dict) -> dict:
    """The history row of one finished epoch: training metrics plus a validation pass."""
    val = evaluate(trainer.forward, data.val_images, data.val_labels, **ev)
    row = {"epoch": epoch + 1, "lr": lr_at(epoch, trainer.cfg),
           "train_loss": epoch_stats["train_loss"], "train_top1": epoch_stats["train_top1"],
           "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}
    row.update({k: epoch_stats[k] for k in ("train_ce", "train_kd") if k in epoch_stats})
    if trainer.mode == "apprentice":
        row["teacher_val_top1"] = evaluate(trainer.teacher_forward, data.val_images,
                                           data.val_labels, **ev)["top1"]
    row["seconds"] = time.perf_counter() - started
    row["images_per_s"] = (epoch_stats["steps"] * trainer.cfg.batch_size
                           / max(epoch_stats["train_seconds"], 1e-9))
    return row


def _test_at_final_and_best(trainer: Trainer, data, progress: _Progress,
                            ev: dict) -> tuple[dict, dict]:
    """Test metrics at the final weights, then at the best-val weights (left in the model).
    When the last epoch was the best one the weights are the same: one test pass."""
    final = evaluate(trainer.forward, data.test_images, data.test_labels, **ev)
    trainer.model.load_state_dict(progress.best["state"])
    if progress.best["epoch"] == trainer.cfg.epochs:
        return final, final
    return final, evaluate(trainer.forward, data.test_images, data.test_labels, **ev)


def fit(model: nn.Module, data, cfg: RunConfig, *, teacher: nn.Module | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None, progress: bool = True,
        tensorboard: bool | str | os.PathLike | None = None,
        deadline: Deadline | None = None, side_by_side: int | None = None,
        runs_in_flight: Callable[[], int] | None = None) -> FitResult:
    """Train ``model`` per ``cfg`` on ``data`` (a :class:`kdlib.data.DataSplits`).

    Returns a :class:`FitResult`; ``model`` ends on ``device`` holding the best-validation
    weights. ``progress`` shows a tqdm bar per epoch; one summary line per epoch is printed
    either way. ``tensorboard``: False for no scalars, a folder to write them to, True for
    ``<results_dir>/tb/<run_id>``, None for that when tensorboard is installed (see the module
    docstring). ``side_by_side``: how many runs train on this device at once in this session,
    noted on each epoch's history row (an epoch's seconds depend on it, and a resumed run's
    epochs may come from sessions with different counts). ``runs_in_flight``: the live count of
    the runs training on this device now (this one included), where the executor keeps one:
    each epoch's row then notes the mean of its counts at the epoch's start and end (a run can
    train alone although ``side_by_side`` runs were allowed, as a teacher does while its
    students wait). See the module docstring for every convention.
    """
    wall_start = time.perf_counter()
    trainer = make_trainer(model, cfg, teacher=teacher, device=device)
    device = trainer.device
    data = data.to(device)
    if int(data.train_labels.shape[0]) < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training split "
                         f"({int(data.train_labels.shape[0])} images): no full batch to train on")
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if deadline is not None and path is None:
        raise ValueError("fit(deadline=...) needs a checkpoint_path: a run stopped at its deadline "
                         "resumes from its checkpoint")
    tb_folder = tensorboard_dir(tensorboard, path)
    state = _resume(path, trainer)
    if state.result is not None:
        model.load_state_dict(state.best["state"])
        print(f"fit: {path} holds a finished run ({state.epochs_done} epochs); returning its "
              "result without training", flush=True)
        return FitResult.from_dict({**state.result, "history": state.history})
    if state.epochs_done:
        print(f"fit: resuming from {path} after epoch {state.epochs_done}/{cfg.epochs}", flush=True)

    ev = dict(batch_size=cfg.eval_batch_size, device=device, precision=cfg.precision,
              channels_last=cfg.channels_last)
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    # runs side by side print into one log: each epoch's line then says whose it is
    label = (f"{cfg.method} w{cfg.w_bits}a{cfg.a_bits} s{cfg.seed}: "
             if side_by_side is not None and side_by_side > 1 else "")
    with frozen_teacher(trainer), torch.random.fork_rng(devices=rng_devices), \
            scalar_writer(tb_folder, state.epochs_done) as writer:
        measured: list[float] = []  # this session's epochs, for the deadline
        for epoch in range(state.epochs_done, cfg.epochs):
            if deadline is not None and not deadline.allows(epoch, cfg.epochs, measured):
                raise RunSuspended(cfg.run_id(), state.epochs_done, cfg.epochs)
            started = time.perf_counter()
            beside_before = runs_in_flight() if runs_in_flight is not None else None
            stats = train_epoch(trainer, data, epoch, progress=progress, checkpoint=path)
            state.train_seconds += stats["train_seconds"]
            state.train_images += stats["steps"] * cfg.batch_size
            row = _validation_row(trainer, data, epoch, stats, started, ev)
            if side_by_side is not None:
                row["side_by_side"] = side_by_side
            if beside_before is not None:
                row["runs_in_flight"] = (beside_before + runs_in_flight()) / 2
            state.history.append(row)
            measured.append(row["seconds"])
            is_best = row["val_top1"] > state.best["val_top1"]
            if is_best:
                state.best = {"epoch": epoch + 1, "val_top1": row["val_top1"],
                              "val_top5": row["val_top5"], "state": cpu_state(model)}
            print(label + _format_summary(row, cfg.epochs, is_best), flush=True)
            write_scalars(writer, row)  # before the checkpoint: a resume purges it if lost
            state.epochs_done = epoch + 1
            _save_checkpoint(path, trainer, state, time.perf_counter() - wall_start)

        for opt in trainer.optimizers:  # gradients of the last step would only mislead
            opt.zero_grad(set_to_none=True)
        trainer.graphed = None  # its graph's memory goes now, not at the next garbage collection
        final_state = cpu_state(model) if path is not None else None
        final, at_best = _test_at_final_and_best(trainer, data, state, ev)
    result = FitResult(
        history=state.history, best_epoch=int(state.best["epoch"]),
        best_val_top1=float(state.best["val_top1"]), best_val_top5=float(state.best["val_top5"]),
        test_top1=at_best["top1"], test_top5=at_best["top5"], final_test_top1=final["top1"],
        final_test_top5=final["top5"],
        wall_time_s=state.wall_before + time.perf_counter() - wall_start,
        train_images_per_s=state.train_images / max(state.train_seconds, 1e-9), device=str(device))
    state.result = {k: v for k, v in result.to_dict().items() if k != "history"}
    _save_checkpoint(path, trainer, state, time.perf_counter() - wall_start,
                     model_state=final_state)
    return result


class RunSuspended(Exception):
    """fit() stopped at an epoch boundary, its checkpoint written, because the next epoch would
    end past its deadline; calling it again resumes there."""

    def __init__(self, run_id: str, epochs_done: int, epochs: int):
        super().__init__(run_id, epochs_done, epochs)  # picklable: it crosses process pools
        self.run_id, self.epochs_done, self.epochs = run_id, epochs_done, epochs

    def __str__(self) -> str:
        return (f"{self.run_id} after epoch {self.epochs_done}/{self.epochs} (its checkpoint is "
                "kept): the next epoch would end past the time budget; the next call resumes it")


def _raise_if_nonfinite(bad_step: Tensor, epoch: int, steps: int, path: Path | None) -> None:
    bad = int(bad_step.item())
    if bad < 0:
        return
    where = (f"; the last checkpoint {str(path)!r} (after epoch {epoch}) is untouched"
             if path is not None and path.exists() else "")
    raise NonFiniteLossError(f"non-finite training loss (nan/inf) at epoch {epoch + 1}, "
                             f"step {bad + 1} of {steps}{where}. Lower the learning rate, "
                             "check the data, or use precision='exact'")
