"""Straight-through quantization ops: the forward rounds, the backward passes gradients through.

Every function here is pure (tensors in, tensor out); quantizer arithmetic runs in float32
whatever the input dtype, and no forward reads a tensor value on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdlib.checks import FULL_PRECISION, check_bits


def grid_levels(bits: int) -> int:
    """Number of steps of a k-bit uniform grid on [0, 1]: 2^k - 1."""
    return (1 << bits) - 1


_DIVISORS: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}
COMPILED_DIVISION = "float64"  # how a compiled graph divides the levels (see _div_levels_)


def _div_levels_(y: Tensor, n: int) -> Tensor:
    """``y / n`` for integer-valued ``y`` in [0, n], correctly rounded on every device (in
    place, except when compiled). CUDA divides a tensor by a Python number as ``y * (1/n)``,
    one ulp off for some ``k/n`` (seen on an H200 at 4, 8 and 16 bits: the grid values were
    then not ``k/n``, and the packed export refused them); by a device tensor it divides. One
    cached 0-dim divisor per device, dtype and n: no transfer.

    Compiled, the kernels are Inductor's: Triton's float32 ``/`` may be approximate, and on the
    H200 (torch 2.11) compiled levels were off at 4, 8 and 16 bits. So a compiled graph divides
    in float64 and rounds once to float32: whether the compiler divides exactly, approximately
    or by a reciprocal, the float64 quotient is within 2^-51 of k/n (relative), and k/n (n odd,
    n < 2^16) is at least 2^-40 (relative) from every float32 rounding boundary, so the result
    is float32(k/n) exactly (checked exhaustively in tests/test_exact.py). Eager arithmetic is
    unchanged."""
    if torch.compiler.is_compiling():
        return (y.double() / n).to(y.dtype)
    if y.device.type == "cpu":  # the CPU kernel divides either way
        return y.div_(n)
    key = (y.device, y.dtype, n)
    divisor = _DIVISORS.get(key)
    if divisor is None:
        divisor = _DIVISORS[key] = torch.full((), float(n), dtype=y.dtype, device=y.device)
    return y.div_(divisor)


class _RoundSTE(torch.autograd.Function):
    """round(n * x) / n in float32, gradient passed through unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int) -> Tensor:  # noqa: D102
        y = x.float() * n  # new tensor even for float32 input: the in-place ops below are safe
        return _div_levels_(y.round_(), n).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None


class _RoundOnlySTE(torch.autograd.Function):
    """round(x), gradient passed through unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` with a straight-through (identity) gradient.

    Used to recover the integer codes ``q / scale`` of an already quantized tensor, where the
    division leaves the codes within float rounding of integers.
    """
    return _RoundOnlySTE.apply(x)


class _ClipRoundSTE(torch.autograd.Function):
    """DoReFa activation: round(n * clamp(x, 0, 1)) / n; gradient 1 inside (0, 1), else 0.

    A custom Function rather than ``x + (q - x).detach()``: this is the hot path of every
    quantized conv, and the fused form allocates one tensor in forward and one in backward
    (``hardtanh_backward`` is a single fused kernel) instead of five or six.
    """

    @staticmethod
    def forward(ctx, x: Tensor, n: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)  # the ReLU before saves this same tensor: no extra memory
        y = torch.clamp(x.float(), 0.0, 1.0)  # new tensor: the in-place ops below are safe
        return _div_levels_(y.mul_(n).round_(), n).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, 0.0, 1.0), None


def grid_step(bits: int) -> float:
    """The step of a k-bit grid on [0, 1], ``1 / (2^k - 1)``: what a level's code is scaled by."""
    return 1.0 / grid_levels(bits)


