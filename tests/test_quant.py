"""Quantizers and quantized layers, checked against independent NumPy formulas.

The reference implementations below are written from the papers' equations, in NumPy, without
looking at kdlib.quant: DoReFa (Zhou et al. 2016), PACT (Choi et al. 2018), LSQ (Esser et al.
2020). Rounding everywhere is round-half-to-even (numpy.round == torch.round).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from kdlib.quant import (QConv2d, QLinear, dorefa_activation, dorefa_weight,
                         freeze_quantized_weights, lsq_quantize, make_quantizers, model_size_report,
                         pact_activation, quantize_k, transfer_weights, unfreeze_quantized_weights)
from kdlib.quant import LSQQuantizer, PACTActivationQuantizer

BITS = range(1, 9)
BAD_BITS = [0, -1, 33, 17, 2.5, "four", True, None]




# ============================================================================ NumPy references
def np_quantize_k(x: np.ndarray, k: int) -> np.ndarray:
    """round((2^k - 1) x) / (2^k - 1), in float32 like the tested code."""
    n = np.float32(2 ** k - 1)
    return (np.round(x.astype(np.float32) * n) / n).astype(np.float32)


def np_dorefa_activation(x: np.ndarray, k: int) -> np.ndarray:
    return np_quantize_k(np.clip(x.astype(np.float32), np.float32(0), np.float32(1)), k)


def np_dorefa_weight_levels(w: np.ndarray, k: int) -> np.ndarray:
    """Integer level j in 0..2^k-1 of each DoReFa k-bit weight (value 2 j / (2^k - 1) - 1),
    float64."""
    t = np.tanh(w.astype(np.float64))
    u = t / (2 * np.abs(t).max()) + 0.5
    return np.round(u * (2 ** k - 1))


def np_dorefa_weight_1bit(w: np.ndarray) -> np.ndarray:
    w = w.astype(np.float64)
    return np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean()


def np_lsq(x: np.ndarray, s: float, qn: int, qp: int) -> np.ndarray:
    return np.round(np.clip(x / s, -qn, qp)) * s


def np_lsq_step_grad(x: np.ndarray, s: float, qn: int, qp: int, upstream: np.ndarray,
                     g: float) -> float:
    """LSQ eq. (3) times the gradient scale g: dL/ds = g * sum(upstream * dq/ds)."""
    v = x.astype(np.float64) / s
    dq_ds = np.where(v <= -qn, -qn, np.where(v >= qp, qp, np.round(v) - v))
    return float(g * np.sum(upstream * dq_ds))


def away_from_ties(scaled: np.ndarray, margin: float = 1e-4) -> bool:
    """True if no value is within ``margin`` of a rounding tie (x.5).

    Float32 tanh can differ from float64 (or from another CPU's libm) by an ulp; only a value
    right at a tie could then round differently. Tests pick inputs where that cannot happen.
    """
    frac = np.abs(scaled - np.floor(scaled) - 0.5)
    return bool(frac.min() > margin)


def tie_free_sample(draw, pre_round, tries: int = 1000) -> np.ndarray:
    """First sample ``draw(rng)`` (seeds 0, 1, ...) whose ``pre_round(sample)`` avoids ties."""
    for seed in range(tries):
        x = draw(np.random.default_rng(seed)).astype(np.float32)
        if away_from_ties(pre_round(x.astype(np.float64))):
            return x
    raise AssertionError("no tie-free sample found")


def weight_sample(k: int, size: int = 600) -> np.ndarray:
    """Gaussian weights whose DoReFa k-bit pre-round values are all away from ties."""
    def pre_round(w):
        t = np.tanh(w)
        return (t / (2 * np.abs(t).max()) + 0.5) * (2 ** k - 1)
    return tie_free_sample(lambda rng: rng.normal(0, 0.5, size), pre_round)


def dense(low: float, high: float, count: int = 20001) -> torch.Tensor:
    return torch.linspace(low, high, count)


# ============================================================================ levels and ranges
@pytest.mark.parametrize("k", BITS)
def test_quantize_k_has_2_to_k_levels_in_unit_interval(k):
    q = quantize_k(dense(0, 1), k)
    levels = torch.unique(q)
    assert len(levels) == 2 ** k
    assert levels.min() == 0 and levels.max() == 1
    torch.testing.assert_close(levels, torch.arange(2 ** k, dtype=torch.float32) / (2 ** k - 1))


@pytest.mark.parametrize("k", BITS)
def test_dorefa_activation_levels_and_range(k):
    q = dorefa_activation(dense(-0.5, 1.5), k)
    assert len(torch.unique(q)) == 2 ** k
    assert q.min() == 0 and q.max() == 1


@pytest.mark.parametrize("k", BITS)
def test_dorefa_weight_levels_and_range(k):
    q = dorefa_weight(dense(-3, 3), k)
    levels = torch.unique(q)
    assert len(levels) == (2 if k == 1 else 2 ** k)
    if k > 1:
        assert levels.min() == -1 and levels.max() == 1
        # the k-bit grid 2j/(2^k-1) - 1, no zero level
        torch.testing.assert_close(levels,
                                   2 * torch.arange(2 ** k, dtype=torch.float32) / (2 ** k - 1) - 1)


def test_one_bit_activation_rounds_at_half_not_sign():
    x = torch.tensor([-1.0, 0.0, 0.2, 0.49, 0.5, 0.51, 0.9, 2.0])
    # 0.5 is a tie: round half to even gives 0
    assert dorefa_activation(x, 1).tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_bits_32_is_identity():
    x = torch.randn(50)
    for fn in (quantize_k, dorefa_weight, dorefa_activation):
        assert fn(x, 32) is x
    assert pact_activation(x, torch.tensor(1.0), 32) is x
    assert lsq_quantize(x, torch.tensor(0.1), 32, True, 1.0) is x


# ========================================================================== agreement with formulas
@pytest.mark.parametrize("k", list(BITS) + [12, 16])
def test_quantize_k_and_activation_match_numpy_exactly(k):
    x = np.random.default_rng(k).uniform(-0.5, 1.5, 5000).astype(np.float32)
    inside = np.clip(x, 0, 1)
    np.testing.assert_array_equal(quantize_k(torch.from_numpy(inside), k).numpy(),
                                  np_quantize_k(inside, k))
    np.testing.assert_array_equal(dorefa_activation(torch.from_numpy(x), k).numpy(),
                                  np_dorefa_activation(x, k))


@pytest.mark.parametrize("k", range(2, 9))
def test_dorefa_weight_matches_numpy(k):
    w = weight_sample(k)
    out = dorefa_weight(torch.from_numpy(w), k).numpy().astype(np.float64)
    n = 2 ** k - 1
    levels = np.round((out + 1) / 2 * n)
    np.testing.assert_array_equal(levels, np_dorefa_weight_levels(w, k))  # same level everywhere
    np.testing.assert_allclose(out, 2 * levels / n - 1, rtol=0, atol=1e-6)  # on the grid


def test_dorefa_weight_1bit_matches_numpy_and_sign_of_zero_is_plus():
    w = np.random.default_rng(0).normal(0, 0.1, 1000).astype(np.float32)
    w[:10] = 0.0
    out = dorefa_weight(torch.from_numpy(w), 1).numpy()
    np.testing.assert_allclose(out, np_dorefa_weight_1bit(w), rtol=1e-6)
    assert (out[:10] > 0).all()  # sign(0) = +1: zeros become +mean|w|
    assert len(np.unique(out)) == 2


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_all_zero_weight_tensor_is_finite(k):
    out = dorefa_weight(torch.zeros(3, 3), k)
    assert torch.isfinite(out).all()
    # 1 bit: sign(0) * mean|0| = 0; k bits: the grid has no zero, 0 maps to +1/(2^k - 1)
    expected = 0.0 if k == 1 else 1.0 / (2 ** k - 1)
    torch.testing.assert_close(out, torch.full((3, 3), expected))


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_pact_matches_formula(k):
    alpha, n = np.float32(5.5), 2 ** k - 1
    x = tie_free_sample(lambda rng: rng.uniform(-1, 8, 1000),
                        lambda x: np.clip(x, 0, alpha) * n / alpha)
    v = np.clip(x, 0, alpha).astype(np.float64) * n / alpha
    out = pact_activation(torch.from_numpy(x), torch.tensor(alpha), k).numpy()
    np.testing.assert_allclose(out, np.round(v) * alpha / n, rtol=0, atol=1e-5)
    assert len(np.unique(out)) <= 2 ** k


@pytest.mark.parametrize("k,signed", [(2, True), (3, True), (4, True), (8, True), (1, True),
                                      (1, False), (2, False), (4, False), (8, False)])
def test_lsq_matches_formula(k, signed):
    s = 0.37
    if signed and k == 1:
        qn = qp = 1
        x = np.random.default_rng(k).normal(0, 1, 1000).astype(np.float32)
        expected = np.where(x >= 0, 1.0, -1.0) * s
    else:
        qn, qp = (2 ** (k - 1), 2 ** (k - 1) - 1) if signed else (0, 2 ** k - 1)
        x = tie_free_sample(
            lambda rng: rng.normal(0, 1, 1000) if signed else rng.uniform(0, 3, 1000),
            lambda x: np.clip(x / s, -qn, qp))
        expected = np_lsq(x.astype(np.float64), s, qn, qp)
    out = lsq_quantize(torch.from_numpy(x), torch.tensor(s), k, signed, 1.0).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    assert out.min() >= -qn * s - 1e-6 and out.max() <= qp * s + 1e-6


def test_8bit_matches_torch_fake_quantize():
    """dorefa_activation at 8 bits == torch.fake_quantize_per_tensor_affine(scale 1/255, zp 0,
    0..255).

    Ties: both round half to even, but fake_quantize multiplies by a float32 reciprocal of the
    scale and returns level * scale (not level / 255), so an exact .5 tie can land on either
    side and values can differ by an ulp. Inputs are drawn away from ties and values compared
    to 1e-6; the levels must be identical. Gradients agree except within half a step outside
    [0, 1]: fake_quantize decides "inside" on the rounded level, DoReFa's clip on x itself.
    """
    x = torch.from_numpy(tie_free_sample(lambda rng: rng.uniform(-0.3, 1.3, 2000),
                                         lambda x: np.clip(x, 0, 1) * 255))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = dorefa_activation(x1, 8)
    ref = torch.fake_quantize_per_tensor_affine(x2, 1 / 255, 0, 0, 255)
    torch.testing.assert_close(torch.round(ours * 255), torch.round(ref * 255), rtol=0, atol=0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    upstream = torch.randn_like(x)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    clear = ((x > 0.5 / 255) & (x < 1 - 0.5 / 255)) | (x < -0.5 / 255) | (x > 1 + 0.5 / 255)
    assert clear.sum() > 1900
    torch.testing.assert_close(x1.grad[clear], x2.grad[clear], rtol=0, atol=0)


# ============================================================================ gradients
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_quantize_k_gradient_is_identity(k):
    x = torch.rand(100, requires_grad=True)
    up = torch.randn(100)
    (quantize_k(x, k) * up).sum().backward()
    assert torch.equal(x.grad, up)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_dorefa_activation_gradient_zero_outside_unit_interval(k):
    x = torch.tensor([-2.0, -0.3, 0.1, 0.4, 0.5, 0.77, 0.99, 1.01, 3.0], requires_grad=True)
    up = torch.arange(1.0, 10.0)
    (dorefa_activation(x, k) * up).sum().backward()
    inside = (x.detach() > 0) & (x.detach() < 1)
    assert torch.equal(x.grad, torch.where(inside, up, 0.0))


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_dorefa_weight_gradient_flows_through_tanh_and_max(k):
    """Straight-through round: d out / d w = d/dw [tanh(w) / max|tanh(w)|], written out by hand."""
    rng = np.random.default_rng(k)
    w_np, up_np = rng.normal(0, 0.5, 200), rng.normal(0, 1, 200)
    w = torch.tensor(w_np, dtype=torch.float32, requires_grad=True)
    (dorefa_weight(w, k) * torch.tensor(up_np, dtype=torch.float32)).sum().backward()
    t = np.tanh(w_np)
    m, i = np.abs(t).max(), np.abs(t).argmax()
    expected = up_np * (1 - t ** 2) / m
    expected[i] -= np.sign(t[i]) * (1 - t[i] ** 2) * np.sum(up_np * t) / m ** 2
    np.testing.assert_allclose(w.grad.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_dorefa_weight_1bit_gradient_is_identity():
    w = torch.randn(100, requires_grad=True)
    up = torch.randn(100)
    (dorefa_weight(w, 1) * up).sum().backward()
    assert torch.equal(w.grad, up)


@pytest.mark.parametrize("k", [2, 4])
def test_pact_gradients(k):
    x = torch.tensor([-1.0, 0.5, 1.0, 2.9, 3.0, 3.5, 9.0], requires_grad=True)
    alpha = torch.tensor(3.0, requires_grad=True)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    (pact_activation(x, alpha, k) * up).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]))  # 0 < x < alpha
    assert alpha.grad.item() == 5.0 + 6.0 + 7.0  # x >= alpha


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_pact_clip_gradients_split_at_alpha_itself_for_any_alpha(k):
    """dy/dx = 1 for 0 < x < alpha, dy/dalpha = 1 for x >= alpha, to the last float and decided
    on x and alpha themselves: the rounded product x * (n / alpha) lands a float the other side
    of n for x at or next to alpha for about one alpha in four of these (2^k - 1 among them,
    where that product is exact), and must not move the split."""
    alphas = [*np.linspace(0.1, 10, 150, dtype=np.float32), np.float32(2 ** k - 1)]
    for alpha_value in alphas:
        below = np.nextafter(alpha_value, np.float32(0))
        above = np.nextafter(alpha_value, np.float32(np.inf))
        x = torch.tensor(np.array([below, alpha_value, above]), requires_grad=True)
        alpha = torch.tensor(alpha_value, requires_grad=True)
        (pact_activation(x, alpha, k) * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
        assert x.grad.tolist() == [1.0, 0.0, 0.0], alpha_value
        assert alpha.grad.item() == 110.0, alpha_value


@pytest.mark.parametrize("k,signed",
                         [(2, True), (4, True), (8, True), (1, True), (2, False), (4, False)])
def test_lsq_gradients_match_formula(k, signed):
    rng = np.random.default_rng(10 + k)
    x_np = rng.normal(0, 1, 2000) if signed else rng.uniform(0, 3, 2000)
    up_np = rng.normal(0, 1, 2000)
    s, g = 0.3, 0.05
    x = torch.tensor(x_np, dtype=torch.float32, requires_grad=True)
    step = torch.tensor(s, requires_grad=True)
    (lsq_quantize(x, step, k, signed, g)
     * torch.tensor(up_np, dtype=torch.float32)).sum().backward()
    if signed and k == 1:
        qn = qp = 1
        v = x_np / s
        dq_ds = np.where(v <= -1, -1.0, np.where(v >= 1, 1.0, np.where(v >= 0, 1.0, -1.0) - v))
        expected_s = g * np.sum(up_np * dq_ds)
    else:
        qn, qp = (2 ** (k - 1), 2 ** (k - 1) - 1) if signed else (0, 2 ** k - 1)
        expected_s = np_lsq_step_grad(x_np, s, qn, qp, up_np, g)
    np.testing.assert_allclose(step.grad.item(), expected_s, rtol=1e-4, atol=1e-5)
    inside = (x_np / s > -qn) & (x_np / s < qp)
    np.testing.assert_array_equal(x.grad.numpy(), np.where(inside, up_np, 0).astype(np.float32))


@pytest.mark.parametrize("k,signed", [(4, True), (3, False)])
def test_lsq_gradients_of_a_channels_last_tensor_match_formula(k, signed):
    """Models run channels_last: the hand-written backward must give the formula's gradients
    for a tensor whose memory is not in its logical order too."""
    rng = np.random.default_rng(30 + k)
    shape = (2, 3, 4, 5)
    x_np = (rng.normal(0, 1, shape) if signed else rng.uniform(0, 3, shape)).astype(np.float32)
    up_np = rng.normal(0, 1, shape).astype(np.float32)
    s, g = 0.3, 0.05
    x = torch.from_numpy(x_np).to(memory_format=torch.channels_last).requires_grad_()
    assert not x.is_contiguous()
    step = torch.tensor(s, requires_grad=True)
    up = torch.from_numpy(up_np).to(memory_format=torch.channels_last)
    (lsq_quantize(x, step, k, signed, g) * up).sum().backward()
    qn, qp = (2 ** (k - 1), 2 ** (k - 1) - 1) if signed else (0, 2 ** k - 1)
    x64 = x_np.astype(np.float64)
    np.testing.assert_allclose(step.grad.item(), np_lsq_step_grad(x64, s, qn, qp, up_np, g),
                               rtol=1e-4, atol=1e-5)
    inside = (x64 / s > -qn) & (x64 / s < qp)
    np.testing.assert_array_equal(x.grad.numpy(), np.where(inside, up_np, 0).astype(np.float32))


def test_lsq_signed_one_bit_gives_zero_the_plus_level():
    """Signed 1-bit LSQ quantizes with sign(0) = +1: an exact zero (+0 or -0) becomes +s, and its
    step gradient is q - x/s = +1 (eq. 3 inside the range)."""
    x = torch.tensor([0.0, -0.0, 0.25, -0.25], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    out = lsq_quantize(x, step, 1, True, 1.0)
    assert out.tolist() == [0.5, 0.5, 0.5, -0.5]
    out.sum().backward()
    assert step.grad.item() == (1 - 0) + (1 - 0) + (1 - 0.5) + (-1 + 0.5)  # sign0(v) - v, v = x/s
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


# ============================================================================ precision
def _all_quantizer_outputs(x: torch.Tensor) -> list[torch.Tensor]:
    xs = x.abs()
    return [quantize_k(xs.clamp(0, 1), 4), dorefa_activation(x, 2), dorefa_weight(x, 4),
            dorefa_weight(x, 1), pact_activation(xs, torch.tensor(1.5), 3),
            lsq_quantize(x, torch.tensor(0.2), 4, True, 1.0)]


def test_quantizer_math_is_fp32_under_bf16_autocast():
    x = torch.randn(4096)
    plain = _all_quantizer_outputs(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _all_quantizer_outputs(x)
    for a, b in zip(plain, autocast):
        assert b.dtype == torch.float32
        assert torch.equal(a, b)


def test_bf16_input_is_quantized_in_fp32_and_cast_back():
    x = torch.randn(4096).to(torch.bfloat16)
    for low, high in zip(_all_quantizer_outputs(x), _all_quantizer_outputs(x.float())):
        assert low.dtype == torch.bfloat16
        assert torch.equal(low, high.to(torch.bfloat16))


def test_qconv_ignores_bf16_autocast():
    torch.manual_seed(0)
    layer = QConv2d(4, 8, 3, padding=1, w_bits=4, a_bits=4)
    x = torch.rand(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, layer(x))  # the exact quantized result, as outside autocast
    # the bf16 activations an autocast full-precision layer hands it: quantized as fp32 values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_bf16 = layer(x.bfloat16())
    assert from_bf16.dtype == torch.float32
    assert torch.equal(from_bf16, layer(x.bfloat16().float()))


# ============================================================================ layers
@pytest.mark.parametrize("quantizer", ["dorefa", "pact", "lsq"])
@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2, 1])
def test_state_dict_keys_do_not_depend_on_bits(quantizer, bits):
    ref = QConv2d(3, 4, 3, quantizer=quantizer)
    layer = QConv2d(3, 4, 3, w_bits=bits, a_bits=bits, quantizer=quantizer)
    assert list(layer.state_dict()) == list(ref.state_dict())


def test_qconv_equals_conv_on_quantized_tensors():
    torch.manual_seed(0)
    layer = QConv2d(4, 6, 3, padding=1, w_bits=3, a_bits=2)
    x = torch.rand(2, 4, 8, 8) * 1.4
    expected = nn.functional.conv2d(dorefa_activation(x, 2), dorefa_weight(layer.weight, 3),
                                    layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    lin = QLinear(5, 3, w_bits=2, a_bits=4)
    h = torch.rand(2, 5)
    torch.testing.assert_close(lin(h), nn.functional.linear(dorefa_activation(h, 4),
                                                            dorefa_weight(lin.weight, 2),
                                                            lin.bias), rtol=0, atol=0)


def test_quantize_input_false_keeps_input_full_precision():
    torch.manual_seed(0)
    layer = QConv2d(3, 4, 3, w_bits=2, a_bits=2, quantize_input=False)
    x = torch.randn(1, 3, 6, 6)  # signed, like a normalised image
    torch.testing.assert_close(layer(x),
                               nn.functional.conv2d(x, dorefa_weight(layer.weight, 2), layer.bias))


@pytest.mark.parametrize("quantizer", ["pact", "lsq"])
def test_identity_quantizer_parameters_are_frozen(quantizer):
    layer = QConv2d(3, 4, 3, w_bits=32, a_bits=4, quantizer=quantizer)
    for name, p in layer.named_parameters():
        active = name.startswith("input_quantizer") or not name.endswith(("alpha", "step"))
        assert p.requires_grad == active, name


def test_lsq_step_initialised_from_first_batch_and_kept_in_state_dict():
    torch.manual_seed(0)
    layer = QConv2d(4, 4, 3, w_bits=4, a_bits=3, quantizer="lsq")
    x = torch.rand(2, 4, 5, 5)
    layer(x)
    aq, wq = layer.input_quantizer, layer.weight_quantizer
    torch.testing.assert_close(aq.step.detach(), 2 * x.abs().mean() / np.sqrt(7))
    torch.testing.assert_close(wq.step.detach(),
                               2 * layer.weight.detach().abs().mean() / np.sqrt(7))
    assert bool(aq.initialized)
    layer(x * 5)  # only the first batch initialises
    torch.testing.assert_close(aq.step.detach(), 2 * x.abs().mean() / np.sqrt(7))
    fresh = QConv2d(4, 4, 3, w_bits=4, a_bits=3, quantizer="lsq")
    fresh.load_state_dict(layer.state_dict())
    fresh(x * 5)  # loaded as initialised: the step is not overwritten
    assert torch.equal(fresh.input_quantizer.step, aq.step)


@pytest.mark.parametrize("bits, signed, expected", [
    (1, True, lambda m: m),  # signed 1 bit: the least-squares scale of a binary tensor, mean|x|
    (2, True, lambda m: 2 * m / np.sqrt(1)),  # Qp = 1, as at 1 bit: the formula still applies
    (4, True, lambda m: 2 * m / np.sqrt(7)),
    (1, False, lambda m: 2 * m / np.sqrt(1)),
    (3, False, lambda m: 2 * m / np.sqrt(7))])
def test_lsq_step_initialisation_per_bit_width_and_sign(bits, signed, expected):
    x = torch.randn(64, generator=torch.Generator().manual_seed(bits)) + 0.3
    quantizer = LSQQuantizer(bits, signed=signed)
    quantizer(x)
    torch.testing.assert_close(quantizer.step.detach(), expected(x.abs().mean()))


def test_lsq_gradient_scale_uses_features_per_example():
    layer = QConv2d(4, 4, 3, w_bits=32, a_bits=2, quantizer="lsq")
    step = layer.input_quantizer.step
    grads, example = [], torch.rand(1, 4, 5, 5)
    for batch in (2, 8):
        x = example.expand(batch, -1, -1, -1).contiguous()
        layer.input_quantizer.reset_state()
        step.grad = None
        layer(x).mean(0).sum().backward()  # same per-example loss at both batch sizes
        grads.append(step.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ============================================================================ freezing
def _small_net(quantizer: str = "dorefa") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(QConv2d(3, 8, 3, padding=1, w_bits=4, a_bits=4, quantizer=quantizer,
                                 quantize_input=False),
                         nn.ReLU(),
                         QConv2d(8, 8, 3, padding=1, w_bits=2, a_bits=2, quantizer=quantizer),
                         nn.ReLU(), nn.Flatten(), QLinear(8 * 6 * 6, 5, w_bits=1, a_bits=2,
                                                          quantizer=quantizer))


def _count_weight_quantizer_calls(net, monkeypatch) -> list:
    """A list that grows by one at each call of any of ``net``'s weight quantizers."""
    calls = []
    for m in net.modules():
        if isinstance(m, (QConv2d, QLinear)):
            original = m.weight_quantizer.forward
            monkeypatch.setattr(m.weight_quantizer, "forward",
                                lambda w, _f=original: calls.append(1) or _f(w))
    return calls


@pytest.mark.parametrize("quantizer", ["dorefa", "pact", "lsq"])
def test_frozen_forward_equals_unfrozen_and_skips_weight_quantizer(quantizer, monkeypatch):
    net = _small_net(quantizer).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        expected = net(x)
    freeze_quantized_weights(net)
    calls = _count_weight_quantizer_calls(net, monkeypatch)
    with torch.inference_mode():
        frozen = net(x)
    assert torch.equal(frozen, expected)
    assert calls == []  # the teacher does not re-quantize its weights
    unfreeze_quantized_weights(net)
    with torch.inference_mode():
        assert torch.equal(net(x), expected)
    assert len(calls) == 3


def test_frozen_weights_serve_frozen_parameters_in_grad_mode(monkeypatch):
    """Grad mode alone does not void the frozen copy: weights that need no gradient (a teacher
    with requires_grad off, an input that needs one) still skip the weight quantizer."""
    net = _small_net().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = net(x)
    freeze_quantized_weights(net)
    net.requires_grad_(False)
    calls = _count_weight_quantizer_calls(net, monkeypatch)
    x.requires_grad_(True)
    out = net(x)
    assert torch.equal(out, expected) and calls == []
    out.sum().backward()
    assert x.grad is not None


def test_frozen_weights_not_used_when_weights_change_or_need_gradients():
    net = _small_net()
    x = torch.randn(2, 3, 6, 6)
    freeze_quantized_weights(net)
    out = net(x)  # grad mode: the frozen copy must not cut the weights off the graph
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    torch.optim.SGD(net.parameters(), lr=1.0).step()  # weights change in place
    with torch.no_grad():
        after = net(x)
        unfreeze_quantized_weights(net)
        assert torch.equal(after, net(x))
        assert not torch.equal(after, out)


def test_unfreezing_a_compiled_model_makes_it_use_its_changed_weights(monkeypatch):
    """Compiled code cannot see that a frozen weight changed (no version counters), so the
    documented remedy is to unfreeze: after that, the changed weights are the ones used."""
    net = freeze_quantized_weights(_small_net())
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-1.0)
    unfreeze_quantized_weights(net)
    fresh = _small_net()
    fresh.load_state_dict(net.state_dict())  # the changed weights, never frozen
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside a graph
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))


