"""Training throughput: kdlib's training step against a typical research pipeline, side by side.

``python -m kdlib bench`` (``make bench``) times, in one process, on real CIFAR-100 training
batches (the ``quick`` preset's batch size; after warm-up; median of ``windows`` timed
windows of ``steps`` steps):

============================  ===================================================================
variant                       one training step
============================  ===================================================================
``fp32``              (a)     plain 32-bit ResNet-20 (CE, the preset's SGD)
``w4a4``              (b)     the same at 4-bit DoReFa weights and activations
``w1a1``              (b)     the same at 1 bit
``kd_w4``             (c)     4-bit student distilled from a 32-bit teacher (hinton): *exactly*
                              the step :func:`kdlib.train.fit` runs for the quick preset
``kd_w4_nchw``                (c) with ``channels_last=False``
``kd_w4_channels_last``       (c) with ``channels_last=True``
``kd_w4_bf16``                (c) with ``precision="bf16"`` (the mixed-precision mode, see
                              :mod:`kdlib.quant.layers`)
``kd_w4_compile``             (c) with ``compile=True`` (``torch.compile`` of student and teacher)
``kd_w4_bf16_compile``        (c) in the bf16 mode, compiled
``kd_w4_typical``     (d)     the same KD step as typical public research code writes it
                              (:mod:`kdlib.bench.typical`): its own ResNet-20 and DoReFa
                              (separate tanh/max/round ops, one autograd Function per quantizer,
                              weights re-quantized every step), a ``DataLoader`` (2 workers)
                              over PIL images with torchvision transforms, NCHW fp32 eager,
                              teacher in ``eval()`` without ``no_grad`` (logits detached), a
                              ``loss.item()`` per step
``data_kdlib``                only the batches of (c), no model
``data_typical``              only the batches of (d) (DataLoader, PIL, 2 workers), no model
============================  ===================================================================

Every kdlib variant (a)-(c) is the training step itself, not a copy of it: a
:class:`~kdlib.config.RunConfig` of the quick preset (``build_config("quick")`` with method and
bits set, plus the variant's switches; the other switches as the preset has them) goes through
:func:`kdlib.step.make_trainer`, and each timed step is :func:`kdlib.step.run_step` inside
:func:`kdlib.step.frozen_teacher`, on batches of :func:`kdlib.data.train_batches` over uint8
tensors on the device, at the learning rate of :func:`kdlib.schedules.lr_at`, as ``fit()`` does
(its per-epoch metric sums, three tiny device ops, are not included). Each variant records its
switches (precision, channels_last, compile, bits) and its whole run config. A variant whose
run config equals an earlier one's in the same run (``kd_w4_channels_last`` or ``kd_w4_nchw``,
whichever the preset already is) is not timed twice: it gets that variant's figures and
``same_as``. Compiled variants
get at least ``COMPILE_WARMUP_STEPS`` warm-up steps (compilation, slow on a CPU); the warm-up
time of every variant is recorded.

The variants and two matmul ceilings (``size x size`` products in fp32 and in bf16, made smaller
where one product takes over a quarter second) are built first, all warmed up, and then timed
in interleaved rounds (window k of every one before window k+1), so that a change of load on a
shared machine hits all alike; the process's CPU time per wall second of each window is
recorded too. FLOPs of each model variant are counted with ``torch.utils.flop_counter`` on one
eager step of a fresh copy (student forward + backward, plus the teacher forward for KD;
convolutions and matrix products only); its GFLOP/s = FLOPs per step / median step time,
reported against both ceilings.

Targets (:data:`TARGETS`, all from the same run): exact ``kd_w4`` >= 85% of the fp32 matmul
ceiling; the bf16-mode KD step >= 1.4x exact ``kd_w4``; the plain 4-bit step within 5% of the
plain 32-bit one. (c)/(d) and the other :data:`INFO_RATIOS` are reported as measured.

The result goes to ``<out>/<hostname>.json`` (written atomically), and a markdown table to
stdout; :func:`render_markdown` makes the README's table from such a file.

Modules: :mod:`~kdlib.bench.typical` (the typical pipeline), :mod:`~kdlib.bench.variants` (the
variants and their steps), :mod:`~kdlib.bench.measure` (timing windows, FLOP counts, matmul
ceilings, machine info), :mod:`~kdlib.bench.targets` (targets and ratios),
:mod:`~kdlib.bench.render` (markdown), :mod:`~kdlib.bench.run` (``run_benchmark``, ``main``);
the parts beside the variants: :mod:`~kdlib.bench.concurrent` (processes side by side),
:mod:`~kdlib.bench.grouped` (weights quantized together), :mod:`~kdlib.bench.profile`, and on
a GPU :mod:`~kdlib.bench.graphs` (fit()'s step replayed as a CUDA graph, ``kd_w4_graphs``)
and :mod:`~kdlib.bench.compiled` (torch.compile's levels and processes).
"""
from __future__ import annotations

from kdlib.bench.measure import (MATMUL_SIZE, Runner, count_flops, machine_info, matmul_runner,
                                 measure, time_window)
from kdlib.bench.render import render_markdown
from kdlib.bench.run import FORMAT, WARMUP_STEPS, main, run_benchmark
from kdlib.bench.targets import CEILINGS, INFO_RATIOS, TARGETS, compute_ratios
from kdlib.bench.typical import TYPICAL_WORKERS, PILImageDataset, typical_loader, typical_transform
from kdlib.bench.variants import (BY_NAME, COMPILE_WARMUP_STEPS, KD_BITS, PRESET, VARIANTS, Variant,
                                  make_context)

__all__ = [
    "FORMAT", "PRESET", "WARMUP_STEPS", "COMPILE_WARMUP_STEPS", "KD_BITS", "MATMUL_SIZE",
    "TYPICAL_WORKERS", "VARIANTS", "BY_NAME", "Variant", "TARGETS", "INFO_RATIOS", "CEILINGS",
    "Runner", "PILImageDataset", "typical_transform", "typical_loader", "machine_info",
    "count_flops", "matmul_runner", "time_window", "measure", "compute_ratios", "make_context",
    "run_benchmark", "render_markdown", "main",
]
