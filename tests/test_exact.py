"""Quantized layers compute the exact quantized result, whatever autocast the caller sets.

Reference: a float64 convolution (or matmul) of the very fp32 operands the layer quantized.
An fp32 computation of a K-term dot product is within ``K * 2^-24 * sum |x_i w_i|`` of it (the
classic gamma_K bound, with room for blocked and reordered sums); the bf16 mode adds the
rounding of the convolution's bf16 output, ``2^-8`` relative.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlib.export.codes import encode_weight
from kdlib.quant import QConv2d, QLinear, dorefa_activation, set_precision
from kdlib.quant.ste import _RoundSTE

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BITS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
QUANTIZERS = ["dorefa", "pact", "lsq"]
FP32_UNIT = 2.0 ** -24
BF16_OUTPUT = 2.0 ** -8


def _layer(kind: str, bits: int, quantizer: str, device: str):
    torch.manual_seed(bits)
    if kind == "conv":
        layer = QConv2d(16, 8, 3, padding=1, bias=True, w_bits=bits, a_bits=bits,
                        quantizer=quantizer)
        x = torch.relu(torch.randn(4, 16, 8, 8)) * 0.7  # post-ReLU, some above the clip at 1
    else:
        layer = QLinear(64, 10, w_bits=bits, a_bits=bits, quantizer=quantizer)
        x = torch.relu(torch.randn(8, 64)) * 0.7
    layer, x = layer.to(device), x.to(device)
    layer(x)  # LSQ sets its steps from the first batch
    return layer, x


def _reference(layer, x):
    """(float64 result of the layer's own quantized operands, fp32 error budget per element)."""
    with torch.no_grad():
        xq = layer.input_quantizer(x.float()).double()
        wq = layer.quantized_weight().double()
        bias = layer.bias.double() if layer.bias is not None else None
        if isinstance(layer, QConv2d):
            ref = F.conv2d(xq, wq, bias, layer.stride, layer.padding)
            magnitude = F.conv2d(xq.abs(), wq.abs(), None, layer.stride, layer.padding)
            terms = wq[0].numel()
        else:
            ref = F.linear(xq, wq, bias)
            magnitude = F.linear(xq.abs(), wq.abs())
            terms = wq.shape[1]
    return ref, (terms + 2) * FP32_UNIT * magnitude + 1e-30


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("under_autocast", [False, True])
def test_exact_mode_equals_float64_reference(device, kind, quantizer, bits, under_autocast):
    layer, x = _layer(kind, bits, quantizer, device)
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16,
                                         enabled=under_autocast):
        out = layer(x)
    assert out.dtype == torch.float32
    ref, budget = _reference(layer, x)
    err = (out.double() - ref).abs()
    assert bool((err <= budget).all()), f"max error / budget {float((err / budget).max()):.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("bits", BITS)
def test_bf16_mode_error_is_bounded_and_16_bit_layers_stay_exact(device, quantizer, bits):
    layer, x = _layer("conv", bits, quantizer, device)
    set_precision(layer, "bf16")
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = layer(x)
    ref, budget = _reference(layer, x)
    err = (out.double() - ref).abs()
    if bits <= 8:  # integer codes as bf16 operands, the sum (bias not yet added) rounded once
        bias = layer.bias.double().view(1, -1, 1, 1)
        budget = budget + BF16_OUTPUT * (ref - bias).abs()
    assert bool((err <= budget).all()), f"max error / budget {float((err / budget).max()):.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_16_bit_activations_keep_all_their_levels_under_autocast(device):
    layer = QConv2d(1, 1, 1, bias=False, w_bits=16, a_bits=16).to(device)
    seen = {}
    layer.input_quantizer.register_forward_hook(lambda m, i, o: seen.update(q=o))
    x = torch.linspace(0, 1, 4 * 65536, device=device).reshape(1, 1, -1, 1)
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = layer(x)
    assert seen["q"].dtype == torch.float32
    assert seen["q"].unique().numel() == 65536  # every level of the 16-bit grid
    assert out.unique().numel() == 65536  # and the output still tells them apart


