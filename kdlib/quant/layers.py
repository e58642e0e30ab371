"""Quantized layers (``QConv2d``, ``QLinear``) and frozen quantized weights for a fixed teacher.

How a quantized layer computes (its ``precision``, set for a whole model by :func:`set_precision`):

=============  ==============================================  ==================================
precision      <= 8-bit weights and inputs                     other quantized layers (9-16 bits,
                                                               or an unquantized input)
=============  ==============================================  ==================================
``exact``      CPU: fp32 on the quantized values. CUDA: the    fp32, TF32 off
(default)      integer codes in fp32 with TF32 allowed (codes
               up to 2^11 are exact in TF32), times the fp32
               scales
``bf16``       the integer codes as bf16 operands (exact),     fp32, TF32 off
               output rounded to bf16 by the convolution
               (relative error <= 2^-8), times the fp32 scales
=============  ==============================================  ==================================

A quantized layer ignores any ``torch.autocast`` around it: autocast would round its operands
and its output (16-bit activations would collapse to ~1,300 values, 8-bit levels would leave
their grid). Layers with neither weights nor inputs quantized (the full-precision first and
last layers, a 32-bit teacher) are ordinary layers and follow autocast. Quantizers always run
in fp32, and the layer's input is cast to fp32 before it is quantized. Gradients are fp32.
Latent weights stay fp32 too: a model cast whole (``.bfloat16()``, ``.half()``) is refused at
its first quantized layer, which names the ``bf16`` mode.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.checks import FULL_PRECISION, PRECISIONS, check_bits, check_quantizer
from kdlib.quant.quantizers import DoReFaWeightQuantizer, make_quantizers
from kdlib.quant.ste import round_ste

CODE_BITS_MAX = 8  # integer codes of up to 8 bits (+ sign) are exact as bf16 and TF32 operands


class _QuantizedLayer:
    """Shared part of :class:`QConv2d` / :class:`QLinear`.

    The full-precision ``weight`` stays the Parameter the optimizer updates; forward uses the
    quantized copy. ``input_quantizer`` quantizes the layer's input (which must be a post-ReLU,
    non-negative activation for DoReFa/PACT/unsigned LSQ); with ``quantize_input=False`` it is
    built at 32 bits, i.e. the identity.
    """

    weight: nn.Parameter

    def _init_quantizers(self, w_bits: int, a_bits: int, quantizer: str,
                         quantize_input: bool) -> None:
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
        self.precision = "exact"
        # this forward's quantized weight when the model quantized its layers' weights together
        # (kdlib.quant.grouped.quantize_weights_together); None otherwise
        self.pass_weight: Tensor | None = None

    @property
    def is_quantized(self) -> bool:
        return self.weight_quantizer.active or self.input_quantizer.active

    @property
    def input_absorbs_relu(self) -> bool:
        """A ReLU whose output only this layer reads changes nothing here (its input quantizer
        clips at zero, gradient included): the model may leave that ReLU out."""
        return self.input_quantizer.absorbs_relu

    @property
    def has_integer_codes(self) -> bool:
        """Weights and inputs both on grids of <= CODE_BITS_MAX bits."""
        return (self.weight_quantizer.active and self.input_quantizer.active
                and self.w_bits <= CODE_BITS_MAX and self.a_bits <= CODE_BITS_MAX)

    def _compute(self, x: Tensor, op: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
        """``op(input, weight, bias)`` the way this layer's precision says (module docstring)."""
        if not self.is_quantized:
            return op(x, self.weight, self.bias)
        if self.weight.element_size() < 4:
            raise TypeError(f"a quantized layer's weights are {self.weight.dtype}: they stay fp32 "
                            "(the levels and the optimizer's steps need it), so a model is not "
                            "cast with .bfloat16() or .half(); for bf16 arithmetic use "
                            "precision='bf16' (--set precision=bf16, or "
                            "kdlib.quant.set_precision(model, 'bf16'))")
        wq = _at_least_fp32(self.quantized_weight())
        with torch.autocast(device_type=x.device.type, enabled=False):
            on_codes = self.has_integer_codes and (self.precision == "bf16" or x.is_cuda)
            if on_codes:
                dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
                x_codes, sx = self.input_quantizer.codes(_at_least_fp32(x))
                sw = self.weight_quantizer.scale(wq)
                out = op(x_codes.to(dtype), round_ste(wq / sw).to(dtype), None)
                return self._add_bias(out.float() * (sx * sw))
            xq = self.input_quantizer(_at_least_fp32(x))
            with _no_tf32(x.device):
                return op(xq, wq, self.bias)

    def _add_bias(self, out: Tensor) -> Tensor:
        if self.bias is None:
            return out
        shape = (1, -1) + (1,) * (out.dim() - 2)  # conv: per channel; linear: last dim
        return out + self.bias.to(out.dtype).view(shape)

    def quantized_weight(self) -> Tensor:
        """The weight used in forward: frozen copy if valid, else the one quantized together
        with the model's other layers for this forward, else freshly quantized."""
        if self._frozen_valid():
            return self.frozen_weight
        if self.pass_weight is not None:  # set only for an eager forward, cleared after it
            return self.pass_weight
        return self.weight_quantizer(self.weight)

    def _frozen_valid(self) -> bool:
        return (self.frozen_weight is not None
                and not (torch.is_grad_enabled() and self.weight.requires_grad)
                and (torch.compiler.is_compiling() or self.weight._version == self._frozen_version))

    def quantizes_weight_afresh(self) -> bool:
        """Whether this forward quantizes the weight with DoReFa (no valid frozen copy): what
        :func:`kdlib.quant.grouped.quantize_weights_together` may do for it instead."""
        return (isinstance(self.weight_quantizer, DoReFaWeightQuantizer)
                and self.weight_quantizer.active and not self._frozen_valid())

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
        return self._compute(x, self._conv_forward)

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
        return self._compute(x, F.linear)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + self._quant_repr()


def quantized_layers(model: nn.Module) -> list[tuple[str, _QuantizedLayer]]:
    """(name, layer) of every QConv2d / QLinear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantizedLayer)]


def _at_least_fp32(t: Tensor) -> Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 stay as they are."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Set how every quantized layer of ``model`` computes: ``"exact"`` or ``"bf16"`` (see the
    module docstring). Returns ``model``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; accepted: {', '.join(PRECISIONS)}")
    for _, layer in quantized_layers(model):
        layer.precision = precision
    return model


def _no_tf32(device: torch.device):
    """TF32 off for the cuDNN convolutions and matmuls inside (CUDA only)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return _cuda_fp32_context()


@contextlib.contextmanager
def _cuda_fp32_context():
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


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
