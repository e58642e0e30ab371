"""Does torch.compile keep the quantizers' low-bit arithmetic exact on a device?

Triton's ``/`` on float32 is an approximate division (``div.full.f32``, up to 2 ulp;
triton-lang/triton#10661), and Inductor lowers float32 true division to ``div_rn`` only since
pytorch/pytorch#164144 (late 2025); an approximate division would make some grid values one ulp
off k/n, as CUDA's eager division by a Python number did (see
:func:`kdlib.quant.ste._div_levels_`). So :func:`check_levels` checks, on the device, the
compiled DoReFa quantizers (training mode: inputs that need gradients) at each bit width:

* activations: every level is float32(k / n) bit for bit (inputs that round to each k);
* weights: every value rebuilds from integer levels with the packed export's arithmetic
  (:func:`kdlib.export.codes.dequantize`), as the eager weights must.

Where compiled and eager pick different levels (a value within float error of a rounding
midpoint after tanh, whose compiled and eager kernels may differ by an ulp), that is counted,
not failed: both are exact levels.

:func:`require_exact_levels` is the guard every compiled run passes before it trains
(:func:`kdlib.step.make_trainer`): the check at the widths of its quantized layers, once per
process and device, and a RuntimeError naming the fix where a level is not exact. The GPU
benchmark records the same check (:mod:`kdlib.bench.compiled`), to decide whether to compile.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from kdlib.quant import dorefa_activation, dorefa_weight, quantized_layers

CHECK_BITS = (2, 4, 8, 16)  # 1 bit divides by 1 (activations) or takes a sign (weights)
WEIGHTS = 4096  # the fewest weights a bit width is checked on
_checked: dict[tuple[str, int], dict[str, Any]] = {}  # (device, bits) -> check_levels' entry


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops the one warning torch's C++-extension helper logs the first time Inductor loads it
    in a CUDA build of torch on a machine without a GPU ("No CUDA runtime is found, using
    CUDA_HOME=..."): a compiled run on the CPU needs no CUDA, and the line read as a broken
    installation. Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


# before any compile: every compiled run checks its levels here first (kdlib.step.make_trainer)
logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())


def compile_for_check(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def check_levels(device: str | torch.device, bits: Sequence[int] = CHECK_BITS,
                 compile_fn: Callable[[Callable], Callable] | None = None) -> dict[str, Any]:
    """``{"exact": bool, "by_bits": {k: {"activation_exact", "weight_exact",
    "weight_levels_unlike_eager"}}}`` for the compiled quantizers on ``device``."""
    from kdlib.export.codes import dequantize, levels_of

    device = torch.device(device)
    compile_fn = compile_fn or compile_for_check
    by_bits: dict[str, dict[str, Any]] = {}
    for b in bits:
        n = (1 << b) - 1
        k = torch.arange(n + 1, dtype=torch.float64)
        expected = (k / n).float()
        x = ((k + 0.2) / n).clamp(max=1.0).float().to(device).requires_grad_()
        w = check_weights(b).to(device).requires_grad_()

        def quantize(x, w, b=b):
            return dorefa_activation(x, b), dorefa_weight(w, b)

        activation, weight = (t.detach().cpu() for t in compile_fn(quantize)(x, w))
        eager = dorefa_weight(w, b).detach().cpu()
        levels = levels_of("dorefa", b, weight, None)
        by_bits[str(b)] = {
            "activation_exact": bool(torch.equal(activation, expected)),
            "weight_exact": bool(levels.min() >= 0 and levels.max() <= n and torch.equal(
                dequantize("dorefa", b, levels.float(), None), weight)),
            "weight_levels_unlike_eager": int((weight != eager).sum()),
        }
    exact = all(e["activation_exact"] and e["weight_exact"] for e in by_bits.values())
    return {"exact": exact, "by_bits": by_bits}


def check_weights(bits: int) -> torch.Tensor:
    """At least :data:`WEIGHTS` weights, two or more a level, whose tanh runs evenly over
    [-1/2, 1/2], ends included: every DoReFa level of ``bits`` is reached, both extremes too
    (Gaussian weights reached 206 of 256 at 8 bits and one extreme only), so a compiled
    division off at one level cannot go unseen. The same weights every time."""
    count = max(WEIGHTS, 2 ** (bits + 1) + 1)
    return torch.atanh(torch.linspace(-1, 1, count, dtype=torch.float64) / 2).float()


def widths_to_check(nets: Iterable[nn.Module]) -> list[int]:
    """The bit widths of ``nets``' quantized layers whose compiled levels :func:`check_levels`
    checks (1 bit divides by 1 or takes a sign; 32 is not quantized). ValueError for a layer
    of another quantizer than DoReFa, whose compiled levels nothing checks."""
    bits = set()
    for net in nets:
        for name, layer in quantized_layers(net):
            if layer.quantizer != "dorefa":
                raise ValueError(f"compile=True with quantizer={layer.quantizer!r} (layer {name}): "
                                 "only DoReFa's compiled levels are checked exact; set "
                                 "compile=False")
            bits |= {layer.w_bits, layer.a_bits}
    return sorted(b for b in bits if 1 < b < 32)


def require_exact_levels(nets: Iterable[nn.Module], device: str | torch.device,
                         compile_fn: Callable[[Callable], Callable] | None = None) -> None:
    """Refuse (RuntimeError) to train ``nets`` compiled on ``device`` unless the compiled
    quantizers keep every level exact at their widths (:func:`check_levels`; each width once
    per process and device)."""
    device = torch.device(device)
    for b in widths_to_check(nets):
        key = (str(device), b)
        if key not in _checked:
            result = check_levels(device, bits=(b,), compile_fn=compile_fn)
            _checked[key] = result["by_bits"][str(b)]
        entry = _checked[key]
        if not (entry["activation_exact"] and entry["weight_exact"]):
            raise RuntimeError(
                f"torch.compile does not keep the {b}-bit quantizer levels exact on {device} "
                f"({entry}): this run would not compute what its config says. Set compile=False "
                "(the preset's, or --set compile=False)")
