"""Quantizers as straight-through ops, and the quantized layers built from them.

Three quantizer families, selected by name (``quantizer=`` of :class:`QConv2d` / :class:`QLinear`):

========  ==============================  =====================================
name      weights                         input activations
========  ==============================  =====================================
dorefa    :func:`dorefa_weight`           :func:`dorefa_activation` (clip [0, 1])
pact      :func:`dorefa_weight`           PACT: clip [0, alpha], alpha learned
lsq       LSQ, signed, step learned       LSQ, unsigned, step learned
========  ==============================  =====================================

Conventions that change numbers (keep them in mind when reading results):

* **Rounding** is ``torch.round``: round half to even (as ``numpy.round`` and TensorFlow's
  ``tf.round`` used by the DoReFa code). So a 1-bit activation of exactly 0.5 becomes 0.
* **Gradients** are straight-through (identity) across every ``round``/``sign``; the clip ranges
  give zero gradient outside. For DoReFa activations the gradient passes for ``0 < x < 1``
  (open interval, like ``hardtanh``; the end points themselves are measure-zero, and the many
  exact zeros after a ReLU already get zero gradient from the ReLU).
* **Precision**: quantizer arithmetic always runs in float32, also under ``torch.autocast`` and
  for bf16/fp16 inputs; the result is cast back to the input's dtype. None of the ops used is
  on an autocast list, so an explicit ``.float()`` is all it takes.
* **bits = 32** means "not quantized": every quantizer is then the identity. Quantizer
  submodules exist at every bit width so that ``state_dict`` keys do not depend on the bits;
  learnable quantizer parameters of an identity quantizer get ``requires_grad=False`` (they
  are unused, so they would never receive a gradient anyway).
* **No ``.item()`` and no branching on tensor values** in any forward: everything here is
  ``torch.compile``-friendly (the only exception is LSQ's one-time initialisation from the first
  batch, which runs eagerly once).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.config import QUANTIZERS, check_bits

__all__ = [
    "QUANTIZERS", "quantize_k", "dorefa_weight", "dorefa_activation", "pact_activation",
    "lsq_quantize", "Quantizer", "DoReFaWeightQuantizer", "DoReFaActivationQuantizer",
    "PACTActivationQuantizer", "LSQQuantizer", "make_quantizers", "QConv2d", "QLinear",
    "quantized_layers", "freeze_quantized_weights", "unfreeze_quantized_weights",
    "transfer_weights", "model_size_report",
]

FULL_PRECISION = 32
PACT_ALPHA_INIT = 10.0  # the PACT paper's initial clip level


def check_quantizer(name: Any) -> str:
    """Accept one of :data:`QUANTIZERS`; anything else -> ValueError listing them."""
    if not isinstance(name, str) or name not in QUANTIZERS:
        raise ValueError(f"quantizer={name!r} is unknown; accepted: {', '.join(QUANTIZERS)}")
    return name


def _levels(bits: int) -> int:
    """Number of steps of a k-bit uniform grid on [0, 1]: 2^k - 1."""
    return (1 << bits) - 1


# ============================================================================ functional ops
class _RoundSTE(torch.autograd.Function):
    """round(n * x) / n in float32, gradient passed through unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int) -> Tensor:  # noqa: D102
        y = x.float() * n  # new tensor even for float32 input: the in-place ops below are safe
        return y.round_().div_(n).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None


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
        return y.mul_(n).round_().div_(n).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, 0.0, 1.0), None


def quantize_k(x: Tensor, bits: int) -> Tensor:
    """Uniform k-bit quantization of ``x`` in [0, 1]: round((2^k - 1) x) / (2^k - 1).

    ``x`` is not clipped (the callers keep it in [0, 1]); the gradient is the identity
    (straight-through estimator). ``bits == 32`` returns ``x`` itself.
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    return _RoundSTE.apply(x, _levels(bits))


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
    return (2 * _RoundSTE.apply(u, _levels(bits)) - 1).to(w.dtype)


def dorefa_activation(x: Tensor, bits: int) -> Tensor:
    """DoReFa-Net activation quantization: ``quantize_k(clamp(x, 0, 1))``.

    ``bits == 1`` rounds at 0.5 (values 0 and 1), it is not a sign. Gradient: 1 for
    0 < x < 1, 0 elsewhere (the clip), straight-through across the round. ``bits == 32``
    returns ``x`` unchanged (no clip either: a 32-bit network is the plain ReLU network).
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    return _ClipRoundSTE.apply(x, _levels(bits))


