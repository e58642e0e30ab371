"""The benchmark's targets and informational ratios, computed from one run's measurements.

Each ratio is ``quantity[numerator] / quantity[denominator]`` of the same run, where the
quantity is the median step time (``step_ms``; a speed-up of B over A is then
``step_ms[A] / step_ms[B]``) or the achieved GFLOP/s (``gflops``), and a name is a variant or a
matmul ceiling (``matmul_fp32``, ``matmul_bf16``).
"""
from __future__ import annotations

from typing import Any

CEILINGS = ("matmul_fp32", "matmul_bf16")

# name -> (what, quantity, numerator, denominator, comparison, target)
TARGETS: dict[str, tuple[str, str, str, str, str, float]] = {
    "kd_w4_of_fp32_ceiling": ("exact KD step (c) `kd_w4`, achieved GFLOP/s / fp32 matmul ceiling",
                              "gflops", "kd_w4", "matmul_fp32", ">=", 0.85),
    "bf16_kd_speedup": ("bf16-mode KD step speed-up over exact (c), step time kd_w4 / kd_w4_bf16",
                        "step_ms", "kd_w4", "kd_w4_bf16", ">=", 1.4),
    "quant_overhead_w4": ("quantization overhead, plain 4-bit / 32-bit step time",
                          "step_ms", "w4a4", "fp32", "<=", 1.05),
}
# Informational ratios (no target), same definition.
INFO_RATIOS: dict[str, tuple[str, str, str, str]] = {
    "kd_speedup_vs_typical": ("KD step speed-up, kdlib (c) vs typical pipeline (d)",
                              "step_ms", "kd_w4_typical", "kd_w4"),
    "quant_overhead_w1": ("quantization overhead, plain 1-bit / 32-bit step time",
                          "step_ms", "w1a1", "fp32"),
    "kd_overhead_w4": ("KD overhead, KD 4-bit (c) / plain 4-bit step time",
                       "step_ms", "kd_w4", "w4a4"),
    "channels_last_speedup": ("channels_last speed-up of (c), step time NCHW / channels_last",
                              "step_ms", "kd_w4_nchw", "kd_w4_channels_last"),
    "compile_speedup": ("torch.compile speed-up of (c)", "step_ms", "kd_w4", "kd_w4_compile"),
    "fp32_of_fp32_ceiling": ("plain 32-bit step (a), achieved GFLOP/s / fp32 matmul ceiling",
                             "gflops", "fp32", "matmul_fp32"),
    "bf16_kd_of_bf16_ceiling": ("bf16-mode KD step, achieved GFLOP/s / bf16 matmul ceiling",
                                "gflops", "kd_w4_bf16", "matmul_bf16"),
    "data_speedup_vs_typical": ("data pipeline alone, kdlib vs typical (time per batch, typical / "
                                "kdlib; it bounds (c)/(d) where the model step is short, e.g. on "
                                "a GPU)",
                                "step_ms", "data_typical", "data_kdlib"),
}


def _quantity(name: str, quantity: str, variants: dict[str, dict[str, Any]],
              ceilings: dict[str, dict[str, Any]]) -> float | None:
    entry = ceilings.get(name) if name in CEILINGS else variants.get(name)
    if not entry or entry.get("status") != "ok":
        return None
    return entry.get(quantity)


def compute_ratios(variants: dict[str, dict[str, Any]],
                   ceilings: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Every :data:`TARGETS` and :data:`INFO_RATIOS` ratio (value None if a side was not
    measured; ``met`` None if not measured or without a target)."""
    ceilings = ceilings or {}
    specs = ([(k, *v) for k, v in TARGETS.items()]
             + [(k, *v, None, None) for k, v in INFO_RATIOS.items()])
    out = {}
    for key, what, quantity, num, den, op, target in specs:
        a = _quantity(num, quantity, variants, ceilings)
        b = _quantity(den, quantity, variants, ceilings)
        value = a / b if a is not None and b else None
        met = None
        if value is not None and target is not None:
            met = value >= target if op == ">=" else value <= target
        out[key] = {"what": what, "value": value, "quantity": quantity, "numerator": num,
                    "denominator": den, "definition": f"{quantity}[{num}] / {quantity}[{den}]",
                    "target": target, "op": op, "met": met}
    return out
