"""Registry-wide model tests (timm style): every model, every bit width of the chain."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlib.bench.measure import same_bits
from kdlib.models import create_model, list_models, register_model
from kdlib.quant import (QConv2d, QLinear, dorefa_weight, model_size_report, quantized_layers,
                         transfer_weights)

CHAIN_BITS = [32, 16, 8, 4, 2, 1]
QUANTIZERS = ["dorefa", "pact", "lsq"]
RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet56": 56,
                 "resnet110": 110}
# Registry-wide, as the README promises: a newly registered model joins every list below. The
# deeper ResNets are resnet8's constructor at another depth: built and counted only.
ONE_PER_CONSTRUCTOR = [name for name in list_models()
                       if name == "resnet8" or name not in RESNET_DEPTHS]
SMALL_MODELS = ONE_PER_CONSTRUCTOR + ["resnet20"]  # and the workbook's own model: thoroughly
NUM_CLASSES = 100


def resnet_param_count(depth: int, num_classes: int = NUM_CLASSES) -> int:
    """Option-A CIFAR ResNet, counted by hand: convs + BN (weight, bias) + linear."""
    n = (depth - 2) // 6
    convs = 3 * 16 * 9
    bns = 2 * 16
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            convs += in_planes * planes * 9 + planes * planes * 9
            bns += 2 * 2 * planes
            in_planes = planes
    return convs + bns + 64 * num_classes + num_classes


def images(batch: int = 2) -> torch.Tensor:
    # One batch size everywhere: oneDNN builds its conv kernels per shape on first use (slow).
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def trainable_net_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}




# ============================================================================ registry
def test_registry_lists_the_models():
    assert set(RESNET_DEPTHS) | {"squeezenet"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError,
                       match=r"model='resnet21' is unknown; accepted: .*resnet20.*squeezenet"):
        create_model("resnet21")


@pytest.mark.parametrize("kwargs", [{"w_bits": 0}, {"a_bits": 33}, {"w_bits": 2.5},
                                    {"a_bits": "four"}, {"w_bits": True}, {"quantizer": "xnor"},
                                    {"num_classes": 0}, {"quantize_first_last": "yes"}])
def test_create_model_rejects_bad_arguments(kwargs):
    (key, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"{key}={value!r}"):
        create_model("resnet8", **kwargs)


def test_register_model_refuses_a_second_model_with_the_same_name():
    def resnet20(**kw):  # noqa: ARG001
        return nn.Identity()
    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet20)


@pytest.mark.parametrize("depth", [2, -4, 21])
def test_a_resnet_depth_other_than_6n_plus_2_with_n_at_least_1_is_refused(depth):
    """depth 2 is 6n+2 with n = 0: a 'ResNet' of no residual block, which must not pass for one."""
    from kdlib.models.resnet_cifar import CifarResNet

    with pytest.raises(ValueError, match=f"depth={depth} is invalid"):
        CifarResNet(depth)


# ============================================================================ parameter counts
def test_resnet20_has_027m_parameters():
    params = model_size_report(create_model("resnet20"))["params"]
    print(f"resnet20 parameters (100 classes): {params}")
    assert params == resnet_param_count(20) == 275_572
    assert 260_000 <= params <= 280_000


@pytest.mark.parametrize("name", list_models())
def test_depth_and_width_do_not_depend_on_bits(name):
    ref = create_model(name)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    if name in RESNET_DEPTHS:
        assert model_size_report(ref)["params"] == resnet_param_count(RESNET_DEPTHS[name])
    print(f"{name} parameters (100 classes): {model_size_report(ref)['params']}")
    for bits in CHAIN_BITS[1:]:
        model = create_model(name, w_bits=bits, a_bits=bits)
        assert {k: v.shape for k, v in model.state_dict().items()} == ref_shapes


def squeezenet_param_count(num_classes: int = NUM_CLASSES) -> int:
    """SqueezeNet 1.1 for CIFAR, counted by hand: every conv but the classifier has no bias and
    a BatchNorm (weight, bias) after it; a fire module is squeeze 1x1, expand 1x1 and 3x3."""
    def conv_bn(c_in, c_out, k):
        return c_in * c_out * k * k + 2 * c_out

    def fire(c_in, squeeze, expand):  # both expand halves have `expand` channels
        return conv_bn(c_in, squeeze, 1) + conv_bn(squeeze, expand, 1) + conv_bn(squeeze, expand, 3)

    stem = conv_bn(3, 64, 3)  # 1,856
    fires = (fire(64, 16, 64) + fire(128, 16, 64)  # 11,552 + 12,576; output 2 x 64 = 128 channels
             + fire(128, 32, 128) + fire(256, 32, 128)  # 45,632 + 49,728
             + fire(256, 48, 192) + fire(384, 48, 192)  # 105,312 + 111,456
             + fire(384, 64, 256) + fire(512, 64, 256))  # 189,568 + 197,760
    classifier = 512 * num_classes + num_classes  # 1x1 conv with bias, no BatchNorm
    return stem + fires + classifier


def test_squeezenet_parameter_count():
    params = model_size_report(create_model("squeezenet"))["params"]
    assert params == squeezenet_param_count() == 776_740
    assert model_size_report(create_model("squeezenet", num_classes=10))["params"] \
        == squeezenet_param_count(10)


def test_model_size_report_counts_quantized_conv_weights_at_w_bits():
    model = create_model("resnet20", w_bits=4, a_bits=4)
    report = model_size_report(model)
    conv3x3 = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, nn.Conv2d) and m.in_channels != 3)
    assert report["storage_bits"] == report["fp32_bits"] - 28 * conv3x3
    assert 5 < report["compression"] < 8


# ======================================================================== forward / backward matrix
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("bits", CHAIN_BITS)
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_forward_shape_and_every_parameter_gets_a_gradient(name, bits, quantizer):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, w_bits=bits, a_bits=bits,
                         quantizer=quantizer)
    out = model(images(2))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    params = trainable_net_params(model)
    missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    learned = [n for n in params if n.endswith(("alpha", "step"))]
    if bits < 32 and quantizer != "dorefa":
        assert learned  # PACT alpha / LSQ steps of the quantized layers are trained
    else:
        assert learned == []


@pytest.mark.parametrize("name", ONE_PER_CONSTRUCTOR)
@pytest.mark.parametrize("w_bits,a_bits", [(1, 2), (2, 32), (32, 4), (3, 8)])
def test_mixed_weight_and_activation_bits(w_bits, a_bits, name):
    """Weights and activations each at their own bit width in every inner layer (a "W2/A32"
    row must not quantize activations at 2 bits)."""
    model = create_model(name, num_classes=10, w_bits=w_bits, a_bits=a_bits)
    inner = [layer for _, layer in quantized_layers(model)][1:-1]
    assert all(layer.weight_quantizer.bits == w_bits and layer.input_quantizer.bits == a_bits
               for layer in inner)
    out = model(images(2))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in trainable_net_params(model).values())


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_first_and_last_layer_full_precision_by_default(name):
    model = create_model(name, w_bits=2, a_bits=2)
    layers = quantized_layers(model)
    (_, first), (_, last) = layers[0], layers[-1]
    assert first.w_bits == 32 and not first.quantize_input
    # the classifier reports the bits it computes at: its input is not quantized either
    assert last.w_bits == last.a_bits == 32 and not last.quantize_input
    assert all(layer.w_bits == 2 and layer.a_bits == 2 and layer.quantize_input
               for _, layer in layers[1:-1])
    model = create_model(name, w_bits=2, a_bits=2, quantize_first_last=True)
    layers = quantized_layers(model)
    first, last = layers[0][1], layers[-1][1]
    assert first.w_bits == 2 and not first.quantize_input  # the normalised image is never clipped
    assert last.w_bits == 2 and last.quantize_input
    x = images(2)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("name", ONE_PER_CONSTRUCTOR)
def test_quantized_first_and_last_layers_use_the_models_quantizer(name, quantizer):
    """An LSQ (or PACT) model with ``quantize_first_last`` quantizes its first and last layers
    with LSQ (PACT) too, not with the default DoReFa."""
    model = create_model(name, w_bits=2, a_bits=2, quantizer=quantizer, quantize_first_last=True)
    layers = [layer for _, layer in quantized_layers(model)]
    inner = layers[1]
    for layer in (layers[0], layers[-1]):
        assert layer.quantizer == quantizer
        assert type(layer.weight_quantizer) is type(inner.weight_quantizer)
    assert type(layers[-1].input_quantizer) is type(inner.input_quantizer)


def test_quantized_first_conv_sees_the_raw_image():
    model = create_model("resnet8", w_bits=2, a_bits=2, quantize_first_last=True).eval()
    x = images(2)
    seen = {}
    model.conv1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    model(x)
    expected = nn.functional.conv2d(x, dorefa_weight(model.conv1.weight, 2), padding=1)
    torch.testing.assert_close(seen["out"], expected)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_every_conv_and_linear_is_quantizable(name):
    model = create_model(name, w_bits=4, a_bits=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs and all(isinstance(m, QConv2d) for m in convs)
    assert all(isinstance(m, QLinear) for m in linears)


def test_same_seed_gives_same_initial_weights_at_every_bit_width():
    torch.manual_seed(3)
    ref = create_model("resnet8", quantizer="pact").state_dict()
    for bits in (8, 2, 1):
        torch.manual_seed(3)
        model = create_model("resnet8", w_bits=bits, a_bits=bits, quantizer="pact")
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), k


def test_models_accept_channels_last_and_eval_mode():
    model = create_model("resnet8", w_bits=4, a_bits=4).eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model(images(2).to(memory_format=torch.channels_last))
    assert out.shape == (2, NUM_CLASSES)


# ============================================================================ weight transfer
def _trained_a_little(model: nn.Module) -> nn.Module:
    """Move BN running stats (and init LSQ steps) away from their initial values."""
    model.train()
    with torch.no_grad():
        model(images(2))
    return model


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("name", ONE_PER_CONSTRUCTOR)
def test_transfer_from_the_32_bit_copy(name, quantizer):
    torch.manual_seed(0)
    src = _trained_a_little(create_model(name, quantizer=quantizer))
    src_state = src.state_dict()
    assert any("running_mean" in k for k in src_state)
    for bits in CHAIN_BITS[1:]:
        torch.manual_seed(1)
        dst = create_model(name, w_bits=bits, a_bits=bits, quantizer=quantizer)
        transfer_weights(src, dst)
        dst_state = dst.state_dict()
        assert list(dst_state) == list(src_state)
        for k, v in src_state.items():
            if not k.endswith(("alpha", "step", "initialized")):  # network tensors: equal
                assert torch.equal(v, dst_state[k]), k
        out = dst(images(2))  # LSQ re-initialises its steps here, from the first batch
        out.sum().backward()
        assert torch.isfinite(out).all()


def test_transfer_along_the_chain_keeps_network_and_resets_quantizer_state():
    torch.manual_seed(0)
    src = _trained_a_little(create_model("resnet8", w_bits=8, a_bits=8, quantizer="pact"))
    with torch.no_grad():
        src.layer1[0].conv1.input_quantizer.alpha.fill_(3.0)
    same = create_model("resnet8", w_bits=8, a_bits=8, quantizer="pact")
    transfer_weights(src, same)
    assert same.layer1[0].conv1.input_quantizer.alpha.item() == 3.0  # same bits: copied
    lower = create_model("resnet8", w_bits=4, a_bits=4, quantizer="pact")
    transfer_weights(src, lower)
    assert lower.layer1[0].conv1.input_quantizer.alpha.item() == 10.0  # other bits: re-initialised


def test_transfer_between_quantizer_families_copies_the_network():
    torch.manual_seed(0)
    teacher = _trained_a_little(create_model("resnet8", quantizer="dorefa"))
    student = create_model("resnet8", w_bits=4, a_bits=4, quantizer="lsq")
    transfer_weights(teacher, student)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k
    assert not student.layer1[0].conv1.input_quantizer._initialized


@pytest.mark.parametrize("src_kw,dst_kw,pattern", [
    (dict(name="resnet8"), dict(name="resnet20"), r"missing in source: layer1\.1\."),
    (dict(name="resnet20"), dict(name="resnet8"), r"extra in source: layer1\.1\."),
    (dict(name="resnet8"), dict(name="resnet8", num_classes=10),
     r"shape mismatch.*fc\.weight \(100, 64\) vs \(10, 64\)"),
    (dict(name="resnet8"), dict(name="squeezenet"),
     r"architectures differ; missing in source: classifier\.bias.*extra in source: bn1\.bias"),
])
def test_transfer_between_different_architectures_fails_clearly(src_kw, dst_kw, pattern):
    src = create_model(src_kw.pop("name"), **src_kw)
    dst = create_model(dst_kw.pop("name"), **dst_kw)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=pattern):
        transfer_weights(src, dst)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing copied


# ============================================================================ torch.compile
def test_compiled_smallest_model_trains_one_step():
    """The whole quantized model traces as ONE graph (fullgraph: no graph break, no .item()),
    forward and backward. Backend aot_eager keeps this test at seconds: inductor's C++ code
    generation for a whole ResNet takes minutes on a small CPU; test_quant compiles a small
    quantized net with inductor."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, w_bits=2, a_bits=2)
    x, y = images(2), torch.tensor([3, 4])
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is not None for p in trainable_net_params(model).values())


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_a_quantizer_that_absorbs_relu_gives_the_same_bits_with_and_without_it(bits):
    """DoReFa's activation clip to [0, 1], forward and gradient (both of its paths: the
    quantized values, and the integer codes of <= 8 bits), at -0.0, 0, the edges and around."""
    from kdlib.quant.quantizers import DoReFaActivationQuantizer, PACTActivationQuantizer

    quantizer = DoReFaActivationQuantizer(bits)
    assert quantizer.absorbs_relu and not DoReFaActivationQuantizer(32).absorbs_relu
    assert not PACTActivationQuantizer(bits).absorbs_relu
    x = torch.cat([torch.tensor([-0.0, 0.0, 1.0, -1.0, 1e-30, -1e-30, 1.0 - 2**-24, 1.5]),
                   torch.randn(4000, generator=torch.Generator().manual_seed(bits))])
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(99))
    for path in (lambda q, t: q(t), lambda q, t: q.codes(t)[0]):
        plain, through_relu = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = path(quantizer, plain), path(quantizer, torch.relu(through_relu))
        a.backward(upstream)
        b.backward(upstream)
        assert same_bits(a, b)
        assert same_bits(plain.grad, through_relu.grad)