def _float32_below(n: int) -> float:
    """The largest float32 below the integer n (1 <= n < 2^24)."""
    exponent = n.bit_length() - 1  # n in [2^e, 2^(e+1)): float32 spacing 2^(e-23) there
    return n - 2.0 ** (exponent - 23 - (1 if n == 1 << exponent else 0))  # finer just below 2^e


class _PACT(torch.autograd.Function):
    """PACT (Choi et al. 2018): y = round(clamp(x, 0, a) * n / a) * a / n.

    Gradients as in the paper's straight-through version: dy/dx = 1 for 0 < x < a, else 0;
    dy/da = 1 where x >= a, else 0 (the dependence of the grid step on ``a`` is ignored).
    Computed on v = x * n / a, so every clip bound is a Python number (no ``.item()``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, alpha)
        ctx.n = n
        a = alpha.float()
        v = x.float() * (n / a)  # new tensor: the in-place ops below are safe
        return v.clamp_(0, n).round_().mul_(a / n).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, alpha = ctx.saved_tensors
        n = ctx.n
        g = grad.float()
        v = x.float() * (n / alpha.float())
        grad_x = torch.ops.aten.hardtanh_backward(g, v, 0.0, float(n))  # grad where 0 < v < n
        # threshold_backward keeps grad where v > t; with t the float just below n that is v >= n.
        # One fused pass instead of compare + where.
        grad_alpha = torch.ops.aten.threshold_backward(g, v, _float32_below(n)).sum()
        return grad_x.to(grad.dtype), grad_alpha.reshape(alpha.shape).to(alpha.dtype), None


def pact_activation(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """PACT activation quantization on [0, alpha] (see :class:`_PACT` for the gradients)."""
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    return _PACT.apply(x, alpha, _levels(bits))


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of LSQ: signed -2^(b-1) .. 2^(b-1)-1, unsigned 0 .. 2^b-1.

    Signed 1 bit is special-cased to the levels {-1, +1} (see :func:`lsq_quantize`), reported
    as (1, 1).
    """
    if signed:
        return (1, 1) if bits == 1 else (1 << (bits - 1), (1 << (bits - 1)) - 1)
    return 0, _levels(bits)


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


# ============================================================================ quantizer modules
class Quantizer(nn.Module):
    """Base class: one quantizer of one tensor, at ``bits`` (32 = identity).

    ``reset_state()`` re-initialises learned quantizer state; :func:`transfer_weights` calls
    it when the bit width differs between the source and the destination model.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)

    @property
    def active(self) -> bool:
        return self.bits != FULL_PRECISION

    def reset_state(self) -> None:
        """Re-initialise learned state (nothing to do for parameter-free quantizers)."""

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DoReFaWeightQuantizer(Quantizer):
    """:func:`dorefa_weight` as a module."""

    def forward(self, w: Tensor) -> Tensor:  # noqa: D102
        return dorefa_weight(w, self.bits) if self.active else w


class DoReFaActivationQuantizer(Quantizer):
    """:func:`dorefa_activation` as a module."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return dorefa_activation(x, self.bits) if self.active else x


