"""Quantization: straight-through ops, quantizer modules, quantized layers, transfer and size.

Five files, one concern each (brevitas-style), all re-exported here:

* :mod:`kdlib.quant.ste` -- functional straight-through ops (round, DoReFa, PACT, LSQ)
* :mod:`kdlib.quant.quantizers` -- one quantizer of one tensor as an ``nn.Module``
* :mod:`kdlib.quant.layers` -- ``QConv2d`` / ``QLinear`` and frozen teacher weights
* :mod:`kdlib.quant.transfer` -- moving weights between bit widths, model size, grid facts
* :mod:`kdlib.quant.grouped` -- every layer's DoReFa weights quantized at once (same bits,
  fewer kernels)


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
  for bf16/fp16 inputs; the result is cast back to the input's dtype. Quantized layers ignore
  autocast and compute the exact quantized result, unless set to the bf16 mode
  (:func:`set_precision`, see :mod:`kdlib.quant.layers`).
* **bits = 32** means "not quantized": every quantizer is then the identity. Quantizer
  submodules exist at every bit width so that ``state_dict`` keys do not depend on the bits;
  learnable quantizer parameters of an identity quantizer get ``requires_grad=False`` (they
  are unused, so they would never receive a gradient anyway).
* **No ``.item()`` and no branching on tensor values** in any forward: everything here is
  ``torch.compile``-friendly (the only exception is LSQ's one-time initialisation from the first
  batch, which runs eagerly once).
"""
from __future__ import annotations

from kdlib.checks import FULL_PRECISION, QUANTIZERS, check_quantizer
from kdlib.quant.grouped import (dorefa_weights, quantize_weights_together, set_weight_grouping,
                                 weights_quantized_together)
from kdlib.quant.layers import (PRECISIONS, QConv2d, QLinear, freeze_quantized_weights,
                                quantized_layers, set_precision, unfreeze_quantized_weights)
from kdlib.quant.quantizers import (MIN_SCALE, PACT_ALPHA_INIT, DoReFaActivationQuantizer,
                                    DoReFaWeightQuantizer, LSQQuantizer, PACTActivationQuantizer,
                                    Quantizer, make_quantizers, positive)
from kdlib.quant.ste import (dorefa_activation, dorefa_activation_codes, dorefa_weight,
                             lsq_quantize, lsq_range, pact_activation, quantize_k)
from kdlib.quant.transfer import level_summary, model_size_report, transfer_weights

__all__ = [
    "QUANTIZERS", "FULL_PRECISION", "PACT_ALPHA_INIT", "check_quantizer", "quantize_k",
    "dorefa_weight", "dorefa_activation", "dorefa_activation_codes", "pact_activation",
    "lsq_range", "lsq_quantize",
    "Quantizer", "DoReFaWeightQuantizer", "DoReFaActivationQuantizer", "PACTActivationQuantizer",
    "LSQQuantizer", "make_quantizers", "positive", "MIN_SCALE", "QConv2d", "QLinear",
    "quantized_layers", "freeze_quantized_weights", "unfreeze_quantized_weights",
    "set_precision", "PRECISIONS", "transfer_weights",
    "model_size_report", "level_summary", "dorefa_weights", "quantize_weights_together",
    "weights_quantized_together", "set_weight_grouping",
]
