"""DoReFa weights of all layers quantized together: the same bits as per layer, fewer operators."""
from __future__ import annotations

import copy

import pytest
import torch

from kdlib.bench.grouped import check_weights
from kdlib.bench.measure import count_ops
from kdlib.bench.render import _grouped_line
from kdlib.bench.variants import BY_NAME, make_context
from kdlib.models import create_model
from kdlib.quant import (QConv2d, dorefa_weight, dorefa_weights, freeze_quantized_weights,
                         quantize_weights_together, quantized_layers, set_weight_grouping)
from kdlib.quant.quantizers import DoReFaWeightQuantizer

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SHAPES = [(16, 16, 3, 3), (32, 16, 3, 3), (64, 64, 3, 3), (100, 64), (24, 64, 1, 1)]


def layout(t: torch.Tensor) -> list[int]:
    return [st for size, st in zip(t.shape, t.stride()) if size > 1]  # size-1 strides mean nothing


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and layout(a) == layout(b) and torch.equal(
        a.view(torch.int32), b.view(torch.int32))


def weights(fmt, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    ws[1].view(-1)[:4] = ws[1].abs().max()  # tied maxima: the max's gradient is split four ways
    floor = torch.zeros(SHAPES[0])  # max |tanh w| exactly the clamp's floor, its gradient's edge
    floor.view(-1)[:2] = torch.tensor([1.0, -0.5]) * torch.finfo(torch.float32).tiny
    ws += [floor, torch.zeros(SHAPES[0])]  # all zero: no 0/0
    return [w.to(memory_format=fmt) if w.dim() == 4 else w for w in ws]


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_grouped_weights_equal_per_layer_bit_for_bit(bits, fmt):
    base = weights(fmt, seed=bits)
    gen = torch.Generator().manual_seed(100 + bits)
    # output gradients in each weight's own layout, as a convolution's backward gives them
    upstream = [torch.randn(w.shape, generator=gen).to(memory_format=fmt) if w.dim() == 4
                else torch.randn(w.shape, generator=gen) for w in base]
    grouped = [w.clone().requires_grad_() for w in base]
    single = [w.clone().requires_grad_() for w in base]
    q_grouped = dorefa_weights(grouped, bits)
    q_single = [dorefa_weight(w, bits) for w in single]
    for a, b in zip(q_grouped, q_single):
        assert same_bits(a, b)
    torch.autograd.backward(q_grouped, upstream)
    torch.autograd.backward(q_single, upstream)
    for a, b in zip(grouped, single):
        assert same_bits(a.grad, b.grad)
    assert grouped[1].grad.abs().max() > 0 and torch.isfinite(grouped[-1].grad).all()


def test_an_unused_output_gets_no_gradient_and_the_rest_are_unchanged():
    base = weights(torch.contiguous_format, seed=0)[:3]
    grouped = [w.clone().requires_grad_() for w in base]
    single = [w.clone().requires_grad_() for w in base]
    dorefa_weights(grouped, 4)[0].sum().backward()
    dorefa_weight(single[0], 4).sum().backward()
    assert same_bits(grouped[0].grad, single[0].grad)
    assert not grouped[1].grad.any() and not grouped[2].grad.any()


def test_grouped_one_bit_weights_give_zero_the_sign_plus_as_per_layer():
    """sign(0) = +1 at 1 bit: a weight of exactly 0 in a layer that is not all zero."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES[:3]]
    for w in base:
        w.view(-1)[::3] = 0.0
    grouped = dorefa_weights(base, 1)
    single = [dorefa_weight(w, 1) for w in base]
    for w, a, b in zip(base, grouped, single):
        assert same_bits(a, b)
        assert (a[w == 0] > 0).all()


def test_the_benchmarks_device_check_passes_here():
    result = check_weights("cpu", bits=(1, 4, 16))
    assert result["exact"] and set(result["by_bits"]) == {"1", "4", "16"}


@pytest.mark.parametrize("name", ["resnet20", "squeezenet"])
@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("bits", [1, 2, 4, 16])
def test_models_compute_the_same_bits_with_weights_grouped(name, bits, fmt, monkeypatch):
    torch.manual_seed(bits)
    grouped = create_model(name, w_bits=bits, a_bits=bits).to(memory_format=fmt)
    single = set_weight_grouping(copy.deepcopy(grouped), False)
    x = torch.rand(2, 3, 32, 32).to(memory_format=fmt)
    calls = []
    original = DoReFaWeightQuantizer.forward
    monkeypatch.setattr(DoReFaWeightQuantizer, "forward",
                        lambda self, w: calls.append(1) or original(self, w))
    torch.manual_seed(0)  # SqueezeNet's dropout draws the same mask for both
    out_grouped = grouped(x)
    assert calls == []  # no layer quantized its own weights
    torch.manual_seed(0)
    out_single = single(x)
    assert len(calls) == sum(layer.weight_quantizer.active for _, layer in quantized_layers(single))
    assert same_bits(out_grouped, out_single)
    out_grouped.square().sum().backward()
    out_single.square().sum().backward()
    for (n, a), (_, b) in zip(grouped.named_parameters(), single.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        assert a.grad is None or same_bits(a.grad, b.grad), n
    assert all(layer.pass_weight is None for _, layer in quantized_layers(grouped))


def test_a_frozen_teacher_keeps_its_frozen_weights():
    teacher = freeze_quantized_weights(create_model("resnet20", w_bits=8, a_bits=8).eval())
    frozen = {id(layer): layer.frozen_weight for _, layer in quantized_layers(teacher)}
    used, handed = [], []
    for _, layer in quantized_layers(teacher):
        layer.register_forward_pre_hook(lambda m, a: used.append(m.quantized_weight())
                                        or handed.append(m.pass_weight))
    with torch.inference_mode():
        out = teacher(torch.rand(2, 3, 32, 32))
    assert [id(w) for w in used] == [id(w) for w in frozen.values()] and out.shape == (2, 100)
    assert all(w is None for w in handed)  # nor is anything quantized for it, grouped or not
    with torch.no_grad():  # and after the weights changed, they are quantized afresh, together
        next(teacher.parameters()).add_(1.0)
        for _, layer in quantized_layers(teacher):
            layer.weight.mul_(1.0)
    used.clear()
    with torch.inference_mode():
        teacher(torch.rand(2, 3, 32, 32))
    assert all(w is not frozen[k] for w, k in zip(used, frozen))


def test_the_handed_weights_are_dropped_when_forward_raises():
    model = create_model("resnet20", w_bits=4, a_bits=4)
    layers = [layer for _, layer in quantized_layers(model)]
    layers[5].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.rand(2, 3, 32, 32))
    assert all(layer.pass_weight is None for layer in layers)


def test_a_kd_step_dispatches_far_fewer_operators_with_grouped_weights():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 100, (64,), generator=gen)
    ctx = make_context(images, labels, batch_size=8, device="cpu")
    counts = {}
    for grouped in (True, False):
        runner = BY_NAME["kd_w4"].build(ctx)
        set_weight_grouping(runner.trainer.model, grouped)
        runner.step()  # momentum buffers exist from the second step on
        counts[grouped] = count_ops(runner.step)
        runner.close()
    # 18 quantized convs: about 29 operators each per layer, under 3 each grouped
    assert counts[True] < counts[False] - 18 * 20, counts


@pytest.mark.parametrize("grouped", [True, False])
def test_a_runs_group_weights_switch_decides_how_student_and_assistant_quantize(grouped,
                                                                               monkeypatch):
    """``group_weights`` (execution only) reaches both models a step runs: a lease turns it off
    where the benchmark's device check found grouped weights differing from per-layer ones."""
    import kdlib.quant.grouped as grouped_module
    from kdlib.config import RunConfig
    from kdlib.step import make_trainer, run_step

    monkeypatch.setattr(grouped_module, "_SEGMENTS", {})  # built afresh, in inference_mode first

    cfg = RunConfig(model="resnet8", method="ta_chain", w_bits=4, a_bits=4, epochs=1,
                    group_weights=grouped)
    assert RunConfig(**{**cfg.to_dict(), "group_weights": not grouped}).run_id() == cfg.run_id()
    student = create_model("resnet8", w_bits=4, a_bits=4)
    assistant = create_model("resnet8", w_bits=8, a_bits=8)
    trainer = make_trainer(student, cfg, teacher=assistant, device="cpu")
    calls = []
    original = DoReFaWeightQuantizer.forward
    monkeypatch.setattr(DoReFaWeightQuantizer, "forward",
                        lambda self, w: calls.append(1) or original(self, w))
    # the assistant not frozen, as fit() would: its weights grouped under inference_mode
    # first, then the student's, whose backward keeps the same cached per-layer index
    run_step(trainer, torch.rand(4, 3, 32, 32), torch.randint(0, 100, (4,)), 0.05)
    per_layer = sum(layer.weight_quantizer.active for m in (student, assistant)
                    for _, layer in quantized_layers(m))
    assert per_layer > 4 and len(calls) == (0 if grouped else per_layer)
    with pytest.raises(ValueError, match="group_weights='no' is invalid; expected True or False"):
        make_trainer(student, cfg.replace(group_weights="no"), device="cpu")


def test_dorefa_weights_refuses_what_it_cannot_group():
    with pytest.raises(ValueError, match="float32"):
        dorefa_weights([torch.zeros(4, 4, dtype=torch.bfloat16)], 4)
    with pytest.raises(ValueError, match="float32 tensor, contiguous or channels_last"):
        dorefa_weights([torch.zeros(8, 8).t()], 4)
    with pytest.raises(ValueError, match="1..16"):
        dorefa_weights([torch.zeros(4, 4)], 32)
    with pytest.raises(ValueError, match=r"weights \[1\] .* on the first one's device"):
        dorefa_weights([torch.zeros(4, 4), torch.zeros(4, 4, device="meta")], 4)
    assert dorefa_weights([], 4) == []


def test_the_benchmark_line_says_what_was_measured():
    ok = {"status": "ok"}
    part = {"check": {"exact": True, "by_bits": {"1": {"values": True, "gradients": True},
                                                 "4": {"values": True, "gradients": False}}},
            "steps": {"kd_w4": {**ok, "images_per_s": 6000.0, "step_ms": 20.0},
                      "kd_w4_per_layer": {**ok, "images_per_s": 4000.0, "step_ms": 30.0}},
            "ops_per_step": {"kd_w4": 442, "kd_w4_per_layer": 923}}
    line = _grouped_line(part)
    assert "**no** at 4 bits (of 1, 4)" in line
    assert "6000 img/s, per layer 4000 (1.50×)" in line and "442 vs 923" in line
    part["steps"] = {"error": "RuntimeError: out of memory\nstack"}
    assert "not timed (RuntimeError: out of memory)" in _grouped_line(part)


def wrong_where(when, values: bool):
    """dorefa_weights, wrong for the layers ``when(w)`` picks: values one ulp up, or (values
    right) gradients doubled -- what a device's grouped kernels could get wrong."""
    def group(ws, bits):
        out = []
        for w, q in zip(ws, dorefa_weights(ws, bits)):
            if when(w) and values:
                q = q + (torch.nextafter(q, torch.full_like(q, 2.0)) - q).detach()
            elif when(w):
                q.register_hook(lambda g: 2 * g)
            out.append(q)
        return out
    return group


def nchw(w):
    return w.is_contiguous()


def channels_last(w):
    return not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


def tied_maxima(w):
    top = w.detach().abs().max()
    return bool(top > 0 and (w.detach().abs() == top).sum() > 1)


@pytest.mark.parametrize("when", [nchw, channels_last], ids=["nchw", "channels_last"])
def test_the_benchmarks_device_check_catches_values_off_in_either_layout(when, monkeypatch):
    import kdlib.bench.grouped as grouped_module

    monkeypatch.setattr(grouped_module, "dorefa_weights", wrong_where(when, values=True))
    result = check_weights("cpu", bits=(4,))
    assert not result["exact"] and result["by_bits"]["4"] == {"values": False, "gradients": True}


def test_the_benchmarks_device_check_catches_gradients_off_at_tied_maxima(monkeypatch):
    import kdlib.bench.grouped as grouped_module

    monkeypatch.setattr(grouped_module, "dorefa_weights", wrong_where(tied_maxima, values=False))
    result = check_weights("cpu", bits=(4,))
    assert not result["exact"] and result["by_bits"]["4"] == {"values": True, "gradients": False}


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("bits", [1, 4])
def test_a_gradient_in_another_layout_than_its_weight_still_reaches_its_own_elements(bits, fmt):
    """A gradient that arrives in another memory order than its weight's (a channels_last
    weight, a contiguous gradient, or the reverse): each element still gets its own gradient,
    as per layer (up to the last bits of the one per-layer sum taken in another order)."""
    other = (torch.contiguous_format if fmt is torch.channels_last else torch.channels_last)
    base = [w for w in weights(fmt, seed=bits) if w.dim() == 4]
    gen = torch.Generator().manual_seed(200 + bits)
    upstream = [torch.randn(w.shape, generator=gen).to(memory_format=other) for w in base]
    grouped = [w.clone().requires_grad_() for w in base]
    single = [w.clone().requires_grad_() for w in base]
    torch.autograd.backward(dorefa_weights(grouped, bits), upstream)
    torch.autograd.backward([dorefa_weight(w, bits) for w in single], upstream)
    for a, b in zip(grouped, single):
        torch.testing.assert_close(a.grad, b.grad)


def test_layers_at_two_bit_widths_get_weights_quantized_at_their_own_bits():
    """Grouping is per bit width: a model mixing 2- and 5-bit layers (two of each, so both
    groups are grouped) hands each layer its weights at its own bits."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[QConv2d(4, 4, 3, w_bits=b, a_bits=b) for b in (2, 5, 2, 5)])
    with quantize_weights_together(net):
        for layer in net:
            assert layer.pass_weight is not None
            assert same_bits(layer.quantized_weight(), dorefa_weight(layer.weight, layer.w_bits))
    assert all(layer.pass_weight is None for layer in net)


def test_a_float64_model_quantizes_the_weights_it_cannot_group_per_layer():
    """Weights that cannot be grouped (float64, as in a numerical check) are quantized per layer:
    the model still runs, with the same result as with grouping off."""
    torch.manual_seed(0)
    model = create_model("resnet8", w_bits=4, a_bits=4).double()
    single = set_weight_grouping(copy.deepcopy(model), False)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert same_bits(model(x), single(x))
