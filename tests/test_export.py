"""Packed model files and ONNX export (kdlib.export).

Models are ResNet-8 with 10 classes and random weights, run once in train mode so that LSQ steps
are initialised and the BatchNorm running statistics are those of a batch (not the identity),
except at the end: the committed ResNet-20 models on real CIFAR-100 test images.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdlib
from kdlib.data import load_cifar100, normalize
from kdlib.export import agreement, load_packed, read_packed_header, save_packed, to_onnx
from kdlib.export.codes import pack_codes, packed_length, unpack_codes
from kdlib.export.packed import MAGIC, _PREAMBLE, header_size
from kdlib.models import create_model
from kdlib.quant import (LSQQuantizer, PACTActivationQuantizer, QLinear, model_size_report,
                         quantized_layers)

from conftest import on_ci

QUANTIZERS = ("dorefa", "pact", "lsq")
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


def trained_like(quantizer: str, bits: int, *, name: str = "resnet8",
                 quantize_first_last: bool = False, a_bits: int | None = None,
                 seed: int = 0) -> nn.Module:
    """A model after one train-mode forward (LSQ initialised, BN statistics set), in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, w_bits=bits,
                         a_bits=bits if a_bits is None else a_bits, quantizer=quantizer,
                         quantize_first_last=quantize_first_last)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # running statistics = this batch's: activations of unit scale
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 2)
    return model.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def saved(model: nn.Module, tmp_path, name: str = "resnet8", **kw):
    return save_packed(model, tmp_path / "model.packed", model_name=name, **kw)


# ============================================================================ bit packing
@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_codes_round_trip_and_length(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=1001)
    data = pack_codes(codes, bits)
    assert len(data) == packed_length(1001, bits) == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_codes(data, bits, 1001), codes)


def test_pack_codes_layout_is_little_endian_bit_stream():
    assert pack_codes(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1) == bytes([0b00001101, 0b1])
    assert pack_codes(np.array([3, 0, 2, 1]), 2) == bytes([0b01100011])
    # 5 = bits 1,0,1; 7 = 1,1,1; 1 = 1,0,0 -> stream 10111110 0 -> bytes 0b01111101, 0
    assert pack_codes(np.array([5, 7, 1]), 3) == bytes([0b01111101, 0])
    assert pack_codes(np.array([0x1234]), 16) == bytes([0x34, 0x12])


def test_encoded_weights_are_keyed_by_state_dict_key_for_a_bare_layer_too():
    """The keys are ``state_dict`` keys: a bare quantized layer's weight is ``weight``."""
    from kdlib.export.codes import encode_model_weights

    for layer in (QLinear(4, 3, w_bits=4), nn.Sequential(QLinear(4, 3, w_bits=4))):
        coded = encode_model_weights(layer)
        assert set(coded) == {k for k in layer.state_dict() if k.endswith("weight")}


# ============================================================================ packed: exactness
@pytest.mark.parametrize("quantize_first_last", [False, True], ids=["fp_edges", "q_edges"])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.slow
def test_load_packed_gives_equal_eval_logits(tmp_path, quantizer, bits, quantize_first_last):
    model = trained_like(quantizer, bits, quantize_first_last=quantize_first_last)
    x = images()
    with torch.inference_mode():
        expected = model(x)
    loaded = load_packed(saved(model, tmp_path))
    assert not loaded.training
    with torch.inference_mode():
        assert torch.equal(loaded(x), expected)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert torch.equal(loaded(x).detach(), expected)  # grad mode on: the frozen weights still hold
    with torch.inference_mode():  # and not only once
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_everything_but_quantized_weights_is_stored_exactly(tmp_path, quantizer):
    model = trained_like(quantizer, 3)
    loaded = load_packed(saved(model, tmp_path))
    coded = {f"{n}.weight" for n, layer in quantized_layers(model) if layer.w_bits < 32}
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original.keys() - coded:  # BN statistics, fp32 layers, LSQ steps, PACT alpha
        assert torch.equal(original[key], restored[key]) \
            and original[key].dtype == restored[key].dtype, key
    for name, layer in quantized_layers(loaded):  # the coded weights are the quantized ones
        if f"{name}.weight" in coded:
            with torch.no_grad():
                assert torch.equal(layer.weight, model.get_submodule(name).quantized_weight())