class PACTActivationQuantizer(Quantizer):
    """PACT activations with a learned clip level ``alpha`` (one scalar per layer).

    Put ``alpha`` under weight decay (the paper regularises it with L2) so it can shrink.
    """

    def __init__(self, bits: int, alpha_init: float = PACT_ALPHA_INIT):
        super().__init__(bits)
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.tensor(self.alpha_init), requires_grad=self.active)

    def reset_state(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return pact_activation(x, self.alpha, self.bits) if self.active else x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha_init={self.alpha_init}"


class LSQQuantizer(Quantizer):
    """LSQ with a learned step size (one scalar per tensor), for weights or activations.

    The step is initialised from the first tensor it sees, ``2 mean|x| / sqrt(Qp)`` as in the
    paper (signed 1 bit: ``mean|x|``, the least-squares scale of a binary tensor). Whether
    that happened is kept in the ``initialized`` buffer (so checkpoints carry it) mirrored by a
    Python flag, so the forward pass never reads a tensor value.

    Gradient scale g = 1 / sqrt(N Qp) (Qp >= 1): N is the number of weights for weights and the
    number of features *per example* (C*H*W) for activations; this is the paper's N_F and it
    keeps g independent of the batch size (the loss is a batch mean).
    """

    def __init__(self, bits: int, signed: bool):
        super().__init__(bits)
        self.signed = bool(signed)
        self.step = nn.Parameter(torch.tensor(1.0), requires_grad=self.active)
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False

    def reset_state(self) -> None:
        """Forget the step: the next forward re-initialises it from its input."""
        with torch.no_grad():
            self.step.fill_(1.0)
            self.initialized.fill_(False)
        self._initialized = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = bool(self.initialized)  # once per load, never in forward

    def _init_step(self, x: Tensor) -> None:
        qn, qp = lsq_range(self.bits, self.signed)
        mean_abs = x.detach().float().abs().mean()
        value = mean_abs if (self.signed and self.bits == 1) else 2 * mean_abs / math.sqrt(qp)
        with torch.no_grad():
            self.step.copy_(value.clamp_min(torch.finfo(torch.float32).eps))
            self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not self.active:
            return x
        if not self._initialized:
            self._init_step(x)
        per_example = x.numel() if self.signed else x.numel() // max(x.shape[0], 1)
        qp = max(lsq_range(self.bits, self.signed)[1], 1)
        return lsq_quantize(x, self.step, self.bits, self.signed, (per_example * qp) ** -0.5)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def make_quantizers(quantizer: str, w_bits: int, a_bits: int) -> tuple[Quantizer, Quantizer]:
    """(weight quantizer, input-activation quantizer) of the named family."""
    check_quantizer(quantizer)
    w_bits, a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
    if quantizer == "lsq":
        return LSQQuantizer(w_bits, signed=True), LSQQuantizer(a_bits, signed=False)
    act = PACTActivationQuantizer(a_bits) if quantizer == "pact" else DoReFaActivationQuantizer(a_bits)
    return DoReFaWeightQuantizer(w_bits), act


# ============================================================================ quantized layers
class _QuantizedLayer:
    """Shared part of :class:`QConv2d` / :class:`QLinear`.

    The full-precision ``weight`` stays the Parameter the optimizer updates; forward uses the
    quantized copy. ``input_quantizer`` quantizes the layer's input (which must be a post-ReLU,
    non-negative activation for DoReFa/PACT/unsigned LSQ); with ``quantize_input=False`` it is
    built at 32 bits, i.e. the identity.
    """

    weight: nn.Parameter

    def _init_quantizers(self, w_bits: int, a_bits: int, quantizer: str, quantize_input: bool) -> None:
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(a_bits, "a_bits")
        self.quantizer = check_quantizer(quantizer)
        self.quantize_input = bool(quantize_input)
        self.weight_quantizer, self.input_quantizer = make_quantizers(
            quantizer, w_bits, a_bits if quantize_input else FULL_PRECISION)
        # Cache of the quantized weight for a fixed teacher (see freeze_quantized_weights);
        # a non-persistent buffer so that .to(device) moves it and state_dict ignores it.
        self.register_buffer("frozen_weight", None, persistent=False)
        self._frozen_version = -1

    def quantized_weight(self) -> Tensor:
        """The weight used in forward: frozen copy if valid, else freshly quantized."""
        frozen = self.frozen_weight
        if (frozen is not None and not (torch.is_grad_enabled() and self.weight.requires_grad)
                and (torch.compiler.is_compiling() or self.weight._version == self._frozen_version)):
            return frozen
        return self.weight_quantizer(self.weight)

    def freeze(self) -> None:
        with torch.no_grad():
            self.frozen_weight = self.weight_quantizer(self.weight).detach().clone()
        self._frozen_version = self.weight._version

    def unfreeze(self) -> None:
        self.frozen_weight = None
        self._frozen_version = -1

    def _quant_repr(self) -> str:
        return (f", w_bits={self.w_bits}, a_bits={self.a_bits}, quantizer={self.quantizer!r}"
                f", quantize_input={self.quantize_input}")


class QConv2d(_QuantizedLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weights and input activations are quantized in forward.

    Extra keyword arguments: ``w_bits=32, a_bits=32, quantizer="dorefa", quantize_input=True``.
    """

    def __init__(self, *args: Any, w_bits: int = 32, a_bits: int = 32, quantizer: str = "dorefa",
                 quantize_input: bool = True, **kwargs: Any):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_quantizers(w_bits, a_bits, quantizer, quantize_input)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + self._quant_repr()


class QLinear(_QuantizedLayer, nn.Linear):
    """``nn.Linear`` whose weights and input activations are quantized in forward.

    Extra keyword arguments: ``w_bits=32, a_bits=32, quantizer="dorefa", quantize_input=True``.
    """

    def __init__(self, *args: Any, w_bits: int = 32, a_bits: int = 32, quantizer: str = "dorefa",
                 quantize_input: bool = True, **kwargs: Any):
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_quantizers(w_bits, a_bits, quantizer, quantize_input)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + self._quant_repr()


def quantized_layers(model: nn.Module) -> list[tuple[str, _QuantizedLayer]]:
    """(name, layer) of every QConv2d / QLinear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantizedLayer)]