class _ClipRoundCodesSTE(torch.autograd.Function):
    """The integer codes of :class:`_ClipRoundSTE`, ``round(n * clamp(x, 0, 1))``, without the
    division by n that the codes path would undo (``q / step``, then a round): three kernels
    forward instead of six. Its gradient is the one of that longer path, op for op: the
    incoming gradient divided by the step (the same Python number, the same division kernel),
    then the clip's ``hardtanh_backward``."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.bits = bits
        return torch.clamp(x.float(), 0.0, 1.0).mul_(grid_levels(bits)).round_()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        grad_q = (grad / grid_step(ctx.bits)).to(x.dtype)  # of codes = round(q / step)
        return torch.ops.aten.hardtanh_backward(grad_q, x, 0.0, 1.0), None


def dorefa_activation_codes(x: Tensor, bits: int) -> Tensor:
    """The integer codes ``k`` (float32, 0..n) of ``dorefa_activation(x, bits) = k / n``, with
    the straight-through gradient of ``round(dorefa_activation(x, bits) / grid_step(bits))``.
    1..16 bits."""
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        raise ValueError("a 32-bit activation has no integer codes")
    return _ClipRoundCodesSTE.apply(x, bits)


def quantize_k(x: Tensor, bits: int) -> Tensor:
    """Uniform k-bit quantization of ``x`` in [0, 1]: round((2^k - 1) x) / (2^k - 1).

    ``x`` is not clipped (the callers keep it in [0, 1]); the gradient is the identity
    (straight-through estimator). ``bits == 32`` returns ``x`` itself.
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    return _RoundSTE.apply(x, grid_levels(bits))


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa-Net weight quantization (Zhou et al. 2016, eq. 9 and the 1-bit case).

    * ``bits == 32``: ``w`` unchanged.
    * ``bits > 1``: ``2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``, values in [-1, 1].
      The max is over the whole tensor (one constant per layer); autograd differentiates
      through tanh and the max, the round is straight-through. An all-zero tensor maps to
      +1/(2^k - 1) everywhere (the grid has no zero; the tie 1/2 rounds up because 2^(k-1) is
      even), instead of 0/0.
    * ``bits == 1``: ``sign(w) * mean|w|`` with sign(0) = +1. The scale mean|w| is a constant
      (detached), as ``tf.stop_gradient(E|w|)`` in the DoReFa code, and the sign is
      straight-through, so d out / d w = 1. An all-zero tensor stays all-zero.
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return w
    wf = w.float()
    if bits == 1:
        scale = wf.detach().abs().mean()
        binary = torch.where(wf.detach() >= 0, scale, -scale)
        # value exactly `binary` (wf - wf.detach() is exactly 0), gradient identity
        return (binary + (wf - wf.detach())).to(w.dtype)
    t = torch.tanh(wf)
    # clamp_min only matters for an all-zero tensor (0/0); tiny keeps every ratio <= 1.
    max_abs = t.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    u = t / (2 * max_abs) + 0.5
    return (2 * _RoundSTE.apply(u, grid_levels(bits)) - 1).to(w.dtype)


def dorefa_activation(x: Tensor, bits: int) -> Tensor:
    """DoReFa-Net activation quantization: ``quantize_k(clamp(x, 0, 1))``.

    ``bits == 1`` rounds at 0.5 (values 0 and 1), it is not a sign. Gradient: 1 for
    0 < x < 1, 0 elsewhere (the clip), straight-through across the round. ``bits == 32``
    returns ``x`` unchanged (no clip either: a 32-bit network is the plain ReLU network).
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    return _ClipRoundSTE.apply(x, grid_levels(bits))


def _float32_below(n: int) -> float:
    """The largest float32 below the integer n (1 <= n < 2^24)."""
    exponent = n.bit_length() - 1  # n in [2^e, 2^(e+1)): float32 spacing 2^(e-23) there
    return n - 2.0 ** (exponent - 23 - (1 if n == 1 << exponent else 0))  # finer just below 2^e


class _PACT(torch.autograd.Function):
    """PACT (Choi et al. 2018): y = round(clamp(x, 0, a) * n / a) * a / n.

    Gradients as in the paper's straight-through version: dy/dx = 1 for 0 < x < a, else 0;
    dy/da = 1 where x >= a, else 0 (the dependence of the grid step on ``a`` is ignored).
    The forward computes on v = x * n / a, the backward on u = x / a, so every clip bound is a
    Python number (no ``.item()``). The gradients split on u, not v: a correctly rounded
    division, u >= 1 exactly where x >= a, whereas the rounded product x * (n / a) can land a
    float either side of n for x within a float of a.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, alpha)
        a = alpha.float()
        v = x.float() * (n / a)  # new tensor: the in-place ops below are safe
        return v.clamp_(0, n).round_().mul_(a / n).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, alpha = ctx.saved_tensors
        g = grad.float()
        u = x.float() / alpha.float()  # a float below alpha gives u < 1, alpha itself u == 1
        grad_x = torch.ops.aten.hardtanh_backward(g, u, 0.0, 1.0)  # grad where 0 < u < 1
        # threshold_backward keeps grad where u > t; with t the float just below 1 that is u >= 1.
        # One fused pass instead of compare + where.
        grad_alpha = torch.ops.aten.threshold_backward(g, u, _float32_below(1)).sum()
        return grad_x.to(grad.dtype), grad_alpha.reshape(alpha.shape).to(alpha.dtype), None


