"""DoReFa weights of many layers quantized at once: the same bits, a fraction of the kernels.

Quantizing one layer's weights is a dozen small kernels forward (tanh, max, divisions,
rounding) and their gradients backward; for ResNet-20's 18 quantized convs that makes a KD step
dispatch 1,136 operators instead of 652 (the grouped part of
``results/bench/vm-AMD_EPYC_family_26_model_2.json``, counted on a CPU), and on a GPU, where
that step is bound by launching kernels (1,134 launches a step on the H200, busy 10% of the
time), each operator is a launch. Here the weights of every layer at
one bit width are laid end to end in one flat tensor, each in its own memory order, and
quantized by whole-tensor kernels, a per-layer index standing in for the per-layer maximum and
scale.

What is computed does not change, bit for bit: each element goes through the same float32
operations as :func:`kdlib.quant.ste.dorefa_weight` and its autograd gradient (the formulas of
PyTorch's ``derivatives.yaml`` for tanh, abs, amax, clamp_min and div, written out in
:class:`_GroupedDoReFaWeight.backward`), and the two order-dependent reductions (the 1-bit
mean and the gradient of the per-layer maximum, a sum) are still one ``sum``/``mean`` per layer
over the layer's elements in memory order. That order is the per-layer code's when the
gradient arriving at a quantized weight has the weight's layout, as a convolution's backward
gives it; with another layout the per-layer code sums that one term in another order, and it
may differ in its last bits. ``tests/test_quant_grouped.py`` compares values and gradients with
the per-layer quantizer on raw bits (and through whole models); the benchmark's check repeats
that on the GPU it runs on.

:func:`quantize_weights_together` hands each DoReFa layer that would quantize afresh its share
of the grouped result for the duration of one forward; the models' ``forward`` runs in it
(:func:`weights_quantized_together`). Compiled graphs keep quantizing per layer (Inductor fuses
those kernels itself, and their levels are the ones the benchmark checked).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from kdlib.quant.ste import _div_levels_, grid_levels

MIN_GROUP = 2  # a single layer gains nothing from the flat layout
_SEGMENTS: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}


# ----------------------------------------------------------------------------- flat layout
def flat_view(t: Tensor) -> Tensor | None:
    """``t``'s elements as a 1-D view in memory order (contiguous or channels_last), else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC is contiguous
    return None


def _segments(device: torch.device, sizes: tuple[int, ...]) -> Tensor:
    """int64 [sum(sizes)]: the layer each flat element belongs to (cached per device and sizes)."""
    key = (device, sizes)
    seg = _SEGMENTS.get(key)
    if seg is None:
        # a normal tensor even when first built for a teacher under inference_mode: a student's
        # backward saves it later, which an inference tensor refuses
        with torch.inference_mode(False):
            counts = torch.tensor(sizes, dtype=torch.int64)
            seg = _SEGMENTS[key] = torch.repeat_interleave(
                torch.arange(len(sizes)), counts).to(device)
    return seg


def _per_layer(values: Tensor, sizes: Sequence[int], reduce: str) -> Tensor:
    """One ``sum``/``mean`` per layer of a flat tensor, stacked: the order-dependent reductions
    run as the per-layer code runs them (one whole-tensor reduction over its elements)."""
    return torch.stack([getattr(part, reduce)() for part in values.split(list(sizes))])


# ----------------------------------------------------------------------------- the op
class _GroupedDoReFaWeight(torch.autograd.Function):
    """``dorefa_weight(w_i, bits)`` for every ``w_i``, on one flat float32 tensor."""

    @staticmethod
    def forward(ctx, bits: int, *weights: Tensor) -> tuple[Tensor, ...]:  # noqa: D102
        sizes = tuple(w.numel() for w in weights)
        flat = torch.cat([flat_view(w) for w in weights])
        seg = _segments(flat.device, sizes)
        ctx.sizes, ctx.bits, ctx.device = sizes, bits, flat.device
        ctx.layouts = [(w.shape, w.stride()) for w in weights]
        if bits == 1:  # sign(w) E|w|: the scale per layer, the gradient the identity
            scale = _per_layer(flat.abs(), sizes, "mean").index_select(0, seg)
            q = torch.where(flat >= 0, scale, -scale) + (flat - flat)  # + 0, as dorefa_weight
        else:
            n = grid_levels(bits)
            t = torch.tanh(flat)
            a = t.abs()
            m = torch.zeros(len(sizes), dtype=t.dtype, device=t.device).scatter_reduce_(
                0, seg, a, "amax")  # max|tanh w| per layer (exact: a maximum)
            is_max = a == m.index_select(0, seg)  # where amax's gradient goes
            mc = m.clamp_min(torch.finfo(torch.float32).tiny)
            d = (mc * 2).index_select(0, seg)
            q = _div_levels_((t / d + 0.5).mul_(n).round_(), n).mul_(2).sub_(1)
            ctx.save_for_backward(t, is_max, m, d, seg)
        return tuple(_unflatten(q, ctx.layouts))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):  # noqa: D102
        sizes = ctx.sizes
        g = torch.cat([_flat_grad(gr, layout, ctx.device)
                       for gr, layout in zip(grads, ctx.layouts)])
        if ctx.bits == 1:
            g_w = g  # d(binary + (w - w.detach()))/dw = 1
        else:
            t, is_max, m, d, seg = ctx.saved_tensors
            g1 = g * 2  # q = 2 r - 1; r = round(u) straight-through; u = t / d + 1/2
            g_t = g1 / d  # div: self
            g_d = _per_layer(-g1 * ((t / d) / d), sizes, "sum")  # div: other, summed per layer
            g_mc = g_d * 2  # d = 2 mc
            g_m = torch.where(m > torch.finfo(torch.float32).tiny, g_mc,
                              torch.scalar_tensor(0.0, dtype=g_mc.dtype, device=g_mc.device))
            # amax: the gradient split evenly between the maxima (counted exactly, as integers)
            count = torch.zeros(len(sizes), dtype=torch.int64, device=g.device).index_add_(
                0, seg, is_max.to(torch.int64))
            g_a = (g_m / count).index_select(0, seg) * is_max
            g_t = g_t + g_a * t.sgn()  # abs; the two paths into t summed
            g_w = torch.ops.aten.tanh_backward(g_t, t)
        return (None, *_unflatten(g_w, ctx.layouts))