@pytest.mark.parametrize("bits", [2, 4, 16, 32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_leaving_out_the_absorbed_relu_changes_no_bit_of_a_resnet(bits, channels_last, monkeypatch):
    """A ResNet whose blocks skip the ReLU before a DoReFa-quantized conv, against the same
    ResNet that keeps it: logits, every gradient and the BatchNorm statistics, raw bits."""
    from kdlib.quant.layers import QConv2d as Layer

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images(8).to(memory_format=fmt)

    def train_step(keep_relu: bool):
        if keep_relu:
            monkeypatch.setattr(Layer, "input_absorbs_relu", property(lambda self: False))
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=10, w_bits=bits, a_bits=bits).to(
            memory_format=fmt)
        logits = model(x)
        logits.square().sum().backward()
        monkeypatch.undo()
        return logits, model

    skipped, skipping = train_step(keep_relu=False)
    kept, keeping = train_step(keep_relu=True)
    assert same_bits(skipped, kept)
    for (name, p), (_, q) in zip(skipping.named_parameters(), keeping.named_parameters()):
        assert same_bits(p.grad, q.grad), name
    for (name, b), (_, c) in zip(skipping.named_buffers(), keeping.named_buffers()):
        if b is not None and b.is_floating_point():
            assert same_bits(b, c), name
    blocks = [m for m in skipping.modules() if type(m).__name__ == "BasicBlock"]
    assert blocks and all(block.conv2.input_absorbs_relu == (bits < 32) for block in blocks)


# ============================================================================ ResNet structure
def test_option_a_shortcut_subsamples_the_even_pixels_and_pads_channels_on_both_sides():
    """He et al.'s option A as in the reference CIFAR code: x[:, :, ::2, ::2] (the pixels a
    stride-2, padding-1 3x3 conv centres on), zero channels split evenly before and after."""
    from kdlib.models.resnet_cifar import ShortcutA

    x = torch.randn(2, 16, 8, 8)
    out = ShortcutA(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_basic_block_adds_the_shortcut_before_its_last_relu():
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x): the block output is never negative, even
    for a signed input, and equals that formula at 32 bits."""
    from kdlib.models.resnet_cifar import BasicBlock

    torch.manual_seed(0)
    block = BasicBlock(16, 16, 1).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        inner = torch.relu(block.bn1(block.conv1(x)))
        expected = torch.relu(block.bn2(block.conv2(inner)) + x)
        out = block(x)
    torch.testing.assert_close(out, expected)


def test_resnet20_halves_the_resolution_at_the_first_conv_of_stages_2_and_3():
    model = create_model("resnet20").eval()
    sizes, first_convs = [], []
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            block.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        stage[0].conv1.register_forward_hook(lambda m, i, o: first_convs.append(o.shape[-1]))
    with torch.no_grad():
        model(images(2))
    assert sizes == [(16, 32, 32)] * 3 + [(32, 16, 16)] * 3 + [(64, 8, 8)] * 3
    assert first_convs == [32, 16, 8]  # the block's first conv strides, as in He et al.


def test_resnet_convs_start_with_he_fan_in_normal_weights():
    torch.manual_seed(0)
    model = create_model("resnet20")
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            std = float(m.weight.detach().std())
            assert abs(std / (2.0 / fan_in) ** 0.5 - 1) < 0.2, (name, std, fan_in)


@pytest.mark.parametrize("name", ONE_PER_CONSTRUCTOR)
def test_every_quantized_input_is_a_post_relu_activation(name):
    """The activation quantizers assume non-negative inputs: in train mode (batch statistics, so
    a BN after a ReLU would make negatives) every quantizing layer sees x >= 0. (PACT: its
    layers keep every ReLU, DoReFa's let the clip stand in for the one inside a block.)"""
    torch.manual_seed(0)
    model = create_model(name, w_bits=4, a_bits=4, quantizer="pact",
                         quantize_first_last=True).train()
    seen = {}
    for n, layer in quantized_layers(model):
        if layer.quantize_input:
            layer.register_forward_pre_hook(lambda m, i, n=n: seen.update({n: float(i[0].min())}))
    with torch.no_grad():
        model(images(2))
    assert seen and all(v >= 0 for v in seen.values()), seen


def _output_and_next_input(model, producer, consumer):
    """One forward pass of two images: what ``producer`` put out and what ``consumer`` took in."""
    seen = {}
    producer.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
    consumer.register_forward_pre_hook(lambda m, i: seen.update(into=i[0].clone()))
    with torch.no_grad():
        model(images(2))
    return seen["out"], seen["into"]


def test_resnet_classifier_reads_the_global_average_of_the_last_stage():
    model = create_model("resnet8").eval()
    features, pooled = _output_and_next_input(model, model.layer3, model.fc)
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))