def test_squeezenet_round_trip(tmp_path):
    model = trained_like("lsq", 3, name="squeezenet", quantize_first_last=True)
    x = images(2)
    with torch.inference_mode():
        expected = model(x)
    loaded = load_packed(saved(model, tmp_path, name="squeezenet"))
    with torch.inference_mode():
        assert torch.equal(loaded(x), expected)


def test_packed_weights_are_those_used_in_eval_when_frozen(tmp_path):
    """A frozen teacher: the frozen copy is what eval uses, so that is what is stored."""
    from kdlib.quant import freeze_quantized_weights

    model = freeze_quantized_weights(trained_like("dorefa", 2))
    x = images()
    with torch.inference_mode():
        expected = model(x)
    with torch.inference_mode():
        assert torch.equal(load_packed(saved(model, tmp_path))(x), expected)


def test_save_leaves_model_and_random_stream_alone(tmp_path):
    model = trained_like("lsq", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    load_packed(saved(model, tmp_path))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ============================================================================ packed: header, size
def test_header_records_model_run_and_payload_digest(tmp_path):
    model = trained_like("pact", 2, quantize_first_last=True)
    path = saved(model, tmp_path, run_id="abc123")
    header = read_packed_header(path)
    assert header["model"] == {"name": "resnet8", "num_classes": 10, "w_bits": 2, "a_bits": 2,
                               "quantizer": "pact", "quantize_first_last": True}
    assert header["run_id"] == "abc123" and header["kdlib_version"] == kdlib.__version__
    blob = path.read_bytes()
    header_length = _PREAMBLE.unpack_from(blob)[1]
    payload = blob[_PREAMBLE.size + header_length:]
    assert header["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    # what the file spends besides its tensors: all but the tensors' lengths
    assert header_size(path) == len(blob) - sum(e["length"] for e in header["tensors"])
    other = tmp_path / "other.packed"
    other.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="not a kdlib packed model"):
        header_size(other)
    fc = next(e for e in header["tensors"] if e["name"] == "fc.weight")
    assert (fc["encoding"], fc["bits"], fc["shape"], fc["length"]) == ("dorefa", 2, [10, 64], 160)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 16, 32])
def test_file_size_agrees_with_model_size_report(tmp_path, quantizer, bits):
    """file = preamble + JSON header + payload, and the payload is the report's storage exactly,
    plus what the report leaves out on purpose: buffers (BatchNorm running statistics and
    counters, LSQ flags: not parameters) and the zero padding that ends each packed layer on a
    byte boundary (< 1 byte per layer). The per-layer scales (LSQ step, 1-bit DoReFa E|w|) sit
    in the header; the header is < 200 bytes per tensor."""
    model = trained_like(quantizer, bits)
    path = saved(model, tmp_path)
    header = read_packed_header(path)
    header_bytes = len(json.dumps(header, separators=(",", ":")).encode())
    file_size = path.stat().st_size
    assert file_size == _PREAMBLE.size + header_bytes + header["payload_length"]
    params = dict(model.named_parameters())
    buffer_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                       if k not in params)
    packed_layers = sum(layer.w_bits < 32 for _, layer in quantized_layers(model))
    excess_bits = (8 * header["payload_length"] - model_size_report(model)["storage_bits"]
                   - 8 * buffer_bytes)
    assert 0 <= excess_bits < 8 * max(packed_layers, 1)
    assert header_bytes < 200 * len(header["tensors"])


def test_packed_file_shrinks_with_the_bit_width(tmp_path):
    sizes = {}
    for bits in (32, 8, 4, 2, 1):
        sizes[bits] = save_packed(trained_like("dorefa", bits), tmp_path / f"{bits}.packed",
                                  model_name="resnet8").stat().st_size
    assert sizes[32] > sizes[8] > sizes[4] > sizes[2] > sizes[1]
    assert sizes[32] / sizes[8] > 3


# ============================================================================ packed: refusals
def test_truncated_files_are_refused(tmp_path):
    path = saved(trained_like("dorefa", 4), tmp_path)
    blob = path.read_bytes()
    header_end = _PREAMBLE.size + _PREAMBLE.unpack_from(blob)[1]
    for cut in (len(blob) - 1, header_end + 10, header_end - 1, header_end - 5, 20):
        bad = tmp_path / f"cut{cut}.packed"
        bad.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match=f"{bad.name}.*(truncated|not a kdlib)"):
            load_packed(bad)


def test_extra_bytes_are_refused(tmp_path):
    path = saved(trained_like("dorefa", 4), tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="model.packed.*trailing bytes"):
        load_packed(path)


