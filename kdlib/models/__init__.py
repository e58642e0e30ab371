"""A tiny timm-style model registry: ``register_model``, ``create_model``, ``list_models``.

Every model is built from :class:`kdlib.quant.QConv2d` / :class:`kdlib.quant.QLinear`, so one
constructor gives the same depth and width at every bit width (only precision changes) and
the same ``state_dict`` keys, which is what lets :func:`kdlib.quant.transfer_weights` move
weights along the teacher-assistant chain.

A registered constructor takes ``num_classes, w_bits, a_bits, quantizer, quantize_first_last``
as keyword arguments (plus its own extras) and returns an ``nn.Module`` mapping normalised
images ``[B, 3, 32, 32]`` to logits ``[B, num_classes]``.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from kdlib.checks import check_bits, check_num_classes, check_quantizer

__all__ = ["register_model", "create_model", "list_models"]

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Decorator: register ``fn`` under its ``__name__``; returns ``fn`` unchanged."""
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 100, w_bits: int = 32, a_bits: int = 32,
                 quantizer: str = "dorefa", quantize_first_last: bool = False,
                 **kw: Any) -> nn.Module:
    """Build the registered model ``name``; arguments are validated before anything is built.

    ``quantize_first_last=False`` (default) keeps the first conv and the last classifier layer
    in full precision, as in DoReFa-Net and most low-bit papers.
    """
    if name not in _REGISTRY:
        raise ValueError(f"model={name!r} is unknown; accepted: {', '.join(list_models())}")
    check_num_classes(num_classes)
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    check_quantizer(quantizer)
    if not isinstance(quantize_first_last, bool):
        raise ValueError(f"quantize_first_last={quantize_first_last!r} is invalid; expected True "
                         "or False")
    return _REGISTRY[name](num_classes=num_classes, w_bits=w_bits, a_bits=a_bits,
                           quantizer=quantizer, quantize_first_last=quantize_first_last, **kw)


# Importing the model modules registers their constructors (after register_model exists).
from kdlib.models import resnet_cifar, squeezenet  # noqa: E402,F401
