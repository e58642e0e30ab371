"""ONNX export of a quantized kdlib model.

kdlib's quantizers are custom autograd Functions, which no ONNX exporter can translate. The
export therefore runs on a copy of the model whose quantizers are swapped for plain-op modules
that compute the same float32 values:

* a quantized layer's weight becomes an integer initializer (int8 for <= 8 bits, int16 up to
  16) of its levels, turned back into the float weight inside the graph by ``Cast`` and the
  exact arithmetic of :mod:`kdlib.export.codes` (DoReFa: ``2 * (q / (2^k - 1)) - 1``; LSQ and
  1-bit: ``q * scale``). Constant folding is off so the file keeps the integers: ResNet-20 at
  <= 8 bits is 0.38 MB against 1.13 MB in fp32 (weights 4x smaller; the graph's nodes take
  ~80 kB). Below 8 bits the file does not shrink further (int8 is the smallest type these ops
  take; the packed format packs densely). 32-bit weights stay fp32 initializers.
* activations are quantized with ``Clip``/``Mul``/``Div``/``Round`` in kdlib's order (DoReFa:
  clip to [0, 1], times 2^k - 1, round, divide; PACT: times (2^k - 1)/alpha, clip, round, times
  alpha/(2^k - 1); LSQ: divide by the step, clip, round, times the step). ONNX ``Round`` rounds
  half to even, as ``torch.round``.

The graph is exported with the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``,
opset 17; deprecated in torch 2.9+, still present in 2.14): it keeps the integer initializers as
they are. The dynamo exporter (which needs ``onnxscript``) also exports these plain modules, but
its optimiser folds some integer weights back into fp32 constants, and without the optimiser it
writes a file larger than the fp32 one.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.export.codes import WeightCodes, dequantize, encode_model_weights
from kdlib.quant import (DoReFaActivationQuantizer, LSQQuantizer, PACTActivationQuantizer,
                         lsq_range, quantized_layers)
from kdlib.quant.quantizers import positive

__all__ = ["to_onnx", "export_copy", "OPSET"]

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class StoredWeight(nn.Module):
    """A quantized weight: integer levels as an initializer, dequantized in the graph."""

    def __init__(self, codes: WeightCodes):
        super().__init__()
        self.encoding, self.bits = codes.encoding, codes.bits
        # Centre DoReFa's unsigned levels so that k bits fit a signed k-bit integer type.
        self.zero = 1 << (codes.bits - 1) if codes.encoding == "dorefa" else 0
        dtype = torch.int8 if codes.bits <= 8 else torch.int16
        levels = torch.from_numpy(codes.levels - self.zero).to(dtype).reshape(codes.shape)
        self.register_buffer("levels", levels)
        self.register_buffer("scale", None if codes.scale is None
                             else torch.tensor(codes.scale, dtype=torch.float32))

    def forward(self) -> Tensor:  # noqa: D102
        levels = self.levels.float()
        if self.zero:
            levels = levels + self.zero
        return dequantize(self.encoding, self.bits, levels, self.scale)


class PlainDoReFaActivation(nn.Module):
    """round(clamp(x, 0, 1) * n) / n, n = 2^k - 1."""

    def __init__(self, bits: int):
        super().__init__()
        self.levels = (1 << bits) - 1

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return torch.clamp(x, 0.0, 1.0).mul(self.levels).round().div(self.levels)


class PlainPACTActivation(nn.Module):
    """round(clamp(x * (n / alpha), 0, n)) * (alpha / n), both factors computed as kdlib does."""

    def __init__(self, quantizer: PACTActivationQuantizer):
        super().__init__()
        n = (1 << quantizer.bits) - 1
        alpha = positive(quantizer.alpha).detach().float().cpu()  # the clip level forward uses
        self.levels = n
        # `n / alpha` is reciprocal(alpha) * n in torch (Tensor.__rtruediv__): same expression here.
        self.register_buffer("pre", n / alpha)
        self.register_buffer("post", alpha / n)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return torch.clamp(x * self.pre, 0.0, float(self.levels)).round() * self.post


class PlainLSQActivation(nn.Module):
    """round(clamp(x / s, -Qn, Qp)) * s (signed 1 bit: sign instead of round)."""

    def __init__(self, quantizer: LSQQuantizer):
        super().__init__()
        self.qn, self.qp = lsq_range(quantizer.bits, quantizer.signed)
        self.use_sign = quantizer.signed and quantizer.bits == 1
        self.register_buffer("step", positive(quantizer.step).detach().float().cpu())  # as forward

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        v = torch.clamp(x / self.step, float(-self.qn), float(self.qp))
        q = torch.where(v >= 0, 1.0, -1.0) if self.use_sign else v.round()
        return q * self.step


def _plain_activation(quantizer: nn.Module) -> nn.Module:
    if not quantizer.active:
        return nn.Identity()
    if isinstance(quantizer, DoReFaActivationQuantizer):
        return PlainDoReFaActivation(quantizer.bits)
    if isinstance(quantizer, PACTActivationQuantizer):
        return PlainPACTActivation(quantizer)
    if isinstance(quantizer, LSQQuantizer):
        return PlainLSQActivation(quantizer)
    raise ValueError(f"no ONNX form for activation quantizer {type(quantizer).__name__}; "
                     "accepted: DoReFa, PACT, LSQ")


class FloatWeight(nn.Module):
    """A full-precision (32-bit) weight, as a float32 initializer."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().cpu().clone())

    def forward(self) -> Tensor:  # noqa: D102
        return self.weight