def test_flipped_payload_byte_is_refused(tmp_path):
    path = saved(trained_like("lsq", 2), tmp_path)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="model.packed is corrupt: its payload"):
        load_packed(path)


def test_tampered_header_is_refused(tmp_path):
    path = saved(trained_like("lsq", 2), tmp_path, run_id="abc")
    blob = path.read_bytes()
    assert blob.count(b'"w_bits":2') == 1
    path.write_bytes(blob.replace(b'"w_bits":2', b'"w_bits":3'))
    with pytest.raises(ValueError, match="model.packed is corrupt: its header"):
        load_packed(path)


def _seal_header(path, change) -> None:
    """Replace the header's bytes by ``change(bytes)`` and re-seal them (its digest matches)."""
    blob = path.read_bytes()
    length = _PREAMBLE.unpack_from(blob)[1]
    new = change(blob[_PREAMBLE.size:_PREAMBLE.size + length])
    path.write_bytes(_PREAMBLE.pack(MAGIC, len(new), hashlib.sha256(new).digest())
                     + new + blob[_PREAMBLE.size + length:])


def _rewrite_header(path, change) -> None:
    """Change the header and re-seal it (a consistent file whose table is wrong)."""
    def rewritten(header_bytes):
        header = json.loads(header_bytes)
        change(header)
        return json.dumps(header).encode()
    _seal_header(path, rewritten)


def _first_coded(header):
    return next(e for e in header["tensors"] if e["encoding"] != "raw")


@pytest.mark.parametrize("change, message", [
    (lambda h: h.pop("payload_length"), "'payload_length' is missing"),
    (lambda h: h.pop("model"), "'model' is missing"),
    (lambda h: h["model"].pop("name"), "no registry 'name'"),
    (lambda h: h.update(tensors={}), "'tensors' is missing or not a list"),
    (lambda h: h["tensors"].__setitem__(2, "conv"), "tensor entry 2 is not an object"),
    (lambda h: _first_coded(h).pop("bits"), r"\['bits'\]"),
    (lambda h: _first_coded(h).update(bits=True), r"\['bits'\]"),
    (lambda h: _first_coded(h).update(scale="0.5"), r"\['scale'\]"),
    (lambda h: h["tensors"][3].update(offset="0"), r"\['offset'\]"),
    (lambda h: h["tensors"][3].update(shape=[16, -1]), r"\['shape'\]"),
    (lambda h: h["tensors"][3].update(shape=16), r"\['shape'\]"),
    (lambda h: h["tensors"][-1].update(dtype="complex64"), r"\['dtype'\]"),
])
def test_a_sealed_header_without_a_field_the_reader_needs_is_refused_naming_the_file(
        tmp_path, change, message):
    """Its digest matches (a header made by hand or by a faulty writer): still a ValueError that
    names the file and the field, never a KeyError or TypeError from deep in the reader."""
    path = saved(trained_like("pact", 1), tmp_path)
    _rewrite_header(path, change)
    with pytest.raises(ValueError, match=f"model.packed: .*{message}"):
        load_packed(path)


@pytest.mark.parametrize("header_bytes, message", [
    (b"\xff\xfe", "not UTF-8 JSON"), (b"{\"format\": ", "not UTF-8 JSON"),
    (b"[1, 2]", "a JSON list, not an object")])
def test_a_sealed_header_that_is_no_json_object_is_refused_naming_the_file(
        tmp_path, header_bytes, message):
    path = saved(trained_like("dorefa", 2), tmp_path)
    _seal_header(path, lambda _: header_bytes)
    with pytest.raises(ValueError, match=f"model.packed: its header is {message}"):
        read_packed_header(path)