def test_gradients_are_fp32_and_match_outside_autocast():
    layer, x = _layer("conv", 4, "dorefa", "cpu")
    x = x.clone().requires_grad_(True)
    layer(x).square().sum().backward()
    plain = (x.grad.clone(), layer.weight.grad.clone())
    x.grad, layer.weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.square().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert torch.equal(x.grad, plain[0]) and torch.equal(layer.weight.grad, plain[1])


def test_bf16_mode_gradient_is_the_straight_through_one():
    """The codes path (q / scale, rounded, times scale) passes the same straight-through
    gradient as the exact path, up to the bf16 rounding of the convolutions."""
    layer, x = _layer("conv", 4, "dorefa", "cpu")
    x = x.clone().requires_grad_(True)
    layer(x).sum().backward()
    exact = layer.weight.grad.clone()
    layer.weight.grad = None
    set_precision(layer, "bf16")
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, exact, rtol=2e-2,
                               atol=2e-2 * float(exact.abs().max()))


def test_set_precision_rejects_unknown_modes():
    with pytest.raises(ValueError, match="precision='fp8' is unknown; accepted: exact, bf16"):
        set_precision(QConv2d(1, 1, 1), "fp8")


@pytest.mark.parametrize("name", ["resnet20", "squeezenet"])
@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_a_model_cast_to_16_bit_floats_is_refused_at_its_quantized_layers(name, cast):
    """Cast whole, a quantized model's latent weights would lose the fp32 its levels and
    updates need (and its layers used to fail with "mixed dtype"): the first quantized layer
    names the bf16 mode instead. A 32-bit model (a teacher) has none and runs cast."""
    from kdlib.models import create_model

    x = torch.rand(2, 3, 32, 32)
    dtype = getattr(torch.tensor(0.0), cast)().dtype
    teacher = getattr(create_model(name, w_bits=32, a_bits=32).eval(), cast)()
    assert teacher(x.to(dtype)).dtype == dtype
    student = getattr(create_model(name, w_bits=4, a_bits=4).eval(), cast)()
    with pytest.raises(TypeError, match=rf"weights are {dtype}: they stay fp32 .* for bf16 "
                                        r"arithmetic use precision='bf16'"):
        student(x.to(dtype))
    fp32 = create_model(name, w_bits=4, a_bits=4).eval()  # uncast: unchanged
    assert fp32(x).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 16])
