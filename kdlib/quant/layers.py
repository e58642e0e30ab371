"""Quantized layers (``QConv2d``, ``QLinear``) and frozen quantized weights for a fixed teacher."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.checks import FULL_PRECISION, check_bits, check_quantizer
from kdlib.quant.quantizers import make_quantizers


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