def test_frozen_weights_move_with_the_model():
    net = freeze_quantized_weights(_small_net())
    net.double()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 6, 6, dtype=torch.float64)).dtype == torch.float64


# ============================================================================ transfer + size
def test_transfer_copies_parameters_and_buffers_and_resets_quantizers():
    torch.manual_seed(0)
    src = nn.Sequential(QConv2d(3, 4, 3, w_bits=8, a_bits=8, quantizer="lsq", quantize_input=False),
                        nn.BatchNorm2d(4), nn.ReLU(),
                        QConv2d(4, 4, 3, w_bits=8, a_bits=8, quantizer="lsq"))
    src(torch.randn(4, 3, 8, 8))  # moves BN running stats, initialises LSQ steps
    same = nn.Sequential(QConv2d(3, 4, 3, w_bits=8, a_bits=8, quantizer="lsq",
                                 quantize_input=False),
                         nn.BatchNorm2d(4), nn.ReLU(),
                         QConv2d(4, 4, 3, w_bits=8, a_bits=8, quantizer="lsq"))
    transfer_weights(src, same)
    for (k, a), b in zip(src.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), k
    lower = nn.Sequential(QConv2d(3, 4, 3, w_bits=2, a_bits=2, quantizer="lsq",
                                  quantize_input=False),
                          nn.BatchNorm2d(4), nn.ReLU(),
                          QConv2d(4, 4, 3, w_bits=2, a_bits=2, quantizer="lsq"))
    transfer_weights(src, lower)
    for k, v in src.state_dict().items():
        if not k.endswith(("step", "initialized")):
            assert torch.equal(v, lower.state_dict()[k]), k
    assert not lower[3].input_quantizer.initialized and not lower[3].weight_quantizer._initialized


