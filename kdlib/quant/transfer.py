"""Model-level helpers: move weights between bit widths, count storage, describe the grid."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdlib.checks import FULL_PRECISION, check_bits
from kdlib.quant.layers import quantized_layers
from kdlib.quant.quantizers import Quantizer
from kdlib.quant.ste import dorefa_activation, dorefa_weight


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
    row = {"bits": bits, "grid": f"2^{bits} = {2 ** bits}", "weights_seen": "-",
           "activations_seen": "-", "activation_range": "[0, 1]", "lowest_weights": "-"}
    if bits <= 8:
        w = dorefa_weight(torch.linspace(-3.0, 3.0, 20001), bits).unique()
        a = dorefa_activation(torch.linspace(-0.5, 1.5, 20001), bits).unique()
        row.update(weights_seen=len(w), activations_seen=len(a),
                   activation_range=f"[{a.min().item():.0f}, {a.max().item():.0f}]",
                   lowest_weights=(", ".join(f"{v:+.3f}" for v in w[:4].tolist())
                                   + (", ..." if len(w) > 4 else "")))
    return row
