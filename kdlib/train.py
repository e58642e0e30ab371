"""One flat training loop: :func:`fit`, :func:`evaluate`, :func:`pick_device`.

``fit`` trains ``model`` on ``data.train_*`` with the hyperparameters of one
:class:`~kdlib.config.RunConfig`, selects the epoch with the best validation top-1, evaluates the
test split for the record only (at the best-val weights and at the final weights), and returns
a :class:`FitResult` with ``model`` holding the best-val weights.

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
* **Speed**: metrics accumulate on the device; the only per-epoch syncs are the non-finite
  checks and the end-of-epoch read-out. ``images_per_s`` = training images / training seconds
  (evaluation excluded).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from kdlib.config import RunConfig, validate
from kdlib.losses import apprentice_losses, ce_loss, kd_loss
from kdlib.schedules import lr_at

CHECKPOINT_FORMAT = 1
NONFINITE_CHECK_EVERY = 25  # steps between reads of the device-side non-finite flag
KD_METHODS = ("direct_kd", "ta_chain")
# Fields that do not change what is trained (same as RunConfig.run_id leaves out).
CONFIG_FIELDS_IGNORED_ON_RESUME = ("eval_batch_size", "preset")


class NonFiniteLossError(FloatingPointError):
    """The training loss became nan or inf; the message names the epoch and step."""


# ----------------------------------------------------------------------------- device
def pick_device(preference: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: cuda if available else cpu. ``"cpu"``, ``"cuda"``, ``"cuda:N"``: forced;
    a CUDA device that is not available raises ``ValueError``."""
    if preference is None or preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={preference!r} is unknown; accepted: None, 'auto', 'cpu', 'cuda', "
                         "'cuda:N'") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={preference!r} was requested but CUDA is not available here; "
                             "use 'cpu' or None (auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={preference!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise ValueError(f"device={preference!r} is not supported; accepted: None, 'auto', 'cpu', 'cuda'")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# ----------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000,
             device: str | torch.device | None = None, *, bf16: bool = False,
             channels_last: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent, 0..100) and mean CE of ``model`` on uint8 ``images``.

    Runs in ``eval()`` under ``torch.inference_mode()`` (the model's train/eval mode is restored
    afterwards). ``device=None``: the device of the model's parameters.
    """
    from kdlib.data import eval_batches

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
                with _autocast(device, bf16):
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


# ----------------------------------------------------------------------------- checkpoints
def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    from kdlib.fileio import torch_save_atomic

    torch_save_atomic(ckpt, path)


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
    return [n for n in names if n not in CONFIG_FIELDS_IGNORED_ON_RESUME
            and stored.get(n, "<missing>") != current.get(n, "<missing>")]


# ----------------------------------------------------------------------------- helpers
def _make_optimizer(module: nn.Module, cfg: RunConfig) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=bool(cfg.nesterov and cfg.momentum > 0),
                           weight_decay=cfg.weight_decay)


def _set_lr(optimizers, lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def _progress_bar(total: int, desc: str, enabled: bool):
    """tqdm.auto bar (notebook widget or text); plain text bar if ipywidgets are missing."""
    from tqdm.auto import tqdm

    try:
        return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
    except ImportError:  # tqdm.notebook without ipywidgets
        from tqdm.std import tqdm as text_tqdm

        return text_tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


def _kd_mode(cfg: RunConfig, teacher: nn.Module | None) -> str:
    """'plain', 'hinton' or 'apprentice'; ValueError on a method/teacher mismatch."""
    if cfg.method in KD_METHODS and teacher is None:
        raise ValueError(f"method={cfg.method!r} distils from a teacher but fit() got teacher=None; "
                         "pass the teacher model")
    if teacher is not None and cfg.method not in KD_METHODS:
        raise ValueError(f"fit() got a teacher but method={cfg.method!r} does not use one; "
                         f"teacher-using methods: {', '.join(KD_METHODS)}")
    if teacher is None:
        return "plain"
    if cfg.kd_mode not in ("hinton", "apprentice"):
        raise ValueError(f"kd_mode={cfg.kd_mode!r} is unknown; accepted: hinton, apprentice")
    return cfg.kd_mode


def _format_summary(row: dict, epochs: int, is_best: bool) -> str:
    line = (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  "
            f"train loss {row['train_loss']:.4f} top1 {row['train_top1']:5.2f}%  |  "
            f"val top1 {row['val_top1']:5.2f}% top5 {row['val_top5']:5.2f}% loss {row['val_loss']:.4f}")
    if "teacher_val_top1" in row:
        line += f"  teacher val top1 {row['teacher_val_top1']:5.2f}%"
    line += f"  |  {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s"
    return line + ("  *best" if is_best else "")


# ----------------------------------------------------------------------------- fit
def fit(model: nn.Module, data, cfg: RunConfig, *, teacher: nn.Module | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None, progress: bool = True) -> FitResult:
    """Train ``model`` per ``cfg`` on ``data`` (a :class:`kdlib.data.DataSplits`).

    Returns a :class:`FitResult`; ``model`` ends on ``device`` holding the best-validation
    weights. ``progress`` shows a tqdm bar per epoch; one summary line per epoch is printed
    either way. See the module docstring for every convention.
    """
    from kdlib.data import train_batches

    wall_start = time.perf_counter()
    validate(cfg)
    mode = _kd_mode(cfg, teacher)
    device = pick_device(device)
    data = data.to(device)
    n_train = int(data.train_labels.shape[0])
    steps = n_train // cfg.batch_size  # train_batches drops the last partial batch
    if steps == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training split "
                         f"({n_train} images): no full batch to train on")
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    if teacher is not None:
        teacher.to(device=device, memory_format=fmt)
    optimizer = _make_optimizer(model, cfg)
    optimizers = [optimizer]
    teacher_optimizer = None
    if mode == "apprentice":
        teacher_optimizer = _make_optimizer(teacher, cfg)
        optimizers.append(teacher_optimizer)

    history: list[dict] = []
    best = {"epoch": 0, "val_top1": -math.inf, "val_top5": float("nan"), "state": None}
    train_seconds, train_images, wall_before = 0.0, 0, 0.0
    start_epoch = 0
    path = Path(checkpoint_path) if checkpoint_path is not None else None

    if path is not None and path.exists():
        ckpt = load_checkpoint(path)
        diff = config_differences(ckpt["config"], cfg)
        if diff:
            detail = ", ".join(f"{n}: checkpoint {ckpt['config'].get(n, '<missing>')!r} vs "
                               f"now {cfg.to_dict().get(n, '<missing>')!r}" for n in diff)
            raise ValueError(f"checkpoint {str(path)!r} was written with a different config "
                             f"(fields {diff}: {detail}); use another checkpoint path or delete it")
        if ckpt["epoch"] > cfg.epochs:
            raise ValueError(f"checkpoint {str(path)!r} is at epoch {ckpt['epoch']} > epochs={cfg.epochs}")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if mode == "apprentice":
                teacher.load_state_dict(ckpt["teacher"])
                teacher_optimizer.load_state_dict(ckpt["teacher_optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"checkpoint {str(path)!r} does not fit this model/teacher: {exc}") from exc
        history = [dict(row) for row in ckpt["history"]]
        best = dict(ckpt["best"])
        train_seconds, train_images = float(ckpt["train_seconds"]), int(ckpt["train_images"])
        wall_before = float(ckpt["wall_time_s"])
        start_epoch = int(ckpt["epoch"])
        if ckpt.get("result") is not None:
            model.load_state_dict(best["state"])
            print(f"fit: {path} holds a finished run ({start_epoch} epochs); returning its result "
                  "without training", flush=True)
            return FitResult.from_dict({**ckpt["result"], "history": history})
        print(f"fit: resuming from {path} after epoch {start_epoch}/{cfg.epochs}", flush=True)

    def checkpoint(epoch_done: int, result: dict | None = None,
                   model_state: dict | None = None) -> None:
        if path is None:
            return
        ckpt = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch_done,
                "model": model_state if model_state is not None else _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "history": history, "best": best, "train_seconds": train_seconds,
                "train_images": train_images,
                "wall_time_s": wall_before + time.perf_counter() - wall_start, "result": result}
        if mode == "apprentice":
            ckpt["teacher"] = _cpu_state(teacher)
            ckpt["teacher_optimizer"] = teacher_optimizer.state_dict()
        _save_checkpoint(path, ckpt)

    forward = torch.compile(model) if cfg.compile else model
    teacher_forward = teacher
    if teacher is not None and cfg.compile:
        teacher_forward = torch.compile(teacher)
    teacher_was_training = teacher.training if teacher is not None else False
    frozen = False
    use_teacher = mode == "apprentice" or (mode == "hinton" and cfg.kd_alpha > 0)
    ev = dict(batch_size=cfg.eval_batch_size, device=device, bf16=cfg.bf16,
              channels_last=cfg.channels_last)
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []

    try:
        if mode == "hinton":
            from kdlib.quant import freeze_quantized_weights

            teacher.eval()
            freeze_quantized_weights(teacher)
            frozen = True
        elif mode == "apprentice":
            teacher.train()
        with torch.random.fork_rng(devices=rng_devices):
            for epoch in range(start_epoch, cfg.epochs):
                epoch_start = time.perf_counter()
                torch.manual_seed(_epoch_seed(cfg.seed, epoch))
                model.train()
                loss_sum = torch.zeros((), dtype=torch.float32, device=device)
                correct = torch.zeros((), dtype=torch.int64, device=device)
                bad_step = torch.full((), -1, dtype=torch.int64, device=device)
                epoch_lr = lr_at(epoch, cfg)
                bar = _progress_bar(steps, f"epoch {epoch + 1}/{cfg.epochs}", progress)
                batches = train_batches(data.train_images, data.train_labels, cfg.batch_size,
                                        seed=cfg.seed, epoch=epoch, channels_last=cfg.channels_last)
                step = -1
                try:
                    for step, (x, y) in enumerate(batches):
                        _set_lr(optimizers, lr_at(epoch + step / steps, cfg))
                        if mode == "hinton" and use_teacher:
                            with torch.inference_mode(), _autocast(device, cfg.bf16):
                                t_logits = teacher_forward(x)
                        with _autocast(device, cfg.bf16):
                            logits = forward(x)
                            if mode == "apprentice":
                                t_logits = teacher_forward(x)
                        if mode == "plain" or not use_teacher:
                            loss = ce_loss(logits, y, cfg.label_smoothing)
                            total = loss
                        elif mode == "hinton":
                            loss = kd_loss(logits, t_logits, y, cfg.kd_temperature, cfg.kd_alpha,
                                           cfg.label_smoothing)
                            total = loss
                        else:
                            loss, t_loss = apprentice_losses(logits, t_logits, y, cfg.kd_temperature,
                                                             cfg.kd_alpha, cfg.label_smoothing)
                            total = loss + t_loss
                        for opt in optimizers:
                            opt.zero_grad(set_to_none=True)
                        total.backward()
                        for opt in optimizers:
                            opt.step()
                        with torch.no_grad():
                            total_d = total.detach()
                            loss_sum += loss.detach()
                            correct += (logits.detach().argmax(dim=1) == y).sum()
                            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(total_d),
                                                   step, bad_step)
                        bar.update(1)
                        if (step + 1) % NONFINITE_CHECK_EVERY == 0:
                            _raise_if_nonfinite(bad_step, epoch, steps, path)
                finally:
                    bar.close()
                if step + 1 != steps:
                    raise RuntimeError(f"train_batches yielded {step + 1} batches, expected {steps} "
                                       f"({n_train} images // batch_size {cfg.batch_size})")
                _sync(device)
                epoch_train_s = time.perf_counter() - epoch_start
                _raise_if_nonfinite(bad_step, epoch, steps, path)
                train_loss = loss_sum.item() / steps
                train_top1 = 100.0 * correct.item() / (steps * cfg.batch_size)
                train_seconds += epoch_train_s
                train_images += steps * cfg.batch_size

                val = evaluate(forward, data.val_images, data.val_labels, **ev)
                row = {"epoch": epoch + 1, "lr": epoch_lr, "train_loss": train_loss,
                       "train_top1": train_top1, "val_top1": val["top1"], "val_top5": val["top5"],
                       "val_loss": val["loss"]}
                if mode == "apprentice":
                    row["teacher_val_top1"] = evaluate(teacher_forward, data.val_images,
                                                       data.val_labels, **ev)["top1"]
                row["seconds"] = time.perf_counter() - epoch_start
                row["images_per_s"] = steps * cfg.batch_size / max(epoch_train_s, 1e-9)
                history.append(row)
                is_best = val["top1"] > best["val_top1"]
                if is_best:
                    best = {"epoch": epoch + 1, "val_top1": val["top1"], "val_top5": val["top5"],
                            "state": _cpu_state(model)}
                print(_format_summary(row, cfg.epochs, is_best), flush=True)
                checkpoint(epoch + 1)

        for opt in optimizers:  # gradients of the last step would only mislead
            opt.zero_grad(set_to_none=True)
        # Test split, for the record only: final weights first, then the best-val weights.
        final_state = _cpu_state(model) if path is not None else None
        final = evaluate(forward, data.test_images, data.test_labels, **ev)
        model.load_state_dict(best["state"])
        # The last epoch was the best one: same weights, so the test pass is not repeated.
        at_best = final if best["epoch"] == cfg.epochs else evaluate(
            forward, data.test_images, data.test_labels, **ev)
        result = FitResult(
            history=history, best_epoch=int(best["epoch"]), best_val_top1=float(best["val_top1"]),
            best_val_top5=float(best["val_top5"]), test_top1=at_best["top1"],
            test_top5=at_best["top5"], final_test_top1=final["top1"],
            final_test_top5=final["top5"],
            wall_time_s=wall_before + time.perf_counter() - wall_start,
            train_images_per_s=train_images / max(train_seconds, 1e-9), device=str(device))
        checkpoint(cfg.epochs, result={k: v for k, v in result.to_dict().items() if k != "history"},
                   model_state=final_state)
        return result
    finally:
        if frozen:
            from kdlib.quant import unfreeze_quantized_weights

            unfreeze_quantized_weights(teacher)
        if teacher is not None:
            teacher.train(teacher_was_training)


def _raise_if_nonfinite(bad_step: Tensor, epoch: int, steps: int, path: Path | None) -> None:
    bad = int(bad_step.item())
    if bad < 0:
        return
    where = (f"; the last checkpoint {str(path)!r} (after epoch {epoch}) is untouched"
             if path is not None and path.exists() else "")
    raise NonFiniteLossError(f"non-finite training loss (nan/inf) at epoch {epoch + 1}, "
                             f"step {bad + 1} of {steps}{where}. Lower the learning rate, check the "
                             "data, or disable bf16")
