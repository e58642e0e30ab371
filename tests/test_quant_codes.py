"""The integer codes of DoReFa activations computed directly: the codes path's values and
gradients bit for bit, in three kernels instead of six."""
from __future__ import annotations

import copy

import pytest
import torch

from kdlib.bench.measure import count_ops
from kdlib.models import create_model
from kdlib.quant import QConv2d, dorefa_activation, dorefa_activation_codes, set_precision
from kdlib.quant.quantizers import DoReFaActivationQuantizer, Quantizer
from kdlib.quant.ste import round_ste

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def post_relu(n: int, bits: int, device: str) -> torch.Tensor:
    """Every level, the midpoints between levels, values above the clip, and exact 0s and 1s."""
    levels = (1 << bits) - 1
    k = torch.arange(levels + 1, dtype=torch.float64)
    special = torch.cat([k / levels, (k + 0.5) / levels,
                         torch.tensor([0.0, 1.0, 1.5, 3.0])]).float()
    gen = torch.Generator().manual_seed(bits)
    return torch.cat([special, torch.rand(n, generator=gen) * 1.3]).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_codes_equal_the_rounded_quotient_and_its_gradient(bits, device):
    step = 1.0 / ((1 << bits) - 1)  # the grid's step, as DoReFaActivationQuantizer.scale states it
    x = post_relu(5000, bits, device)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device)
    direct, longer = x.clone().requires_grad_(), x.clone().requires_grad_()
    codes = dorefa_activation_codes(direct, bits)
    reference = round_ste(dorefa_activation(longer, bits) / step)
    assert same_bits(codes, reference)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() == (1 << bits) - 1
    codes.backward(upstream)
    reference.backward(upstream)
    assert same_bits(direct.grad, longer.grad)
    assert direct.grad[x > 1].eq(0).all() and direct.grad[(x > 0) & (x < 1)].ne(0).any()


def test_a_32_bit_activation_has_no_codes():
    with pytest.raises(ValueError, match="no integer codes"):
        dorefa_activation_codes(torch.rand(4), 32)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_a_model_on_the_codes_path_computes_the_same_bits(bits, monkeypatch):
    """The bf16 mode takes the codes path on a CPU too (CUDA takes it in the exact mode)."""
    torch.manual_seed(bits)
    direct = set_precision(create_model("resnet20", w_bits=bits, a_bits=bits), "bf16")
    longer = copy.deepcopy(direct)
    x = torch.rand(2, 3, 32, 32).to(memory_format=torch.channels_last)
    out_direct = direct(x)
    out_direct.square().sum().backward()
    monkeypatch.setattr(DoReFaActivationQuantizer, "codes", Quantizer.codes)  # q / step, rounded
    out_longer = longer(x)
    out_longer.square().sum().backward()
    assert same_bits(out_direct, out_longer)
    for (name, a), (_, b) in zip(direct.named_parameters(), longer.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or same_bits(a.grad, b.grad), name


def test_the_codes_path_dispatches_three_operators_fewer_per_layer(monkeypatch):
    layer = set_precision(QConv2d(8, 8, 3, padding=1, bias=False, w_bits=4, a_bits=4), "bf16")
    x = torch.rand(2, 8, 8, 8)
    direct = count_ops(lambda: layer(x))
    monkeypatch.setattr(DoReFaActivationQuantizer, "codes", Quantizer.codes)
    assert count_ops(lambda: layer(x)) - direct == 3  # no divide by n, divide by step, round