def _one_conv(quantizer: str, bits: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(QConv2d(3, 4, 3, w_bits=bits, a_bits=bits, quantizer=quantizer),
                         nn.BatchNorm2d(4))


def test_transfer_resets_the_quantizer_state_a_used_destination_had():
    """Re-initialised means back to the initial state, not left as the destination had it: a
    destination that already ran (its LSQ steps set, its PACT alpha trained) is reset too."""
    x = torch.rand(2, 3, 6, 6)
    src, dst = _one_conv("lsq", 4), _one_conv("lsq", 2)
    src(x), dst(x)
    transfer_weights(src, dst)
    aq = dst[0].input_quantizer
    assert not aq._initialized and not bool(aq.initialized)
    dst(x * 5)  # the next batch sets the step again: 2 mean|x| / sqrt(Qp), Qp = 3
    torch.testing.assert_close(aq.step.detach(), 2 * (x * 5).abs().mean() / np.sqrt(3))
    src, dst = _one_conv("pact", 4), _one_conv("pact", 2)
    with torch.no_grad():
        src[0].input_quantizer.alpha.fill_(2.0)
        dst[0].input_quantizer.alpha.fill_(3.0)
    transfer_weights(src, dst)
    assert dst[0].input_quantizer.alpha.item() == dst[0].input_quantizer.alpha_init


def test_transfer_at_the_same_bit_width_resets_another_family_or_sign():
    """Same bits is not enough to copy quantizer state: DoReFa activations have no alpha to give
    PACT (the network is still copied), and a signed LSQ step is not an unsigned one's."""
    x = torch.rand(2, 3, 6, 6)
    src, dst = _one_conv("dorefa", 4), _one_conv("pact", 4)
    src(x)  # moves the BatchNorm statistics
    with torch.no_grad():
        dst[0].input_quantizer.alpha.fill_(3.0)
    transfer_weights(src, dst)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    assert dst[0].input_quantizer.alpha.item() == dst[0].input_quantizer.alpha_init
    signed, unsigned = nn.Sequential(LSQQuantizer(4, signed=True)), nn.Sequential(
        LSQQuantizer(4, signed=False))
    signed(torch.randn(64))  # sets its step
    transfer_weights(signed, unsigned)
    assert not unsigned[0]._initialized and not bool(unsigned[0].initialized)


def test_transfer_error_names_eight_keys_then_counts_them():
    def linears(count):
        return nn.Sequential(*(nn.Linear(1, 1) for _ in range(count)))

    prefix = "cannot transfer weights from Sequential to Sequential: architectures differ; "
    with pytest.raises(ValueError) as eight:
        transfer_weights(linears(0), linears(4))
    assert str(eight.value) == prefix + "missing in source: " + ", ".join(
        f"{i}.{name}" for i in range(4) for name in ("bias", "weight"))
    with pytest.raises(ValueError) as ten:
        transfer_weights(linears(5), linears(0))
    assert str(ten.value) == prefix + "extra in source: " + ", ".join(
        f"{i}.{name}" for i in range(4) for name in ("bias", "weight")) + ", ... (10 in all)"


def test_transfer_rejects_different_architectures():
    a = nn.Sequential(QConv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"shape mismatch.*0\.weight"):
        transfer_weights(a, nn.Sequential(QConv2d(3, 5, 3), nn.BatchNorm2d(5)))
    with pytest.raises(ValueError, match=r"missing in source: 2\.bias, 2\.weight"):
        transfer_weights(a, nn.Sequential(QConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(2, 2)))


def test_model_size_report():
    net = nn.Sequential(QConv2d(3, 4, 3, w_bits=4, bias=True), nn.BatchNorm2d(4),
                        QLinear(4, 2, w_bits=32))
    report = model_size_report(net)
    params = 108 + 4 + 8 + 8 + 2
    assert report["params"] == params
    assert report["fp32_bits"] == 32 * params
    assert report["storage_bits"] == 4 * 108 + 32 * (params - 108)
    assert report["compression"] == pytest.approx(32 * params / (4 * 108 + 32 * (params - 108)))


# ============================================================================ bad input
@pytest.mark.parametrize("bits", BAD_BITS)
def test_bad_bits_are_rejected_with_the_value_named(bits):
    for call in (lambda: quantize_k(torch.rand(3), bits),
                 lambda: dorefa_weight(torch.rand(3), bits),
                 lambda: dorefa_activation(torch.rand(3), bits),
                 lambda: QConv2d(3, 4, 3, w_bits=bits), lambda: QLinear(3, 4, a_bits=bits)):
        with pytest.raises(ValueError, match=r"accepted: an integer in 1\.\.16 or 32") as info:
            call()
        assert repr(bits) in str(info.value)


def test_unknown_quantizer_is_rejected_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"quantizer='xnor'.*dorefa, pact, lsq"):
        QConv2d(3, 4, 3, quantizer="xnor")
    with pytest.raises(ValueError, match="dorefa, pact, lsq"):
        make_quantizers("DoReFa", 4, 4)