@pytest.mark.parametrize("change, message", [
    (lambda h: h["tensors"][0].update(shape=[16, 3, 3, 4]), "conv1.weight.*inconsistent"),
    (lambda h: h["tensors"][3].update(offset=10 ** 9), "inconsistent"),
    # a negative offset that Python slicing would read as another place in the payload
    (lambda h: h["tensors"][3].update(offset=h["tensors"][3]["offset"] - h["payload_length"]),
     "inconsistent"),
    (lambda h: h["tensors"].pop(), "do not match"),
    (lambda h: h["model"].update(w_bits=99), "w_bits=99"),
    (lambda h: h["model"].update(name="resnet20"), "do not match"),
    (lambda h: h.update(format_version=2), "version 2"),
    # a length that disagrees with the shape, though the slice stays inside the payload
    (lambda h: h["tensors"][3].update(length=h["tensors"][3]["length"] - 1), "inconsistent"),
    (lambda h: _first_coded(h).update(length=_first_coded(h)["length"] + 1), "inconsistent"),
    # create_model would fill a missing argument with its default: another model, silently
    (lambda h: h["model"].pop("a_bits"), "model arguments"),
    (lambda h: h["model"].update(dropout=0.5), "model arguments"),
    (lambda h: _first_coded(h).update(encoding="ternary"), "cannot be decoded"),
    (lambda h: h.update(byte_order="big" if h["byte_order"] == "little" else "little"),
     "-endian data"),
])
def test_inconsistent_header_is_refused(tmp_path, change, message):
    path = saved(trained_like("dorefa", 2), tmp_path)
    _rewrite_header(path, change)
    with pytest.raises(ValueError, match=f"model.packed.*{message}"):
        load_packed(path)


@pytest.mark.parametrize("quantizer, bits", [("lsq", 2), ("pact", 1), ("dorefa", 1)])
def test_a_scaled_entry_without_its_scale_is_refused_naming_the_file(tmp_path, quantizer, bits):
    """LSQ's and 1-bit weights are levels times a stored scale: without it the file cannot be
    read (a ValueError naming the file, as for any header field the reader needs)."""
    path = saved(trained_like(quantizer, bits), tmp_path)
    assert "scale" in _first_coded(read_packed_header(path))
    _rewrite_header(path, lambda h: _first_coded(h).pop("scale"))
    with pytest.raises(ValueError, match=r"model.packed.*\['scale'\] missing"):
        load_packed(path)


def test_a_hand_written_integer_scale_is_a_json_number_like_any_other(tmp_path):
    """JSON has one number type: a scale written as ``2`` rather than ``2.0`` is read as 2."""
    path = saved(trained_like("pact", 1), tmp_path)
    name = _first_coded(read_packed_header(path))["name"]
    _rewrite_header(path, lambda h: _first_coded(h).update(scale=2))
    weight = load_packed(path).state_dict()[name]
    assert set(weight.unique().tolist()) == {-2.0, 2.0}


def test_save_refuses_a_model_that_mixes_quantizers(tmp_path):
    model = trained_like("dorefa", 2)
    model.fc = QLinear(64, 10, quantizer="lsq")  # a full-precision classifier, but of LSQ
    with pytest.raises(ValueError, match=r"mixes quantizers \['dorefa', 'lsq'\]"):
        saved(model, tmp_path)


def test_not_a_packed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.packed"):
        load_packed(tmp_path / "missing.packed")
    weights = tmp_path / "weights.pt"
    torch.save(trained_like("dorefa", 2).state_dict(), weights)
    with pytest.raises(ValueError, match="weights.pt is not a kdlib packed model"):
        load_packed(weights)


def test_no_pickle_involved(tmp_path, monkeypatch):
    model = trained_like("lsq", 3)
    path = saved(model, tmp_path)
    blob = path.read_bytes()
    assert blob.startswith(MAGIC) and not blob.startswith((b"PK\x03\x04", b"\x80"))

    def refuse(*args, **kwargs):
        raise AssertionError("load_packed must not unpickle")

    for target, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(target, attr, refuse)
    x = images()
    with torch.inference_mode():
        assert torch.equal(load_packed(path)(x), model(x))


# ============================================================================ packed: save refusals
def test_save_needs_the_model_registry_name(tmp_path):
    model = trained_like("dorefa", 2)
    with pytest.raises(ValueError, match="not create_model\\('resnet20'"):
        saved(model, tmp_path, name="resnet20")
    with pytest.raises(ValueError, match="model='resnet9' is unknown"):
        saved(model, tmp_path, name="resnet9")
    with pytest.raises(ValueError, match="no QConv2d/QLinear"):
        save_packed(nn.Linear(2, 2), tmp_path / "x.packed", model_name="resnet8")


@pytest.mark.parametrize("quantizer, bits, level", [("dorefa", 2, 4), ("dorefa", 4, 16),
                                                     ("lsq", 2, 2), ("lsq", 3, -5)])