class PlainConv2d(nn.Module):
    """A QConv2d as plain ops: conv(quantized input, weight) in float32."""

    def __init__(self, layer: nn.Conv2d, weight: nn.Module, activation: nn.Module):
        super().__init__()
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r}; accepted: 'zeros'")
        self.weight, self.activation = weight, activation
        self.register_buffer("bias", None if layer.bias is None
                             else layer.bias.detach().float().clone())
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.conv2d(self.activation(x), self.weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class PlainLinear(nn.Module):
    """A QLinear as plain ops: linear(quantized input, weight) in float32."""

    def __init__(self, layer: nn.Linear, weight: nn.Module, activation: nn.Module):
        super().__init__()
        self.weight, self.activation = weight, activation
        self.register_buffer("bias", None if layer.bias is None
                             else layer.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.linear(self.activation(x), self.weight(), self.bias)


def _plain_layer(layer: nn.Module, codes: WeightCodes | None) -> nn.Module:
    weight = StoredWeight(codes) if codes is not None else FloatWeight(layer.weight)
    activation = _plain_activation(layer.input_quantizer)
    if isinstance(layer, nn.Conv2d):
        return PlainConv2d(layer, weight, activation)
    if isinstance(layer, nn.Linear):
        return PlainLinear(layer, weight, activation)
    raise ValueError(f"no ONNX form for quantized layer {type(layer).__name__}; accepted: "
                     "QConv2d, QLinear")


def export_copy(model: nn.Module) -> nn.Module:
    """A CPU eval copy of ``model`` whose quantized layers are plain-op modules.

    It computes what kdlib computes on the CPU: the layer op in float32 on the quantized input
    and the quantized weight (the weights are read from ``model`` on its own device: those it
    really uses in eval).
    """
    coded = encode_model_weights(model)
    plain = copy.deepcopy(model).cpu().eval()
    for name, layer in quantized_layers(plain):
        if not name:
            raise ValueError("the model is a single quantized layer; export a model that "
                             "contains it")
        parent_name, _, child = name.rpartition(".")
        parent = plain.get_submodule(parent_name)
        setattr(parent, child, _plain_layer(layer, coded.get(f"{name}.weight")))
    return plain.eval().requires_grad_(False)  # eval() again: the plain modules are new


def to_onnx(model: nn.Module, path: str | os.PathLike, *,
            input_shape: tuple[int, ...] = (3, 32, 32), opset: int = OPSET) -> Path:
    """Write an ONNX graph of ``model`` (its eval-mode computation) to ``path``; returns the path.

    Input ``images``: float32 ``[batch, *input_shape]`` (normalised images, as kdlib feeds the
    model), dynamic batch; output ``logits``. Weights and quantizers are read from ``model``
    (LSQ quantizers must be initialised); ``model`` itself is not changed. Needs the ``onnx``
    package (the ``export`` extra).

    ONNX Runtime computes the same operations on the same values, but its convolutions sum in
    another order (PyTorch's own order changes with the batch size, too). A pre-activation within
    that rounding error of a rounding tie of the next activation quantizer then lands one level
    away, and the flip propagates. Images on which no activation code flips get logits within
    1e-4 of kdlib's; the others do not, and no graph can meet 1e-4 on every image, as kdlib's CPU
    convolutions of fp32 values round in PyTorch's summation order (convolving exact integer
    codes in the graph, as kdlib does on CUDA, agrees less well with kdlib on the CPU). How many
    images flip, and how often the top-1 class still agrees, is measured on the committed models
    by ``python -m kdlib onnx`` (:mod:`kdlib.export.agreement`; README "Use a trained model").
    """
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("to_onnx needs the onnx package: pip install -e '.[export]' (or onnx "
                          "onnxruntime)")
    plain = export_copy(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, *input_shape)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation, and that it cannot fold the
        # strided slices of the option-A shortcut (folding is off anyway).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        torch.onnx.export(plain, (example,), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return path