# ============================================================================ SqueezeNet structure
def test_squeezenet_feature_maps_go_32_16_8():
    """Max pools of 3x3/2 with ceil_mode after fire 3 and fire 5: 32 -> 16 -> 8 (floor would
    give 15 and 7)."""
    model = create_model("squeezenet").eval()
    sizes = []
    for m in model.features:
        m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    with torch.no_grad():
        model(images(2))
    assert sizes == [32, 32, 16, 16, 16, 8, 8, 8, 8, 8]


def test_squeezenet_fire_concatenates_expand1x1_then_expand3x3():
    """The channel order of SqueezeNet (torchvision's too): the next layer's weights index it."""
    from kdlib.models.squeezenet import Fire

    fire = Fire(16, 4, 6, 5, batch_norm=True).eval()
    x = torch.rand(2, 16, 8, 8)
    with torch.no_grad():
        s = fire.squeeze(x)
        assert torch.equal(fire(x), torch.cat([fire.expand1x1(s), fire.expand3x3(s)], 1))


def test_squeezenet_dropout_acts_on_the_classifiers_input():
    torch.manual_seed(0)
    model = create_model("squeezenet").train()
    features, fed = _output_and_next_input(model, model.features, model.classifier)
    kept = fed != 0
    torch.testing.assert_close(fed[kept], 2 * features[kept])  # inverted dropout at p = 0.5
    dropped = (features != 0) & ~kept
    assert 0.4 < dropped.sum() / (features != 0).sum() < 0.6


def test_squeezenet_classifier_starts_small_as_in_torchvision():
    """Normal(0, 0.01) classifier weights and zero bias (torchvision's SqueezeNet init), so the
    first logits are near zero; the other convs are Kaiming-uniform."""
    torch.manual_seed(0)
    model = create_model("squeezenet")
    w = model.classifier.weight.detach()
    assert abs(float(w.std()) / 0.01 - 1) < 0.1 and not model.classifier.bias.any()
    stem = model.stem.conv.weight.detach()
    assert float(stem.std()) > 0.1
