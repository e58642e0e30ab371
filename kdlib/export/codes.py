"""A quantized layer's weight as integer levels plus the fp32 arithmetic that rebuilds it exactly.

Three encodings cover every quantizer at every bit width k < 32 (k = 32 is stored as fp32):

==========  ==========================  ===============================================
encoding    levels q                    weight value (float32 ops, in this order)
==========  ==========================  ===============================================
dorefa      0 .. 2^k - 1                ``2 * (q / (2^k - 1)) - 1``  (DoReFa / PACT, k > 1)
lsq         -2^(k-1) .. 2^(k-1) - 1     ``q * step``                 (LSQ, k > 1)
sign        -1, +1                      ``q * scale``  (DoReFa k = 1: scale = E|w|; LSQ k = 1: step)
==========  ==========================  ===============================================

These are the very operations of :mod:`kdlib.quant` (``_RoundSTE`` divides the rounded
integer by 2^k - 1, then ``2 * . - 1``; LSQ multiplies the rounded integer by the step; a
``where(w >= 0, scale, -scale)`` equals ``(+-1) * scale`` bit for bit), so :func:`dequantize`
returns the layer's quantized weight bit for bit. :func:`encode_weight` proves it on every call:
it reads the levels back from the weight the layer actually uses in eval and refuses a layer
whose levels do not rebuild that weight exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from kdlib.quant import LSQQuantizer, lsq_range, quantized_layers
from kdlib.quant.quantizers import positive

FULL_PRECISION = 32
ENCODINGS = ("dorefa", "lsq", "sign")
SCALED_ENCODINGS = ("lsq", "sign")  # levels times a stored fp32 scale; DoReFa's grid is fixed


@dataclass(frozen=True)
class WeightCodes:
    """One layer's quantized weight: ``levels`` (int64, flat) and how to turn them into floats."""

    encoding: str
    bits: int
    shape: tuple[int, ...]
    levels: np.ndarray
    scale: float | None  # an exact float32 value (lsq, sign); None for dorefa

    @property
    def codes(self) -> np.ndarray:
        """The levels as unsigned k-bit codes 0 .. 2^k - 1 (what is packed)."""
        return levels_to_codes(self.encoding, self.bits, self.levels)


def level_range(encoding: str, bits: int) -> tuple[int, int]:
    """Smallest and largest level of ``encoding`` at ``bits``."""
    if encoding == "dorefa":
        return 0, (1 << bits) - 1
    if encoding == "lsq":
        qn, qp = lsq_range(bits, signed=True)
        return -qn, qp
    if encoding == "sign":
        return -1, 1
    raise ValueError(f"encoding={encoding!r} is unknown; accepted: {', '.join(ENCODINGS)}")


def levels_to_codes(encoding: str, bits: int, levels: np.ndarray) -> np.ndarray:
    """Levels -> unsigned codes: offset by the lowest level (sign: -1 -> 0, +1 -> 1)."""
    if encoding == "sign":
        return (levels + 1) // 2
    return levels - level_range(encoding, bits)[0]