def test_save_refuses_a_weight_level_outside_the_bit_width(tmp_path, quantizer, bits, level):
    """A weight that is an exact level of the encoding's arithmetic, but one past its k-bit
    range, has no k-bit code: packing it would keep its low bits only (another weight)."""
    model = trained_like(quantizer, bits)
    name, layer = next((n, m) for n, m in quantized_layers(model) if m.w_bits == bits)
    weight = layer.quantized_weight().detach().clone()
    level = torch.tensor(float(level))
    weight.view(-1)[0] = (2 * (level / ((1 << bits) - 1)) - 1 if quantizer == "dorefa"
                          else level * layer.weight_quantizer.step.detach())
    layer.quantized_weight = lambda: weight
    with pytest.raises(ValueError, match=f"layer '{name}'.*cannot store it exactly"):
        saved(model, tmp_path)
    assert not (tmp_path / "model.packed").exists()


def test_save_refuses_uninitialised_lsq(tmp_path):
    model = create_model("resnet8", num_classes=10, w_bits=2, a_bits=2, quantizer="lsq")
    with pytest.raises(ValueError,
                       match="LSQ quantizer 'layer1.0.conv1.weight_quantizer' is not initialised"):
        saved(model, tmp_path)
    assert not (tmp_path / "model.packed").exists()


# ============================================================================ ONNX
def need(module: str):
    """The optional package (the ``export`` extra): a skip locally, an error on CI, whose ``dev``
    extra installs it, so a skip there would hide that the ONNX tests never ran."""
    return importlib.import_module(module) if on_ci() else pytest.importorskip(module)


def run_onnx(path, x: torch.Tensor, *, fuse: bool = True) -> np.ndarray:
    """ONNX Runtime on the CPU; ``fuse=False`` keeps only its basic (exact) graph rewrites."""
    ort = need("onnxruntime")
    options = ort.SessionOptions()
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.slow
def test_onnx_quantized_weights_within_1e4(tmp_path, quantizer, bits):
    """Quantized weights (first and last layer too), full-precision activations: no rounding
    between layers, so ONNX Runtime differs from kdlib by float summation order only."""
    need("onnxruntime")
    model = trained_like(quantizer, bits, a_bits=32, quantize_first_last=True)
    x = images(8)
    with torch.inference_mode():
        expected = model(x).numpy()
    got = run_onnx(to_onnx(model, tmp_path / "m.onnx"), x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(expected).max() > 1e-2  # the logits are not all ~0


def _activation_reference_model(quantizer: str, bits: int, scale: float | None = None) -> nn.Module:
    """One identity QLinear whose input quantizer is the only thing that changes values; LSQ
    step ``scale`` (default 0.37), PACT alpha ``scale`` (default 2.7)."""
    model = nn.Sequential(QLinear(64, 64, bias=False, a_bits=bits, quantizer=quantizer))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(64))
        model(torch.rand(4, 64))  # initialises LSQ
        for module in model.modules():
            if isinstance(module, LSQQuantizer):
                module.step.fill_(0.37 if scale is None else scale)
            if isinstance(module, PACTActivationQuantizer):
                module.alpha.fill_(2.7 if scale is None else scale)
    return model.eval()


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 5, 6, 7, 8, 16))
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_onnx_activation_quantizers_are_exact(tmp_path, quantizer, bits):
    """Clip/Round/Mul/Div in ONNX give kdlib's activation levels bit for bit, on a sweep and on
    the (near-)ties halfway between levels. Without ORT's extended fusions: they would fold the
    division by 2^k - 1 into the identity MatMul (mathematically equal, rounded differently),
    and the levels themselves would no longer be the graph's output."""
    need("onnxruntime")
    model = _activation_reference_model(quantizer, bits)
    quantizer_module = model[0].input_quantizer
    n = (1 << bits) - 1
    top = {"dorefa": 1.0, "pact": 2.7, "lsq": 0.37 * n}[quantizer]
    ties = (torch.arange(n, dtype=torch.float32) + 0.5) * torch.tensor(top / n, dtype=torch.float32)
    x = torch.cat([torch.linspace(-0.5, 1.2 * top, 64 * 60), ties])
    x = torch.cat([x, torch.zeros(-len(x) % 64)]).reshape(-1, 64)
    with torch.no_grad():
        expected = quantizer_module(x).numpy()
    got = run_onnx(to_onnx(model, tmp_path / "act.onnx", input_shape=(64,)), x, fuse=False)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) >= min(n + 1, 3000)  # <= 8 bits: every level was produced


