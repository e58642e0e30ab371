"""Weights quantized together (:mod:`kdlib.quant.grouped`) on the device the benchmark runs on.

Three things, about a minute on a CPU and seconds on a GPU:

* whether the grouped quantization equals the per-layer one bit for bit there (values and
  gradients, ResNet-20's conv shapes, NCHW and channels_last, 1, 2, 4, 8 and 16 bits): the
  unit tests check that on the CPU, this on the GPU whose kernels are what a lease trains with;
* fit()'s KD 4-bit step with the weights quantized together and per layer, in interleaved
  windows;
* the operators each of those steps dispatches (:func:`kdlib.bench.measure.count_ops`): on a
  GPU each launches a kernel or more, and a host-bound step's speed follows their number.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kdlib.bench.measure import same_bits
from kdlib.quant import dorefa_weight, dorefa_weights
from kdlib.quant.grouped import set_weight_grouping

CHECK_BITS = (1, 2, 4, 8, 16)
# ResNet-20's quantized convs, one of each size (16, 32 and 64 channels, and the stage changes)
CHECK_SHAPES = ((16, 16, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3))
PAIR = ("kd_w4", "kd_w4_per_layer")


def check_weights(device: str | torch.device, bits: Sequence[int] = CHECK_BITS) -> dict[str, Any]:
    """``{"exact": bool, "by_bits": {k: {"values": bool, "gradients": bool}}}``: grouped against
    per-layer DoReFa weights on ``device``, raw bits. The weights include a layer whose maximum
    is tied (the gradient split between the maxima) and a layer of zeros."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    by_bits: dict[str, dict[str, bool]] = {}
    for b in bits:
        values = gradients = True
        for fmt in (torch.contiguous_format, torch.channels_last):
            base = [torch.randn(s, generator=gen) * 0.1 for s in CHECK_SHAPES]
            base[1].view(-1)[:3] = base[1].abs().max()  # three tied maxima
            base.append(torch.zeros(CHECK_SHAPES[0]))
            # output gradients in the weights' layout, as a convolution's backward gives them
            upstream = [torch.randn(w.shape, generator=gen).to(device, memory_format=fmt)
                        for w in base]
            grouped = [w.to(device, memory_format=fmt).requires_grad_() for w in base]
            single = [w.detach().clone().requires_grad_() for w in grouped]
            q_grouped = dorefa_weights(grouped, b)
            q_single = [dorefa_weight(w, b) for w in single]
            torch.autograd.backward(q_grouped, upstream)
            torch.autograd.backward(q_single, upstream)
            values &= all(same_bits(x, y) for x, y in zip(q_grouped, q_single))
            gradients &= all(same_bits(x.grad, y.grad) for x, y in zip(grouped, single))
        by_bits[str(b)] = {"values": values, "gradients": gradients}
    return {"exact": all(e["values"] and e["gradients"] for e in by_bits.values()),
            "by_bits": by_bits}


def per_layer_runner(ctx):
    """fit()'s KD 4-bit step (``kd_w4``) with the student's weights quantized layer by layer."""
    from kdlib.bench.variants import BY_NAME

    runner = BY_NAME["kd_w4"].build(ctx)
    for model in (runner.trainer.model, runner.trainer.teacher):
        if model is not None:
            set_weight_grouping(model, False)
    runner.info["switches"] = {**runner.info["switches"], "grouped_weights": False}
    return runner


def measure_grouped(ctx, *, windows: int, steps: int, warmup: int,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """The ``grouped`` part of a benchmark (module docstring); a part that raised is
    ``{"error": ...}`` in its place."""
    from kdlib.bench.measure import count_ops, error_entry, measure, summarise
    from kdlib.bench.variants import BY_NAME

    out: dict[str, Any] = {}
    log("bench: weights quantized together, checked against per layer")
    try:
        out["check"] = check_weights(ctx.device)
    except Exception as exc:  # noqa: BLE001 - recorded
        out["check"] = error_entry(exc)
    builders = {PAIR[0]: BY_NAME[PAIR[0]].build, PAIR[1]: per_layer_runner}
    runners = {}
    try:
        for name, build in builders.items():
            runners[name] = build(ctx)
        out["ops_per_step"] = {name: count_ops(r.step) for name, r in runners.items()}
        log(f"bench: {' and '.join(PAIR)} interleaved")
        times = measure(runners, windows=windows, steps=steps, warmup=warmup, device=ctx.device,
                        log=log)
        out["steps"] = {name: (times[name] if "error" in times[name] else
                               summarise(times[name]["wall"], steps, runners[name].batch_size))
                        for name in runners}
    except Exception as exc:  # noqa: BLE001 - recorded
        out["steps"] = error_entry(exc)
    finally:
        for runner in runners.values():
            runner.close()
    return out
