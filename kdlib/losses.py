"""Distillation losses, one small function per loss (RepDistiller style).

All losses are computed in float32 (logits are cast up), so they are safe under bf16 autocast.
Teacher logits are always detached: no gradient ever reaches the teacher through a KD term.

* :func:`ce_loss`        -- cross-entropy with optional label smoothing (mean over the batch)
* :func:`kd_term`        -- Hinton's soft-target term ``T^2 * KL(p_teacher^T || p_student^T)``,
  KL summed over classes and averaged over the batch (``reduction="batchmean"``; the
  ``reduction="mean"`` found in some public code also divides by the number of classes)
* :func:`kd_loss`        -- ``(1 - alpha) * CE + alpha * kd_term``
* :func:`kd_loss_terms`  -- the same total and its two terms apart (for the training curves)
* :func:`apprentice_losses` -- Mishra & Marr (2018) joint training: the teacher learns from its
  own CE, the student from ``kd_loss`` against the (detached) teacher logits
* :func:`apprentice_loss_terms` -- the same two losses and the student's two terms apart
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def ce_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of ``logits`` [B, C] against integer ``labels`` [B]."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def kd_term(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch-mean, teacher detached."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is invalid; expected a number > 0")
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    # Dividing creates an ordinary tensor even when the teacher ran under inference_mode,
    # so it can be saved for the backward pass of the KL.
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float,
            alpha: float, label_smoothing: float = 0.0) -> Tensor:
    """Hinton KD: ``(1 - alpha) * CE(student, labels) + alpha * kd_term(student, teacher, T)``.

    ``alpha = 0`` is plain CE (the teacher logits are not even looked at), ``alpha = 1`` pure
    soft targets.
    """
    _check_alpha(alpha)
    if alpha == 0:
        return ce_loss(student_logits, labels, label_smoothing)
    return kd_loss_terms(student_logits, teacher_logits, labels, temperature, alpha,
                         label_smoothing)[0]


def kd_loss_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                  temperature: float, alpha: float,
                  label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(kd_loss, CE, kd_term)``: the total is :func:`kd_loss`'s, computed by the same
    operations (bit-identical, same gradients); the two terms are reported apart. Unlike
    ``kd_loss`` at ``alpha = 0`` it always computes the KD term (only to report it)."""
    _check_alpha(alpha)
    ce = ce_loss(student_logits, labels, label_smoothing)
    kd = kd_term(student_logits, teacher_logits, temperature)
    if alpha == 0:
        return ce, ce, kd
    if alpha == 1:
        return kd, ce, kd
    return (1.0 - alpha) * ce + alpha * kd, ce, kd


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is invalid; expected a number in [0, 1]")


def apprentice_losses(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                      temperature: float, alpha: float,
                      label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Apprentice joint scheme: ``(student_loss, teacher_loss)``.

    ``student_loss = kd_loss(student, teacher.detach(), ...)``; ``teacher_loss = CE(teacher)``.
    Their sum can be back-propagated once: the teacher's gradient comes from its CE alone.
    """
    return apprentice_loss_terms(student_logits, teacher_logits, labels, temperature, alpha,
                                 label_smoothing)[:2]


def apprentice_loss_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                          temperature: float, alpha: float, label_smoothing: float = 0.0
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(student_loss, teacher_loss, student CE, KD term)``: :func:`apprentice_losses` with the
    student's two terms apart (:func:`kd_loss_terms`, the same total)."""
    student, ce, kd = kd_loss_terms(student_logits, teacher_logits, labels, temperature, alpha,
                                    label_smoothing)
    teacher = ce_loss(teacher_logits, labels, label_smoothing)
    return student, teacher, ce, kd


__all__ = ["ce_loss", "kd_term", "kd_loss", "kd_loss_terms", "apprentice_losses",
           "apprentice_loss_terms"]