@pytest.mark.parametrize("quantizer", ["pact", "lsq"])
def test_onnx_uses_the_clip_level_forward_uses(tmp_path, quantizer):
    """A learned alpha / step pushed below zero: forward clamps it to a small positive value,
    and so does the graph."""
    need("onnxruntime")
    model = _activation_reference_model(quantizer, 2, scale=-1e-9)
    x = torch.linspace(-1e-7, 1e-7, 64 * 8).reshape(-1, 64)
    with torch.no_grad():
        expected = model[0].input_quantizer(x).numpy()
    got = run_onnx(to_onnx(model, tmp_path / "act.onnx", input_shape=(64,)), x, fuse=False)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) == 4


def dyadic_resnet8(quantizer: str, w_bits: int, a_bits: int) -> nn.Module:
    """A ResNet-8 whose every intermediate value is a short binary fraction, so fp32 arithmetic is
    exact in any order: inputs k/4, weights k/8 (1-bit: +-1/8), LSQ steps and PACT alpha powers
    of two, BatchNorm with eps 0, variance 1, scale a power of two. Then no convolution can land
    a pre-activation on the other side of a rounding boundary in ONNX Runtime, and the whole
    graph, activation quantizers included, can be compared at 1e-4 (it is in fact equal)."""
    model = trained_like(quantizer, w_bits, a_bits=a_bits, quantize_first_last=True)
    g = torch.Generator().manual_seed(1)

    def k_over(shape, k):
        return torch.randint(-8, 9, shape, generator=g) / k

    with torch.no_grad():
        for _, layer in quantized_layers(model):
            if w_bits == 1 and quantizer != "lsq":  # DoReFa 1 bit: E|w| must be a power of two
                layer.weight.copy_(
                    (torch.randint(0, 2, layer.weight.shape, generator=g) * 2 - 1) / 8)
            else:
                layer.weight.copy_(k_over(layer.weight.shape, 8))
            if layer.bias is not None:
                layer.bias.copy_(k_over(layer.bias.shape, 8))
        for module in model.modules():
            if isinstance(module, LSQQuantizer):
                module.step.fill_(2.0 ** -3 if module.signed else 2.0 ** -2)
            elif isinstance(module, PACTActivationQuantizer):
                module.alpha.fill_(2.0)
            elif isinstance(module, nn.BatchNorm2d):
                module.eps = 0.0
                module.running_var.fill_(1.0)
                module.running_mean.copy_(k_over(module.running_mean.shape, 8))
                module.weight.copy_(2.0 ** torch.randint(-2, 1, module.weight.shape, generator=g))
                module.bias.copy_(k_over(module.bias.shape, 8))
    return model


@pytest.mark.parametrize("quantizer, w_bits, a_bits", [
    ("lsq", 2, 2), ("lsq", 4, 4), ("lsq", 8, 8), ("lsq", 3, 5), ("lsq", 1, 8),
    ("dorefa", 1, 1), ("pact", 1, 1)])
