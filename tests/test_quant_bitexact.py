"""DoReFa values and gradients, bit for bit: the contract any faster implementation must keep.

Runs of the quick preset's grid must stay reproducible, so a cheaper quantizer (fused ops, a
hand-written backward, in-place tricks) must change no bit of a forward value or a gradient.
The reference below is the textbook DoReFa written with plain torch ops, the round made
straight-through with ``detach``; autograd differentiates it. Every comparison is on the raw
bits (``torch.equal`` on an int32 view, so even the sign of a zero must agree), for NCHW and
channels_last tensors and bits 1, 2, 4, 8, 16.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlib.quant import QConv2d, dorefa_activation, dorefa_weight

BITS = [1, 2, 4, 8, 16]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


# ============================================================================ reference
def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value ``q`` exactly (``x - x.detach()`` is +0), gradient of the identity into ``x``."""
    return (x - x.detach()) + q


def ref_weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa eq. 9: 2 quantize_k(tanh w / (2 max|tanh w|) + 1/2) - 1; 1 bit: sign(w) E|w|."""
    if k == 1:
        scale = w.detach().abs().mean()
        return straight_through(w, torch.where(w.detach() >= 0, scale, -scale))
    n = 2 ** k - 1
    t = torch.tanh(w)
    u = t / (2 * t.abs().amax()) + 0.5
    return 2 * straight_through(u, torch.round(u.detach() * n) / n) - 1


def ref_activation(x: torch.Tensor, k: int) -> torch.Tensor:
    """quantize_k(clip(x, 0, 1)); the clip passes the gradient on the open interval 0 < x < 1."""
    n = 2 ** k - 1
    c = F.hardtanh(x, 0.0, 1.0)
    return straight_through(c, torch.round(c.detach() * n) / n)


def ref_conv(layer: QConv2d, x: torch.Tensor, w: torch.Tensor,
             b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(ref_activation(x, layer.a_bits), ref_weight(w, layer.w_bits), b, layer.stride,
                    layer.padding)


# ============================================================================ helpers
def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def post_relu(shape, fmt, seed: int) -> torch.Tensor:
    """A post-ReLU activation: exact 0s and 1s (the clip's end points), values above the clip and
    exact 0.5 (a rounding tie at 1 bit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.7
    x = torch.where(x > 0, x, 0.0)  # +0, as a ReLU gives
    flat = x.view(-1)
    flat[::17] = 1.0
    flat[5::23] = 0.5  # a tie at 1 bit
    return x.to(memory_format=fmt)


def make_layer(bits: int, fmt, *, bias: bool = False, stride: int = 1, channels=(6, 5)) -> QConv2d:
    torch.manual_seed(bits)
    layer = QConv2d(*channels, 3, stride=stride, padding=1, bias=bias, w_bits=bits, a_bits=bits)
    return layer.to(memory_format=fmt)


def forward_and_backward_agree(fn, ref, x0, up):
    """fn and ref on copies of x0, backpropagating ``up``: outputs and input gradients must be
    equal bit for bit; returns fn's input gradient."""
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out, expected = fn(x1), ref(x2)
    (out * up).sum().backward()
    (expected * up).sum().backward()
    assert same_bits(out.detach(), expected.detach())
    assert same_bits(x1.grad, x2.grad)
    return x1.grad


# ============================================================================ quantizer functions
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_dorefa_weight_and_gradient_equal_the_reference_bit_for_bit(bits, fmt):
    g = torch.Generator().manual_seed(bits)
    w0 = (torch.randn(8, 6, 3, 3, generator=g) * 0.2).to(memory_format=FORMATS[fmt])
    up = torch.randn(8, 6, 3, 3, generator=g).to(memory_format=FORMATS[fmt])
    grad = forward_and_backward_agree(lambda w: dorefa_weight(w, bits),
                                      lambda w: ref_weight(w, bits), w0, up)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_dorefa_activation_and_gradient_equal_the_reference_bit_for_bit(bits, fmt):
    x0 = post_relu((4, 6, 5, 5), FORMATS[fmt], seed=bits)
    up = torch.randn(4, 6, 5, 5).to(memory_format=FORMATS[fmt])
    grad = forward_and_backward_agree(lambda x: dorefa_activation(x, bits),
                                      lambda x: ref_activation(x, bits), x0, up)
    assert bool((grad[(x0 <= 0) | (x0 >= 1)] == 0).all())  # the clip, open interval


# ============================================================================ QConv2d training step
@pytest.mark.parametrize("needs", ["input+weight", "weight only", "input only"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_qconv_output_and_gradients_equal_the_reference_bit_for_bit(bits, fmt, needs):
    layer = make_layer(bits, FORMATS[fmt])
    x0 = post_relu((3, 6, 7, 7), FORMATS[fmt], seed=100 + bits)
    w0 = layer.weight.detach().clone()
    x = x0.clone().requires_grad_(needs != "weight only")
    layer.weight.requires_grad_(needs != "input only")
    xr, wr = (x0.clone().requires_grad_(x.requires_grad),
              w0.clone().requires_grad_(layer.weight.requires_grad))

    out = layer(x)
    ref = ref_conv(layer, xr, wr, None)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(bits)).to(
        memory_format=FORMATS[fmt])
    (out * up).sum().backward()
    (ref * up).sum().backward()
    assert same_bits(out.detach(), ref.detach())
    assert same_bits(x.grad, xr.grad)
    assert same_bits(layer.weight.grad, wr.grad)
    if x.grad is not None:
        assert bool((x.grad[(x0 <= 0) | (x0 >= 1)] == 0).all()) and x.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_qconv_with_bias_and_stride_equals_the_reference_bit_for_bit(fmt):
    layer = make_layer(4, FORMATS[fmt], bias=True, stride=2)
    x0 = post_relu((2, 6, 9, 9), FORMATS[fmt], seed=7)
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    wr, br = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    out, ref = layer(x), ref_conv(layer, xr, wr, br)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in ((out, ref), (x.grad, xr.grad), (layer.weight.grad, wr.grad),
                 (layer.bias.grad, br.grad)):
        assert same_bits(a.detach(), b.detach())


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradient_of_an_input_shared_with_a_shortcut_is_not_overwritten(fmt):
    """The block input feeds the quantized conv and the shortcut: their gradients must add up as
    for the reference (a backward that reused a gradient buffer in place could break this)."""
    layer, layer2 = make_layer(2, FORMATS[fmt]), make_layer(2, FORMATS[fmt], channels=(5, 5))
    bn = nn.BatchNorm2d(5).to(memory_format=FORMATS[fmt])
    x0 = post_relu((2, 6, 6, 6), FORMATS[fmt], seed=3)

    def block(x, conv1, conv2):  # a ResNet basic block with a slicing shortcut
        h = F.relu(bn(conv1(x)), inplace=True)
        return F.relu(bn(conv2(h)) + x[:, :5], inplace=True)

    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out = block(x, layer, layer2)
    w1, w2 = (l.weight.detach().clone().requires_grad_() for l in (layer, layer2))
    ref = block(xr, lambda t: ref_conv(layer, t, w1, None), lambda t: ref_conv(layer2, t, w2, None))
    out.sum().backward()
    ref.sum().backward()
    assert same_bits(out.detach(), ref.detach())
    assert same_bits(x.grad, xr.grad)
    assert same_bits(layer.weight.grad, w1.grad) and same_bits(layer2.weight.grad, w2.grad)