# ============================================================================ torch.compile
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compiled_quantized_layers_match_eager():
    """One small graph with all three quantizer families; fullgraph: no graph breaks, no .item()."""
    torch.manual_seed(0)
    net = nn.Sequential(QConv2d(3, 4, 3, padding=1, w_bits=4, a_bits=4, quantizer="dorefa"),
                        nn.ReLU(),
                        QConv2d(4, 4, 3, padding=1, w_bits=2, a_bits=2, quantizer="pact"),
                        nn.ReLU(),
                        QConv2d(4, 4, 3, padding=1, w_bits=1, a_bits=3, quantizer="lsq"))
    x = torch.rand(2, 3, 8, 8)
    net(x)  # eager first call initialises the LSQ steps
    y = torch.compile(net, fullgraph=True)(x)
    torch.testing.assert_close(y, net(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in net.parameters() if p.requires_grad)


def test_level_summary_counts_the_grid():
    from kdlib.quant import level_summary

    assert level_summary(1)["weights_seen"] == 2 and level_summary(1)["activations_seen"] == 2
    assert level_summary(2)["weights_seen"] == 4 and level_summary(4)["activations_seen"] == 16
    assert level_summary(8)["weights_seen"] == 256 \
        and level_summary(8)["activation_range"] == "[0, 1]"
    assert level_summary(16)["grid"] == "2^16 = 65536" and level_summary(32)["grid"] == "fp32"
    assert level_summary(2)["lowest_weights"] == "-1.000, -0.333, +0.333, +1.000"
    assert level_summary(1)["lowest_weights"] == "-1.500, +1.500"  # sign(w)·E|w| of the sweep


def test_level_summary_shows_the_lowest_levels_of_a_grid_finer_than_four():
    """A grid of more than four weights shows its four lowest, -1 + 2k / (2^bits - 1), then
    '...': the bottom of the grid, not its top."""
    from kdlib.quant import level_summary

    assert level_summary(4)["lowest_weights"] == "-1.000, -0.867, -0.733, -0.600, ..."
    assert level_summary(3)["lowest_weights"] == "-1.000, -0.714, -0.429, -0.143, ..."


# ==================================================================== learned scales stay positive
@pytest.mark.parametrize("make", [lambda: PACTActivationQuantizer(4),
                                  lambda: LSQQuantizer(4, signed=False),
                                  lambda: LSQQuantizer(4, signed=True)])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_learned_scale_at_or_below_zero_is_clamped(make, bad):
    q = make()
    x = torch.rand(64) * 2 - (0.5 if getattr(q, "signed", False) else 0.0)
    q(x)  # LSQ initialises its step here
    param = q.alpha if isinstance(q, PACTActivationQuantizer) else q.step
    with torch.no_grad():
        param.fill_(bad)
    x.requires_grad_(True)
    out = q(x)
    assert torch.isfinite(out).all()
    assert float(out.detach().abs().max()) <= 1e-8 * 2 ** 4  # a grid of step <= MIN_SCALE
    # and not collapsed to zero (x has values > MIN_SCALE)
    assert float(out.detach().abs().max()) > 0
    out.sum().backward()
    assert param.grad is not None and torch.isfinite(param.grad).all()



# ============================================== learned scales: the papers' gradients, absolute
def _lsq_step_gradient_by_the_paper(x: torch.Tensor, step: float, qn: int, qp: int,
                                    g: float) -> float:
    """LSQ's eq. 3 in float64 NumPy, upstream gradient 1: round(v) − v inside the grid, −Qn
    below it, Qp above it, times the gradient scale g."""
    v = x.double().numpy() / step
    d = np.where(v <= -qn, -qn, np.where(v >= qp, qp, np.round(v) - v))
    return g * float(d.sum())


@pytest.mark.parametrize("signed, shape, per_example, qn, qp", [
    (False, (2, 3, 4, 4), 48, 0, 15),    # activations: N = features of one example
    (True, (8, 3, 3, 3), 216, 8, 7)])    # weights: N = every weight
def test_an_lsq_step_learns_at_the_papers_gradient_through_the_module(signed, shape, per_example,
                                                                      qn, qp):
    """Through the module (its clamp at MIN_SCALE and its gradient scale 1/sqrt(N·Qp)), not the
    bare op: the step got twice this gradient until recipe 3, which a test comparing two batch
    sizes could not see."""
    q = LSQQuantizer(4, signed=signed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) + (0.0 if signed else 0.5)
    q(x)  # initialises the step
    with torch.no_grad():
        q.step.fill_(0.25)
    q.step.grad = None
    q(x).sum().backward()
    expected = _lsq_step_gradient_by_the_paper(x, 0.25, qn, qp, 1 / (per_example * qp) ** 0.5)
    assert float(q.step.grad) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_a_pact_clip_level_learns_at_the_papers_gradient_through_the_module():
    """PACT: d y / d alpha is 1 for every input at or above alpha, 0 below (sum over inputs)."""
    q = PACTActivationQuantizer(4)
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        q.alpha.fill_(2.0)
    q(x).sum().backward()
    assert float(q.alpha.grad) == float((x >= 2.0).sum())


def test_positive_passes_the_identitys_gradient_above_and_below_its_floor():
    from kdlib.quant.quantizers import MIN_SCALE, positive

    for value in (0.25, MIN_SCALE, -1.0):
        scale = torch.tensor(value, requires_grad=True)
        out = positive(scale)
        assert float(out.detach()) == float(torch.tensor(max(value, MIN_SCALE)))  # float32
        out.backward()
        assert float(scale.grad) == 1.0, value


@pytest.mark.parametrize("n", [7, 27, 1000, 4608])
def test_one_bit_codes_times_their_step_give_the_quantized_weight_exactly(n):
    """The 1-bit step is the magnitude every element of sign(w)·E|w| has (the packed files and
    ONNX graphs store codes and this step): the mean of those equal float32 values, |q|'s
    mean, can be an ulp off."""
    from kdlib.quant.quantizers import DoReFaWeightQuantizer

    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    quantizer = DoReFaWeightQuantizer(1)
    codes, step = quantizer.codes(w)
    assert torch.equal(codes * step, quantizer(w))
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