def test_onnx_whole_quantized_model_within_1e4(tmp_path, quantizer, w_bits, a_bits):
    need("onnxruntime")
    model = dyadic_resnet8(quantizer, w_bits, a_bits)
    x = torch.randint(-8, 9, (8, 3, 32, 32), generator=torch.Generator().manual_seed(2)) / 4
    with torch.inference_mode():
        expected = model(x).numpy()
    got = run_onnx(to_onnx(model, tmp_path / "m.onnx"), x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert expected.std(axis=0).min() > 0  # every logit varies across images


@pytest.mark.parametrize("bits, dtype",
                         [(1, "INT8"), (4, "INT8"), (8, "INT8"), (16, "INT16"), (32, None)])
def test_onnx_stores_integer_weights(tmp_path, bits, dtype):
    """<= 8 bits: one byte per weight; 16 bits: two; 32 bits: fp32 as before."""
    onnx = need("onnx")
    model = trained_like("dorefa", bits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    proto = onnx.load(str(to_onnx(model, tmp_path / "m.onnx")))
    onnx.checker.check_model(proto)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    by_type = {}
    for init in proto.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type)
        by_type[name] = by_type.get(name, 0) + int(np.prod(init.dims))
    quantized = sum(layer.weight.numel() for _, layer in quantized_layers(model)
                    if layer.w_bits < 32)
    if dtype is None:
        assert set(by_type) == {"FLOAT"}
    else:
        assert by_type[dtype] == quantized
    assert by_type["FLOAT"] \
        < sum(p.numel() for p in model.parameters()) - (quantized if dtype else 0) + 2000


# =========================================================================== ONNX: committed models
# The committed quick-grid models on real CIFAR-100 test images. ONNX Runtime convolves in
# another summation order than PyTorch (and PyTorch's own order changes with the batch size), so
# a pre-activation lying within float rounding error of a rounding tie of the next activation
# quantizer can land one level away, and that one flip moves the logits by up to ~1 at 2 bits.
# What holds, and is asserted: with every activation code equal the logits agree within 1e-4;
# each image's first differing codes are one level apart, at a tie; the top-1 class almost
# always agrees. The same figures on all 10,000 images: results/quick/onnx_agreement.json
# (`python -m kdlib onnx`).
MODELS_DIR = Path(__file__).resolve().parents[1] / "results" / "quick" / "models"
N_REAL_IMAGES = 200
# A first flip: kdlib's input to the quantizer within this of a tie (fp32 resolves 1.2e-7 at 1.0,
# the inputs are O(1); onnx_agreement.json's tie distance for 10,000 images). A graph whose scale
# is off by 1e-4 flips codes up to 1e-4 from a tie and fails at every width.
TIE_TOLERANCE = 1e-5


def committed_model(bits: int) -> nn.Module:
    """The committed ResNet-20 of seed 0 at ``bits``: the TA-chain student, or at 32 the teacher."""
    method = "teacher" if bits == 32 else "ta_chain"
    pattern = f"resnet20-{method}-w{bits}a{bits}-s0-*.packed"
    found = sorted(MODELS_DIR.glob(pattern))
    if not found:
        pytest.fail(f"no committed model {pattern} in {MODELS_DIR}")
    return load_packed(found[-1])


@pytest.fixture(scope="module")
def real_test_images(real_data_root) -> torch.Tensor:
    """The first test images of the real CIFAR-100, normalised as kdlib feeds its models."""
    images_u8, _ = load_cifar100(real_data_root, train=False, download=False)
    return normalize(images_u8[:N_REAL_IMAGES])


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2, 1])
@pytest.mark.slow
def test_onnx_matches_committed_models_up_to_activation_codes_flipped_at_ties(
        tmp_path, real_test_images, bits):
    need("onnxruntime")
    model = committed_model(bits)
    x = real_test_images
    path = to_onnx(model, tmp_path / "m.onnx")
    expected, scaled = agreement.quantizer_inputs(model, x)
    plain, _ = agreement.onnx_sessions(path)
    got, *codes = plain.run(None, {"images": x.numpy()})
    assert len(codes) == len(scaled) == (0 if bits == 32 else 18)  # ResNet-20: 18 quantized convs

    flipped, first_flips = agreement.first_flips(scaled, codes, len(x))
    assert all(np.array_equal(np.abs(kd - ort), np.ones(len(kd))) for _, kd, ort, _ in first_flips)
    levels = [(1 << bits) - 1] * len(scaled)
    assert agreement.tie_distances(first_flips, levels).max(initial=0) <= TIE_TOLERANCE

    logit_diff = np.abs(got - expected).max(axis=1)
    assert logit_diff[~flipped].max(initial=0) <= 1e-4
    if bits == 16:  # 65,535 levels: some code flips on every image; the tie check is the test
        assert flipped.all()
    else:  # the 1e-4 check covers many images: all 200 at 32 and 1 bit, 47 at 8 bits on an AMD
        assert (~flipped).mean() >= 0.1  # EPYC (22 % of 10,000 there: onnx_agreement.json)
    default = run_onnx(path, x)  # ORT's default optimisations: what a user runs
    # onnx_agreement.json: the top-1 class equal on >= 99.7 % of 10,000 images at every width
    assert np.mean(default.argmax(1) == expected.argmax(1)) >= 0.98


@pytest.mark.parametrize("w_bits, a_bits", [(4, 32), (32, 32)])
def test_the_export_copy_of_a_model_with_unquantized_activations_keeps_the_blocks_relu(
        w_bits, a_bits):
    """A plain conv has no input quantizer to stand in for the ReLU inside a residual block:
    the export copy must keep that ReLU and compute what the model computes."""
    from kdlib.export.onnx_graph import export_copy

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, w_bits=w_bits, a_bits=a_bits).train()
    with torch.no_grad():
        model(images(8))  # BN running statistics off their identity start
    model.eval()
    x = images(4)
    with torch.inference_mode():
        torch.testing.assert_close(export_copy(model)(x), model(x), rtol=1e-5, atol=1e-5)