def test_every_grid_value_is_the_correctly_rounded_k_over_n(device, bits):
    """On CUDA, ``tensor / n`` with a Python n multiplies by 1/n: one ulp off for some k; the
    quantizers must give float32(k / n) exactly, the value the packed export rebuilds."""
    n = (1 << bits) - 1
    k = torch.arange(n + 1, dtype=torch.float64)
    expected = (k / n).float()
    x = ((k + 0.2) / n).clamp(max=1.0).float().to(device)  # rounds to level k
    assert torch.equal(dorefa_activation(x, bits).cpu(), expected)
    assert torch.equal(_RoundSTE.apply(x, n).cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_a_layer_quantized_on_any_device_exports_its_exact_levels(device, bits):
    torch.manual_seed(bits)
    layer = QConv2d(32, 64, 3, w_bits=bits, a_bits=bits, quantizer="dorefa").to(device)
    codes = encode_weight("conv", layer)  # raises unless the levels rebuild the weight bit for bit
    assert codes.levels.min() >= 0 and codes.levels.max() <= (1 << bits) - 1


@pytest.mark.parametrize("bits", range(2, 17))
def test_a_float64_quotient_rounds_to_the_exact_level_whatever_division_a_compiler_emits(bits):
    """The compiled route (``_div_levels_`` under torch.compile): divide in float64, round once
    to float32. Checked for every k against the rational k/n, for the divisions a compiler may
    emit: a correctly rounded one, a multiply by the reciprocal, and one 2 ulps off either way."""
    from fractions import Fraction

    import numpy as np

    n = (1 << bits) - 1
    k = np.arange(n + 1, dtype=np.float64)
    level = (k / n).astype(np.float32)
    below = np.nextafter(level, np.float32(-1))
    above = np.nextafter(level, np.float32(2))
    for i in range(n + 1):  # level[i] is the nearest float32 to i/n, strictly
        exact = Fraction(i, n)
        error = abs(Fraction(float(level[i])) - exact)
        assert error < abs(Fraction(float(below[i])) - exact)
        assert error < abs(Fraction(float(above[i])) - exact)
    quotient = k / n
    two_up = np.nextafter(np.nextafter(quotient, 2.0), 2.0)
    two_down = np.nextafter(np.nextafter(quotient, -1.0), -1.0)
    for emitted in (k * (1.0 / n), two_up, two_down):
        assert np.array_equal(emitted.astype(np.float32), level)
    if bits >= 4:  # why the route exists: in float32, the reciprocal misses some levels
        reciprocal32 = k.astype(np.float32) * np.float32(1.0 / n)
        assert not np.array_equal(reciprocal32, level)


def test_compiled_graphs_take_the_float64_route_and_eager_does_not(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.seen.add(out.dtype)
            return out

    x = torch.rand(64)
    with Dtypes() as eager:
        eager_levels = dorefa_activation(x, 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with Dtypes() as compiled:
        compiled_levels = dorefa_activation(x, 4)
    assert torch.float64 not in eager.seen and torch.float64 in compiled.seen
    assert compiled_levels.dtype == torch.float32 and torch.equal(compiled_levels, eager_levels)


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_mode_rounds_the_code_sums_to_bf16(bits):
    """bf16 mode really convolves the codes in bf16: in code units (output / (sx * sw)) every
    output is a bf16 number (up to the fp32 rounding of the scaling); the exact sums (144 terms
    of 4- or 8-bit codes) are not all bf16 numbers."""
    torch.manual_seed(bits)
    layer = QConv2d(16, 8, 3, padding=1, bias=False, w_bits=bits, a_bits=bits)
    x = torch.relu(torch.randn(4, 16, 8, 8)) * 0.7

    def off_bf16_grid(t):  # relative distance to the nearest bf16 number
        return (t - t.bfloat16().float()).abs() / t.abs().clamp_min(1.0)

    with torch.no_grad():
        _, sx = layer.input_quantizer.codes(x)
        sw = layer.weight_quantizer.scale(layer.quantized_weight())
        exact = layer(x) / (sx * sw)
        set_precision(layer, "bf16")
        sums = layer(x) / (sx * sw)
    assert float(off_bf16_grid(sums).max()) < 1e-5
    assert float(off_bf16_grid(exact).max()) > 1e-4


@pytest.mark.parametrize("w_bits,a_bits,quantize_input", [
    (32, 4, True), (4, 32, True), (4, 4, False), (4, 16, True), (16, 4, True)])
def test_bf16_mode_computes_in_fp32_unless_weights_and_inputs_are_both_8_bit_grids(
        w_bits, a_bits, quantize_input):
    """The bf16 mode's bf16 operands are exact only for two grids of <= 8 bits; any other
    quantized layer (a full-precision side, a 16-bit side, the first conv's raw image) computes
    as in the exact mode, bit for bit."""
    torch.manual_seed(w_bits + a_bits)
    layer = QConv2d(16, 8, 3, padding=1, bias=True, w_bits=w_bits, a_bits=a_bits,
                    quantize_input=quantize_input)
    x = torch.relu(torch.randn(4, 16, 8, 8)) * 0.7
    with torch.no_grad():
        exact = layer(x)
        set_precision(layer, "bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(x), exact)
