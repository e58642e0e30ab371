"""Argument checks shared by every layer of kdlib: bit widths, quantizer names, class counts.

The bottom of the house: it imports nothing from kdlib, so the config, the quantizers and the
model registry can all use it without importing each other.
"""
from __future__ import annotations

from typing import Any

FULL_PRECISION = 32  # "bits = 32" means not quantized
SUPPORTED_BITS_HINT = "an integer in 1..16 or 32 (usual: 1, 2, 3, 4, 8, 16, 32)"
QUANTIZERS = ("dorefa", "pact", "lsq")
PRECISIONS = ("exact", "bf16")  # how quantized layers compute: see kdlib.quant.layers
MIN_CLASSES = 2  # a classifier needs two classes at least

BitsSpec = int | str | tuple[int, int]


def check_bits(value: Any, name: str = "bits") -> int:
    """Accept 1..16 or 32 (ints only); anything else -> ValueError naming value and range."""
    if (isinstance(value, bool) or not isinstance(value, int)
            or not (1 <= value <= 16 or value == 32)):
        raise ValueError(f"{name}={value!r} is not supported; accepted: {SUPPORTED_BITS_HINT}")
    return value


def check_quantizer(name: Any) -> str:
    """Accept one of :data:`QUANTIZERS`; anything else -> ValueError listing them."""
    if not isinstance(name, str) or name not in QUANTIZERS:
        raise ValueError(f"quantizer={name!r} is unknown; accepted: {', '.join(QUANTIZERS)}")
    return name


def check_num_classes(value: Any) -> int:
    """Accept an integer >= :data:`MIN_CLASSES`; anything else -> ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_CLASSES:
        raise ValueError(f"num_classes={value!r} is invalid; expected an integer >= {MIN_CLASSES}")
    return value


def parse_bits(spec: BitsSpec) -> tuple[int, int]:
    """``4`` or ``"4"`` -> (4, 4); ``"4/8"`` or ``(4, 8)`` -> weights 4, activations 8."""
    if isinstance(spec, str) and "/" in spec:
        try:
            w, a = (int(p) for p in spec.split("/"))
        except ValueError:
            raise ValueError(f"bits={spec!r} is not 'W/A' with integer W and A, "
                             "e.g. '4/8'") from None
    elif isinstance(spec, str) and spec.strip().isdigit():
        w = a = int(spec)
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        w, a = spec
    else:
        w = a = spec
    return check_bits(w, "w_bits"), check_bits(a, "a_bits")


def format_bits(w_bits: int, a_bits: int) -> int | str:
    """The inverse of :func:`parse_bits`: ``4`` when weights and activations agree, else
    ``"4/8"``."""
    return w_bits if w_bits == a_bits else f"{w_bits}/{a_bits}"