def _conv_model_with_every_conv_option() -> nn.Module:
    """A quantized conv with a bias, groups, dilation, stride and padding (ResNet's convs have
    none of these but stride and padding), then a quantized linear; left in train mode."""
    from kdlib.quant import QConv2d

    torch.manual_seed(0)
    model = nn.Sequential(
        QConv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True, w_bits=4, a_bits=4),
        nn.BatchNorm2d(6), nn.Flatten(), QLinear(6 * 4 * 4, 5, w_bits=4, a_bits=4))
    with torch.no_grad():
        model[0].bias.uniform_(-1, 1)
        model(torch.rand(8, 4, 8, 8))  # BN running statistics off their identity start
    return model.train()


def test_the_export_copy_keeps_every_conv_option_and_is_an_eval_copy():
    """Bias, groups and dilation of a conv reach the plain conv; the copy computes the model's
    eval-mode output even when the model is left in train mode, and has nothing to train."""
    from kdlib.export.onnx_graph import export_copy

    model = _conv_model_with_every_conv_option()
    plain = export_copy(model)
    assert model.training  # the model itself is not switched
    assert not any(m.training for m in plain.modules())  # BatchNorm on running statistics
    assert not any(p.requires_grad for p in plain.parameters())
    x = torch.rand(3, 4, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_the_export_copy_refuses_a_conv_padding_mode_other_than_zeros():
    """A plain conv pads with zeros only: another padding mode would change the values."""
    from kdlib.export.onnx_graph import export_copy
    from kdlib.quant import QConv2d

    model = nn.Sequential(QConv2d(3, 4, 3, padding=1, padding_mode="reflect", w_bits=4, a_bits=4))
    with pytest.raises(ValueError, match="padding_mode"):
        export_copy(model.eval())


def test_the_export_copy_of_signed_1_bit_lsq_activations_maps_zero_to_plus_one():
    """Signed 1-bit LSQ quantizes with sign(0) = +1; the plain module must agree at exactly 0."""
    from kdlib.export.onnx_graph import export_copy

    model = nn.Sequential(QLinear(8, 8, bias=False, a_bits=32))
    model[0].input_quantizer = LSQQuantizer(1, signed=True)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(8))
        model(torch.rand(2, 8))  # initialises the step
    x = torch.tensor([[0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 0.0, 2.0]])
    with torch.inference_mode():
        expected = model.eval()(x)
        assert torch.equal(expected[0, :2].sign(), torch.ones(2))  # kdlib: sign(0) = +1
        torch.testing.assert_close(export_copy(model)(x), expected, rtol=0, atol=0)


def test_to_onnx_creates_the_missing_parent_folders(tmp_path):
    need("onnx")
    model = _activation_reference_model("dorefa", 4)
    path = to_onnx(model, tmp_path / "a" / "b" / "m.onnx", input_shape=(64,))
    assert path == tmp_path / "a" / "b" / "m.onnx" and path.stat().st_size > 0


def test_the_export_copy_of_pact_activations_is_exact_for_any_alpha():
    """The plain PACT module scales by ``n / alpha`` computed as kdlib computes it: over many
    alphas and the inputs at and next to each rounding tie, its levels are kdlib's bit for bit."""
    from kdlib.export.onnx_graph import export_copy

    for bits in (2, 3, 4, 8):
        n = (1 << bits) - 1
        for alpha in torch.linspace(0.3, 7.0, 97).tolist():
            model = _activation_reference_model("pact", bits, scale=alpha)
            ties = (torch.arange(n, dtype=torch.float32) + 0.5) * (alpha / n)
            near = torch.cat([ties, torch.nextafter(ties, ties + 1),
                              torch.nextafter(ties, ties - 1)])
            x = torch.cat([near, torch.zeros(-len(near) % 64)]).reshape(-1, 64)
            with torch.no_grad():
                assert torch.equal(export_copy(model)(x), model[0].input_quantizer(x)), \
                    (bits, alpha)


def test_the_export_copy_refuses_a_bare_quantized_layer():
    """A bare layer has no parent to hold its plain replacement."""
    from kdlib.export.onnx_graph import export_copy

    with pytest.raises(ValueError, match="single quantized layer"):
        export_copy(QLinear(4, 3, w_bits=4).eval())


def test_to_onnx_writes_the_documented_opset(tmp_path):
    onnx = need("onnx")
    from kdlib.export.onnx_graph import OPSET

    path = to_onnx(_activation_reference_model("dorefa", 4), tmp_path / "m.onnx", input_shape=(64,))
    assert {o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")} \
        == {OPSET}
    assert OPSET == 17  # the module docstring's opset