def _unflatten(flat: Tensor, layouts) -> list[Tensor]:
    """Views of ``flat``, one per (shape, stride) in turn: the inverse of the concatenation."""
    sizes = [shape.numel() for shape, _ in layouts]
    return [part.as_strided(shape, stride)
            for part, (shape, stride) in zip(flat.split(sizes), layouts)]


def _flat_grad(grad: Tensor | None, layout, device: torch.device) -> Tensor:
    """A layer's output gradient as 1-D in its weight's memory order (the order of the flat
    weights); zeros for a layer whose result was not used."""
    shape, stride = layout
    if grad is None:
        return torch.zeros(shape.numel(), device=device)
    if grad.stride() != stride:  # another layout than the weight's: copy it into that one
        grad = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)
    return flat_view(grad)


# ----------------------------------------------------------------------------- public
def dorefa_weights(weights: Sequence[Tensor], bits: int) -> list[Tensor]:
    """``[dorefa_weight(w, bits) for w in weights]``, bit for bit, values and gradients, in a
    fixed number of kernels (plus one reduction per layer). Every weight float32, on one
    device, contiguous or channels_last (:func:`groupable`); ``bits`` in 1..16."""
    if not weights:
        return []
    bad = [i for i, w in enumerate(weights) if not groupable(w) or w.device != weights[0].device]
    if bad:
        raise ValueError(f"weights {bad} cannot be grouped: each must be a float32 tensor, "
                         "contiguous or channels_last, on the first one's device")
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} out of range: grouped DoReFa weights take 1..16 bits")
    return list(_GroupedDoReFaWeight.apply(bits, *weights))


def groupable(w: Tensor) -> bool:
    """Whether :func:`dorefa_weights` takes ``w``: float32, laid out densely in a known order."""
    return w.dtype == torch.float32 and flat_view(w) is not None


def set_weight_grouping(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn grouped weight quantization on (default) or off for ``model``'s forward. Returns it."""
    model._group_quantized_weights = bool(enabled)
    return model


@contextlib.contextmanager
def quantize_weights_together(model: nn.Module) -> Iterator[None]:
    """For one forward of ``model``: the DoReFa layers that would quantize their weights afresh
    get them from one grouped computation per bit width (:func:`dorefa_weights`)."""
    from kdlib.quant.layers import quantized_layers

    if not getattr(model, "_group_quantized_weights", True):
        yield
        return
    groups: dict[tuple[int, torch.device], list] = {}
    for _, layer in quantized_layers(model):
        if layer.quantizes_weight_afresh() and groupable(layer.weight):
            groups.setdefault((layer.w_bits, layer.weight.device), []).append(layer)
    handed = []
    try:
        for (bits, _), members in groups.items():
            if len(members) >= MIN_GROUP:
                for layer, q in zip(members, dorefa_weights([m.weight for m in members], bits)):
                    layer.pass_weight = q
                    handed.append(layer)
        yield
    finally:
        for layer in handed:
            layer.pass_weight = None


def weights_quantized_together(forward: Callable[[nn.Module, Tensor], Tensor]
                               ) -> Callable[[nn.Module, Tensor], Tensor]:
    """A model's ``forward`` run inside :func:`quantize_weights_together`, in eager mode only:
    a compiled graph quantizes per layer (Inductor fuses those kernels itself, and its levels
    are the ones the benchmark checked)."""
    @functools.wraps(forward)
    def wrapped(model: nn.Module, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return forward(model, x)
        with quantize_weights_together(model):
            return forward(model, x)

    return wrapped