def codes_to_levels(encoding: str, bits: int, codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`levels_to_codes`."""
    if encoding == "sign":
        return 2 * codes - 1
    return codes + level_range(encoding, bits)[0]


def dequantize(encoding: str, bits: int, levels: Tensor, scale: Tensor | None) -> Tensor:
    """Float32 weight from float32 ``levels`` (exact integers) with kdlib's own arithmetic.

    Plain tensor ops only, so the same function serves the packed loader and the ONNX graph.
    """
    if encoding == "dorefa":
        return 2 * (levels / ((1 << bits) - 1)) - 1
    if encoding in SCALED_ENCODINGS:
        return levels * scale
    raise ValueError(f"encoding={encoding!r} is unknown; accepted: {', '.join(ENCODINGS)}")


def _encoding_of(layer: nn.Module) -> str:
    if layer.w_bits == 1:
        return "sign"
    return "lsq" if layer.quantizer == "lsq" else "dorefa"  # PACT quantizes weights as DoReFa


def _scale_of(layer: nn.Module, encoding: str, weight_q: Tensor) -> Tensor | None:
    if layer.quantizer == "lsq":
        return positive(layer.weight_quantizer.step).detach().float().cpu()  # the step forward uses
    if encoding == "sign":  # DoReFa: every entry is +-E|w|, so its magnitude is the scale
        return weight_q.abs().amax()
    return None


def levels_of(encoding: str, bits: int, weight_q: Tensor, scale: Tensor | None) -> Tensor:
    """Invert :func:`dequantize` (float64, then rounded: far from any tie)."""
    w = weight_q.double()
    if encoding == "dorefa":
        return ((w + 1) * (((1 << bits) - 1) / 2)).round()
    if encoding == "lsq":
        return (w / scale.double()).round()
    # sign: +1 where the weight has the scale's sign (handles signed zeros and a negative step)
    same_sign = torch.signbit(weight_q) == torch.signbit(scale)
    return torch.where(same_sign, 1.0, -1.0).double()


def check_lsq_initialized(model: nn.Module) -> None:
    """An active LSQ quantizer whose step was never set would set it from the next input."""
    for name, module in model.named_modules():
        if isinstance(module, LSQQuantizer) and module.active and not bool(module.initialized):
            raise ValueError(f"LSQ quantizer {name!r} is not initialised (its step is set by the "
                             "first forward pass): train the model or run one batch through it "
                             "first")


def quantized_weight(layer: nn.Module) -> Tensor:
    """The weight ``layer`` uses in eval (its frozen copy if valid), float32 on the CPU."""
    with torch.no_grad():
        return layer.quantized_weight().detach().float().cpu()


def encode_weight(name: str, layer: nn.Module) -> WeightCodes | None:
    """Levels of ``layer``'s quantized weight, or None for a full-precision (32-bit) weight.

    ValueError if the levels do not rebuild the weight bit for bit (a non-finite scale, or a
    quantizer whose arithmetic this module does not know).
    """
    bits = layer.w_bits
    if bits == FULL_PRECISION:
        return None
    encoding = _encoding_of(layer)
    weight_q = quantized_weight(layer)
    scale = _scale_of(layer, encoding, weight_q)
    levels = levels_of(encoding, bits, weight_q, scale)
    low, high = level_range(encoding, bits)
    exact = (scale is None or bool(torch.isfinite(scale))) and bool(
        levels.min() >= low and levels.max() <= high
        and torch.equal(dequantize(encoding, bits, levels.float(), scale), weight_q))
    if not exact:
        raise ValueError(f"layer {name!r} ({layer.quantizer}, w_bits={bits}): its quantized weight "
                         f"is not {encoding} levels {low}..{high} times an exact float32 scale; "
                         "cannot store it exactly")
    return WeightCodes(encoding, bits, tuple(weight_q.shape), levels.long().reshape(-1).numpy(),
                       None if scale is None else float(scale))


def encode_model_weights(model: nn.Module) -> dict[str, WeightCodes]:
    """``{state_dict key: codes}`` of every quantized (w_bits < 32) layer's weight."""
    check_lsq_initialized(model)
    coded = {}
    for name, layer in quantized_layers(model):
        codes = encode_weight(name, layer)
        if codes is not None:
            coded[f"{name}.weight" if name else "weight"] = codes
    return coded


# ------------------------------------------------------------------ bit packing
def packed_length(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits packed densely."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ``bits``-bit codes into a little-endian bit stream.

    Code i occupies stream bits i*k .. i*k + k - 1, least significant bit first; stream bit j
    is bit j % 8 of byte j // 8. So 8 one-bit codes share a byte, 8-bit codes are one byte
    each, 16-bit codes are little-endian uint16, and 3-bit codes take 3/8 byte each. The last
    byte is zero-padded.
    """
    shifts = np.arange(bits, dtype=np.int64)
    bit_planes = ((codes.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes (int64)."""
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits,
                           bitorder="little")
    return stream.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