# ============================================================================ model-level helpers
def freeze_quantized_weights(model: nn.Module) -> nn.Module:
    """Quantize every layer's weights once and let forward reuse them (for a fixed teacher).

    The frozen copy is used only while it is valid: not when gradients would flow into the
    weight (grad mode on and ``requires_grad``), and not after the weight was changed in place
    (optimizer step, ``load_state_dict``, :func:`transfer_weights`; detected by the tensor's
    version counter), in which case forward quantizes afresh. Compiled code cannot read version
    counters, so under ``torch.compile`` only the grad-mode rule applies: unfreeze (or freeze
    again) after changing the weights of a frozen, compiled model. The frozen copies are
    non-persistent buffers: they follow ``.to(device)`` and stay out of ``state_dict``.
    Returns ``model``.
    """
    for _, layer in quantized_layers(model):
        layer.freeze()
    return model


def unfreeze_quantized_weights(model: nn.Module) -> nn.Module:
    """Drop the frozen quantized weights; forward quantizes every call again. Returns ``model``."""
    for _, layer in quantized_layers(model):
        layer.unfreeze()
    return model


def _quantizer_modules(model: nn.Module) -> dict[str, Quantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


def _owner(key: str, prefixes: dict[str, Quantizer]) -> str | None:
    """Name of the quantizer module that owns state_dict ``key``, or None."""
    module = key.rpartition(".")[0]
    return module if module in prefixes else None


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def transfer_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every parameter and buffer (BatchNorm running statistics included) from ``src``.

    ``src`` and ``dst`` are two copies of one architecture, typically at different bit widths
    (a teacher-assistant chain link initialised from the previous link). The network's own
    tensors must match one-to-one in name and shape, else ``ValueError`` naming the missing,
    extra and mismatched keys, and nothing is copied.

    Quantizer state (PACT ``alpha``, LSQ ``step``) is copied only where source and destination
    have the same quantizer family at the same bit width. Otherwise the destination quantizer
    is re-initialised (PACT: ``alpha`` back to its initial value; LSQ: marked uninitialised, so
    its step is set from the first batch it sees): a step learned for 8 bits is wrong for 4,
    and a 32-bit model's quantizers were never trained. The same rule lets a model built with
    one quantizer family initialise one built with another (e.g. a DoReFa fp32 teacher -> LSQ).
    """
    src_state, dst_state = src.state_dict(), dst.state_dict()
    src_q, dst_q = _quantizer_modules(src), _quantizer_modules(dst)
    src_net = {k for k in src_state if _owner(k, src_q) is None}
    dst_net = {k for k in dst_state if _owner(k, dst_q) is None}
    missing = sorted(dst_net - src_net)
    extra = sorted(src_net - dst_net)
    mismatched = sorted(f"{k} {tuple(src_state[k].shape)} vs {tuple(dst_state[k].shape)}"
                        for k in dst_net & src_net if src_state[k].shape != dst_state[k].shape)
    if missing or extra or mismatched:
        parts = [f"{label}: {_describe(keys)}" for label, keys in
                 (("missing in source", missing), ("extra in source", extra),
                  ("shape mismatch (source vs destination)", mismatched)) if keys]
        raise ValueError(f"cannot transfer weights from {type(src).__name__} to "
                         f"{type(dst).__name__}: architectures differ; " + "; ".join(parts))

    merged = {k: src_state[k] for k in dst_net}
    reset: list[Quantizer] = []
    for name, q in dst_q.items():
        same = (name in src_q and type(src_q[name]) is type(q) and src_q[name].bits == q.bits
                and getattr(src_q[name], "signed", None) == getattr(q, "signed", None))
        keys = [k for k in dst_state if _owner(k, dst_q) == name]
        for k in keys:
            merged[k] = src_state[k] if same else dst_state[k]
        if not same:
            reset.append(q)
    dst.load_state_dict(merged, strict=True)
    for q in reset:
        q.reset_state()


def model_size_report(model: nn.Module) -> dict[str, int | float]:
    """Storage of the model's parameters.

    ``params``: number of parameters (quantizer parameters such as PACT alpha / LSQ step
    included; buffers such as BatchNorm running statistics excluded). ``storage_bits``:
    weights of quantized layers at their ``w_bits``, every other parameter (full-precision
    layers, biases, BatchNorm, quantizer scalars) at 32 bits; the one fp32 scale per layer that
    1-bit DoReFa weights need at inference (E|w|) is left out (<= 32 bits per layer).
    ``fp32_bits``: ``32 * params``. ``compression``: ``fp32_bits / storage_bits``.
    """
    params = sum(p.numel() for p in model.parameters())
    saved = sum((FULL_PRECISION - layer.w_bits) * layer.weight.numel()
                for _, layer in quantized_layers(model))
    fp32_bits = FULL_PRECISION * params
    storage_bits = fp32_bits - saved
    return {"params": int(params), "storage_bits": int(storage_bits), "fp32_bits": int(fp32_bits),
            "compression": float(fp32_bits / storage_bits) if storage_bits else 1.0}


def level_summary(bits: int) -> dict[str, Any]:
    """The DoReFa grid at one bit width, measured on dense inputs (a fact notebooks can show).

    Weights: distinct values of ``dorefa_weight`` over a dense sweep of [-3, 3]; activations:
    distinct values of ``dorefa_activation`` over [-0.5, 1.5]. Above 8 bits the grid is finer
    than any sweep worth printing, so only its size is given; 32 bits is the identity.
    """
    check_bits(bits, "bits")
    if bits == 32:
        return {"bits": 32, "grid": "fp32", "weights_seen": "-", "activations_seen": "-",
                "activation_range": "unclipped", "lowest_weights": "-"}
    row = {"bits": bits, "grid": f"2^{bits} = {2 ** bits}", "weights_seen": "-", "activations_seen": "-",
           "activation_range": "[0, 1]", "lowest_weights": "-"}
    if bits <= 8:
        w = dorefa_weight(torch.linspace(-3.0, 3.0, 20001), bits).unique()
        a = dorefa_activation(torch.linspace(-0.5, 1.5, 20001), bits).unique()
        row.update(weights_seen=len(w), activations_seen=len(a),
                   activation_range=f"[{a.min().item():.0f}, {a.max().item():.0f}]",
                   lowest_weights=", ".join(f"{v:+.3f}" for v in w[:4].tolist()) + (", ..." if len(w) > 4 else ""))
    return row