def pact_activation(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """PACT activation quantization on [0, alpha] (see :class:`_PACT` for the gradients)."""
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    return _PACT.apply(x, alpha, grid_levels(bits))


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of LSQ: signed -2^(b-1) .. 2^(b-1)-1, unsigned 0 .. 2^b-1.

    Signed 1 bit is special-cased to the levels {-1, +1} (see :func:`lsq_quantize`), reported
    as (1, 1).
    """
    if signed:
        return (1, 1) if bits == 1 else (1 << (bits - 1), (1 << (bits - 1)) - 1)
    return 0, grid_levels(bits)


def _sign0(v: Tensor) -> Tensor:
    """sign with sign(0) = +1."""
    return torch.where(v >= 0, 1.0, -1.0).to(v.dtype)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) in one pass without a temporary when both are contiguous (BLAS dot)."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


class _LSQ(torch.autograd.Function):
    """LSQ forward ``round(clamp(x / s, -Qn, Qp)) * s`` and the paper's gradients (eq. 3-5).

    d/dx = 1 for -Qn < x/s < Qp, else 0 (straight-through round). d/ds = g * (round(x/s) - x/s)
    inside, -Qn * g below, Qp * g above, with g the gradient scale. Written out so that the
    backward pass costs a handful of fused passes instead of the ~20 ops autograd would record.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, use_sign: bool,
                grad_scale: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp, ctx.use_sign, ctx.grad_scale = qn, qp, use_sign, grad_scale
        s = step.float()
        v = (x.float() / s).clamp_(-qn, qp)  # new tensor: the in-place ops below are safe
        q = _sign0(v) if use_sign else v.round_()
        return q.mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, step = ctx.saved_tensors
        qn, qp = ctx.qn, ctx.qp
        g = grad.float()
        v = x.float() / step.float()
        grad_x = torch.ops.aten.hardtanh_backward(g, v, float(-qn), float(qp))
        # Per element: q(c) - c * [inside] with c = clamp(v); outside c = q(c) = -Qn or Qp.
        c = v.clamp_(-qn, qp)
        q = _sign0(c) if ctx.use_sign else c.round()
        grad_s = (_dot(q, g) - _dot(c, grad_x)) * ctx.grad_scale
        return (grad_x.to(grad.dtype), grad_s.reshape(step.shape).to(step.dtype),
                None, None, None, None)


def lsq_quantize(x: Tensor, step: Tensor, bits: int, signed: bool, grad_scale: float) -> Tensor:
    """LSQ (Esser et al. 2020): ``round(clamp(x / s, -Qn, Qp)) * s`` with a learned step ``s``.

    Gradients as in the paper (see :class:`_LSQ`), the step's multiplied by ``grad_scale``
    (the paper's g = 1/sqrt(N Qp)). Signed 1 bit uses sign (with sign(0) = +1) instead of
    round, i.e. the levels {-s, +s} with the same gradient rule (Qn = Qp = 1); the usual
    signed grid {-s, 0} would waste the only bit.
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    qn, qp = lsq_range(bits, signed)
    return _LSQ.apply(x, step, qn, qp, signed and bits == 1, float(grad_scale))
