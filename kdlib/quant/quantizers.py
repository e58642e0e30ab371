"""Quantizer modules: one quantizer of one tensor at one bit width (32 = identity)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdlib.checks import FULL_PRECISION, check_bits, check_quantizer
from kdlib.quant.ste import (dorefa_activation, dorefa_activation_codes, dorefa_weight, grid_levels,
                             grid_step, lsq_quantize, lsq_range, pact_activation, round_ste)

PACT_ALPHA_INIT = 10.0  # the PACT paper's initial clip level


MIN_SCALE = 1e-8  # smallest PACT clip level / LSQ step a forward uses


def positive(scale: Tensor) -> Tensor:
    """``max(scale, MIN_SCALE)`` with the gradient of the identity: a learned clip level or step
    that an optimizer step pushed to <= 0 still gives a valid grid (no division by zero, no
    flipped sign) and still receives the gradient that can move it back."""
    # the clamp on the detached value: clamp_min passes a gradient of 1 above MIN_SCALE itself,
    # which the identity term added to (a scale learned at twice its gradient, recipe < 3)
    return scale.detach().clamp_min(MIN_SCALE) + (scale - scale.detach())  # value exact, grad 1


class Quantizer(nn.Module):
    """Base class: one quantizer of one tensor, at ``bits`` (32 = identity).

    ``reset_state()`` re-initialises learned quantizer state; :func:`transfer_weights` calls
    it when the bit width differs between the source and the destination model.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)

    @property
    def active(self) -> bool:
        return self.bits != FULL_PRECISION

    @property
    def absorbs_relu(self) -> bool:
        """Whether ``self(relu(x))`` equals ``self(x)`` bit for bit, gradient included, so that
        a ReLU whose output only this quantizer reads can be left out."""
        return False

    def reset_state(self) -> None:
        """Re-initialise learned state (nothing to do for parameter-free quantizers)."""

    def scale(self, q: Tensor) -> Tensor | float:
        """The fp32 step of this quantizer's grid for its output ``q``, detached: ``q / scale``
        is a tensor of integer codes (of at most ``bits`` bits plus sign)."""
        raise NotImplementedError(f"{type(self).__name__} has no integer grid")

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        """(integer codes, step) of ``self(x)``: the codes ``round(self(x) / step)`` with a
        straight-through round. A quantizer may compute them more directly, with the same
        values and gradients."""
        q = self(x)
        step = self.scale(q)
        return round_ste(q / step), step

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DoReFaWeightQuantizer(Quantizer):
    """:func:`dorefa_weight` as a module.

    Codes: ``(2r - n)`` for k > 1 bits (odd integers in [-n, n], n = 2^k - 1, step 1/n); ±1 at
    1 bit, step E|w| (every element of the 1-bit weight has that magnitude).
    """

    def scale(self, q: Tensor) -> Tensor | float:  # noqa: D102
        if self.bits == 1:
            return q.detach().float().abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        return grid_step(self.bits)

    def forward(self, w: Tensor) -> Tensor:  # noqa: D102
        return dorefa_weight(w, self.bits) if self.active else w


class DoReFaActivationQuantizer(Quantizer):
    """:func:`dorefa_activation` as a module. Codes 0..n, step 1/n (n = 2^k - 1)."""

    @property
    def absorbs_relu(self) -> bool:
        """Active, it clips to [0, 1] (``clamp(relu(x), 0, 1) == clamp(x, 0, 1)``, -0.0 as
        -0.0) and passes gradient only where 0 < x < 1, inside the ReLU's x > 0."""
        return self.active

    def scale(self, q: Tensor) -> Tensor | float:  # noqa: D102
        return grid_step(self.bits)

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor | float]:  # noqa: D102
        if not self.active:
            return super().codes(x)
        return dorefa_activation_codes(x, self.bits), grid_step(self.bits)  # no divide and round

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return dorefa_activation(x, self.bits) if self.active else x


class PACTActivationQuantizer(Quantizer):
    """PACT activations with a learned clip level ``alpha`` (one scalar per layer).

    Put ``alpha`` under weight decay (the paper regularises it with L2) so it can shrink.
    """

    def __init__(self, bits: int, alpha_init: float = PACT_ALPHA_INIT):
        super().__init__(bits)
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.tensor(self.alpha_init), requires_grad=self.active)

    def reset_state(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return pact_activation(x, positive(self.alpha), self.bits) if self.active else x

    def scale(self, q: Tensor) -> Tensor | float:  # noqa: D102
        return positive(self.alpha).detach().float() / grid_levels(self.bits)  # codes 0..n

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha_init={self.alpha_init}"


class LSQQuantizer(Quantizer):
    """LSQ with a learned step size (one scalar per tensor), for weights or activations.

    The step is initialised from the first tensor it sees, ``2 mean|x| / sqrt(Qp)`` as in the
    paper (signed 1 bit: ``mean|x|``, the least-squares scale of a binary tensor). Whether
    that happened is kept in the ``initialized`` buffer (so checkpoints carry it) mirrored by a
    Python flag, so the forward pass never reads a tensor value.

    Gradient scale g = 1 / sqrt(N Qp) (Qp >= 1): N is the number of weights for weights and the
    number of features *per example* (C*H*W) for activations; this is the paper's N_F and it
    keeps g independent of the batch size (the loss is a batch mean).
    """

    def __init__(self, bits: int, signed: bool):
        super().__init__(bits)
        self.signed = bool(signed)
        self.step = nn.Parameter(torch.tensor(1.0), requires_grad=self.active)
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False

    def reset_state(self) -> None:
        """Forget the step: the next forward re-initialises it from its input."""
        with torch.no_grad():
            self.step.fill_(1.0)
            self.initialized.fill_(False)
        self._initialized = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = bool(self.initialized)  # once per load, never in forward

    def _init_step(self, x: Tensor) -> None:
        qn, qp = lsq_range(self.bits, self.signed)
        mean_abs = x.detach().float().abs().mean()
        value = mean_abs if (self.signed and self.bits == 1) else 2 * mean_abs / math.sqrt(qp)
        with torch.no_grad():
            self.step.copy_(value.clamp_min(torch.finfo(torch.float32).eps))
            self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not self.active:
            return x
        if not self._initialized:
            self._init_step(x)
        per_example = x.numel() if self.signed else x.numel() // max(x.shape[0], 1)
        qp = max(lsq_range(self.bits, self.signed)[1], 1)
        return lsq_quantize(x, positive(self.step), self.bits, self.signed,
                            (per_example * qp) ** -0.5)

    def scale(self, q: Tensor) -> Tensor | float:  # noqa: D102
        return positive(self.step).detach().float()  # codes -Qn..Qp (signed 1 bit: -1, +1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def make_quantizers(quantizer: str, w_bits: int, a_bits: int) -> tuple[Quantizer, Quantizer]:
    """(weight quantizer, input-activation quantizer) of the named family."""
    check_quantizer(quantizer)
    w_bits, a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
    if quantizer == "lsq":
        return LSQQuantizer(w_bits, signed=True), LSQQuantizer(a_bits, signed=False)
    act = (PACTActivationQuantizer(a_bits) if quantizer == "pact"
           else DoReFaActivationQuantizer(a_bits))
    return DoReFaWeightQuantizer(w_bits), act
