"""The packed model file: quantized weights as bit-packed integer codes, everything else raw.

Layout (all integers little-endian)::

    8 bytes   magic b"KDLPACK\\0"
    4 bytes   uint32 header length H
    32 bytes  sha256 of the header bytes
    H bytes   header, UTF-8 JSON
    ...       payload: the tensors' bytes, back to back, in the header's order

The header holds ``format``, ``format_version``, ``model`` (registry name and the
:func:`kdlib.models.create_model` arguments ``num_classes, w_bits, a_bits, quantizer,
quantize_first_last``), ``kdlib_version``, ``run_id``, ``byte_order``, ``payload_length``,
``payload_sha256`` and ``tensors``: one entry per ``state_dict`` key with ``name, dtype, shape,
offset, length, encoding`` (plus ``bits`` and ``scale`` for coded weights).

* The weight of every quantized layer (``w_bits`` < 32) is stored as its integer codes packed
  at ``w_bits`` bits (see :func:`kdlib.export.codes.pack_codes`: 1-bit codes 8 per byte, 3-bit
  codes 8 per 3 bytes, 16-bit codes 2 bytes) with ``encoding`` dorefa / lsq / sign and, for
  lsq and sign, the fp32 ``scale`` (LSQ step, or E|w| of 1-bit DoReFa) in the header as an
  exact decimal. :mod:`kdlib.export.codes` gives the arithmetic; it rebuilds the weight bit for
  bit.
* Every other tensor is stored raw (``encoding`` "raw") in its own dtype: float32 for
  full-precision layers (32-bit weights, the first/last layer unless ``quantize_first_last``),
  biases, BatchNorm weight/bias/running mean/running var and quantizer state (PACT ``alpha``,
  LSQ ``step``); BatchNorm's ``num_batches_tracked`` as int64 and LSQ's ``initialized`` flag as
  bool (1 byte).

The sha256 digests detect truncation and accidental corruption (they are not a signature).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdlib
from kdlib.export.codes import (SCALED_ENCODINGS, WeightCodes, codes_to_levels, dequantize,
                                encode_model_weights, level_range, pack_codes, packed_length,
                                unpack_codes)
from kdlib.fileio import atomic_open
from kdlib.models import create_model
from kdlib.quant import quantized_layers

__all__ = ["save_packed", "load_packed", "read_packed_header", "FORMAT", "FORMAT_VERSION"]

FORMAT = "kdlib-packed"
FORMAT_VERSION = 1
MAGIC = b"KDLPACK\x00"
_PREAMBLE = struct.Struct("<8sI32s")  # magic, header length, sha256 of the header
RAW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64, "int64": torch.int64, "bool": torch.bool}
MODEL_ARGS = ("num_classes", "w_bits", "a_bits", "quantizer", "quantize_first_last")


# ============================================================================ model arguments
def _build_model(name: str, args: dict[str, Any]) -> nn.Module:
    """``create_model`` without disturbing the caller's random number stream."""
    with torch.random.fork_rng(devices=[]):
        return create_model(name, **args)


def _architecture(model: nn.Module) -> list[tuple]:
    """What must agree for a rebuilt model to hold the same tensors and quantize the same way."""
    tensors = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    layers = [(n, m.w_bits, m.a_bits, m.quantizer, m.quantize_input)
              for n, m in quantized_layers(model)]
    return tensors + layers


def model_arguments(model: nn.Module, model_name: str) -> dict[str, Any]:
    """The ``create_model`` arguments that rebuild ``model``, read off its quantized layers.

    Inner layers carry ``w_bits``/``a_bits`` (edge layers as many or 32); the classifier is the
    last quantized layer and quantizes its input only with ``quantize_first_last``. Checked by
    rebuilding: ValueError if ``create_model(model_name, **args)`` differs from ``model``.
    """
    layers = [m for _, m in quantized_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QConv2d/QLinear layer: not a kdlib model")
    families = sorted({m.quantizer for m in layers})
    if len(families) != 1:
        raise ValueError(f"model mixes quantizers {families}; kdlib models use one")
    args = {"num_classes": int(layers[-1].weight.shape[0]), "w_bits": min(m.w_bits for m in layers),
            "a_bits": min(m.a_bits for m in layers), "quantizer": families[0],
            "quantize_first_last": bool(layers[-1].quantize_input)}
    mine, rebuilt = _architecture(model), _architecture(_build_model(model_name, args))
    differences = [f"{a} vs {b}" for a, b in zip(mine, rebuilt) if a != b]
    if differences or len(mine) != len(rebuilt):
        raise ValueError(f"{type(model).__name__} is not create_model({model_name!r}, **{args}) "
                         f"(first differences, this model vs rebuilt: {differences[:3]}); "
                         "pass the registry name the model was built with")
    return args


# ============================================================================ writing
def _raw_entry(name: str, tensor: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in RAW_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype}; accepted: {', '.join(RAW_DTYPES)}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    return {"name": name, "dtype": dtype, "shape": list(tensor.shape), "encoding": "raw"}, data


def _coded_entry(name: str, codes: WeightCodes) -> tuple[dict[str, Any], bytes]:
    entry = {"name": name, "dtype": "float32", "shape": list(codes.shape),
             "encoding": codes.encoding, "bits": codes.bits}
    if codes.scale is not None:
        entry["scale"] = codes.scale  # a float32 value; repr() of the double is exact
    return entry, pack_codes(codes.codes, codes.bits)


def save_packed(model: nn.Module, path: str | os.PathLike, *, model_name: str,
                run_id: str | None = None) -> Path:
    """Write ``model`` in the packed format (see the module docstring); returns the path.

    ``model_name`` is the registry name the model was built with (``RunConfig.model``): kdlib
    models do not know it. The other ``create_model`` arguments are read off the model and
    checked by rebuilding it. The weights written are those the model uses in eval: a frozen
    copy if valid, else the freshly quantized ``weight``. LSQ quantizers must be initialised.
    Constructor extras that leave the tensors unchanged (SqueezeNet's ``dropout``) and the
    layers' ``precision`` are not recorded. The file is written atomically.
    """
    args = model_arguments(model, model_name)
    coded = encode_model_weights(model)
    entries, chunks, offset = [], [], 0
    for name, tensor in model.state_dict().items():
        entry, data = _coded_entry(name, coded[name]) if name in coded else _raw_entry(name, tensor)
        entries.append({**entry, "offset": offset, "length": len(data)})
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "model": {"name": model_name, **args}, "kdlib_version": kdlib.__version__,
              "run_id": run_id, "byte_order": "little", "payload_length": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest(), "tensors": entries}
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        handle.write(_PREAMBLE.pack(MAGIC, len(header_bytes),
                                    hashlib.sha256(header_bytes).digest()))
        handle.write(header_bytes)
        handle.write(payload)
    return path


# ============================================================================ reading
def _split_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a packed file, every length and digest checked."""
    if not path.is_file():
        raise FileNotFoundError(f"packed model {path} does not exist")
    blob = path.read_bytes()
    if len(blob) < _PREAMBLE.size or blob[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a kdlib packed model (no {MAGIC!r} magic)")
    _, header_length, header_digest = _PREAMBLE.unpack_from(blob)
    header_end = _PREAMBLE.size + header_length
    if len(blob) < header_end:
        raise ValueError(f"{path} is truncated: {len(blob)} bytes, the header alone ends at "
                         f"{header_end}")
    header_bytes = blob[_PREAMBLE.size:header_end]
    if hashlib.sha256(header_bytes).digest() != header_digest:
        raise ValueError(f"{path} is corrupt: its header does not match its sha256")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ValueError(f"{path}: its header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {header.get('format')!r} version "
                         f"{header.get('format_version')!r}; accepted: {FORMAT!r} version "
                         f"{FORMAT_VERSION}")
    problem = _header_problem(header)
    if problem:
        raise ValueError(f"{path}: {problem}")
    if header.get("byte_order") != sys.byteorder:
        raise ValueError(f"{path} holds {header.get('byte_order')}-endian data; this machine is "
                         f"{sys.byteorder}-endian")
    payload = blob[header_end:]
    if len(payload) != header["payload_length"]:
        raise ValueError(f"{path} is truncated or has trailing bytes: payload of {len(payload)} "
                         f"bytes, the header says {header['payload_length']}")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise ValueError(f"{path} is corrupt: its payload does not match the sha256 in its header")
    return header, payload


_HEADER_FIELDS = {"model": dict, "payload_length": int, "payload_sha256": str, "tensors": list}
_TENSOR_FIELDS = {"name": str, "dtype": str, "shape": list, "offset": int, "length": int,
                  "encoding": str}


def _is(value: Any, kind: type) -> bool:
    """JSON type check: a bool is not a number here (Python counts it as an int)."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _header_problem(header: dict[str, Any]) -> str | None:
    """What in a header (whose digest matched: made by hand, or by a faulty writer) the reader
    could not use, or None: every field it reads, with its JSON type."""
    for key, kind in _HEADER_FIELDS.items():
        if not _is(header.get(key), kind):
            return f"header field {key!r} is missing or not a {kind.__name__}"
    if not _is(header["model"].get("name"), str):
        return "header field 'model' has no registry 'name'"
    for i, entry in enumerate(header["tensors"]):
        if not _is(entry, dict):
            return f"tensor entry {i} is not an object"
        coded = entry.get("encoding") != "raw"
        fields = {**_TENSOR_FIELDS, **({"bits": int} if coded else {}),
                  **({"scale": float} if "scale" in entry
                     or entry.get("encoding") in SCALED_ENCODINGS else {})}
        wrong = [key for key, kind in fields.items() if not _is(entry.get(key), kind)]
        shape = entry.get("shape")
        if isinstance(shape, list) and not all(_is(size, int) and size >= 0 for size in shape):
            wrong.append("shape")
        if not coded and entry.get("dtype") not in RAW_DTYPES:
            wrong.append("dtype")
        if wrong:
            return (f"tensor entry {i} ({entry.get('name')!r}): field(s) {sorted(set(wrong))} "
                    "missing or of the wrong type or value")
    return None


def read_packed_header(path: str | os.PathLike) -> dict[str, Any]:
    """The verified JSON header of a packed file (model, run id, versions, tensor table)."""
    return _split_file(Path(path))[0]


def header_size(path: str | os.PathLike) -> int:
    """Bytes before the payload of a packed file (preamble and JSON header): what the file
    spends besides its tensors. A ValueError for anything but a valid packed file."""
    read_packed_header(path)  # every length and digest checked
    with open(path, "rb") as handle:
        return _PREAMBLE.size + _PREAMBLE.unpack(handle.read(_PREAMBLE.size))[1]


def _expected_length(entry: dict[str, Any]) -> int:
    count = int(np.prod(entry["shape"], dtype=np.int64))
    if entry["encoding"] == "raw":
        return count * RAW_DTYPES[entry["dtype"]].itemsize
    return packed_length(count, entry["bits"])


def _decode(entry: dict[str, Any], data: bytes) -> torch.Tensor:
    shape = tuple(entry["shape"])
    if entry["encoding"] == "raw":
        return torch.frombuffer(bytearray(data),
                                dtype=RAW_DTYPES[entry["dtype"]]).reshape(shape).clone()
    encoding, bits = entry["encoding"], entry["bits"]
    count = int(np.prod(shape, dtype=np.int64))
    levels = codes_to_levels(encoding, bits, unpack_codes(data, bits, count))
    low, high = level_range(encoding, bits)
    if levels.size and (levels.min() < low or levels.max() > high):
        raise ValueError(f"codes out of range {low}..{high}")
    scale = torch.tensor(entry["scale"], dtype=torch.float32) if "scale" in entry else None
    return dequantize(encoding, bits, torch.from_numpy(levels).float(), scale).reshape(shape)


def _read_state(path: Path, header: dict[str, Any], payload: bytes,
                expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [e["name"] for e in header["tensors"]]
    if sorted(names) != sorted(expected):
        raise ValueError(f"{path}: tensors {sorted(set(names) ^ set(expected))[:5]} do not match "
                         f"{header['model']['name']}'s state_dict")
    state = {}
    for entry in header["tensors"]:
        name, offset, length = entry["name"], entry["offset"], entry["length"]
        if tuple(entry["shape"]) != tuple(expected[name].shape) \
                or length != _expected_length(entry) \
                or offset < 0 or offset + length > len(payload):
            raise ValueError(f"{path}: tensor {name!r} has an inconsistent shape/offset/length")
        try:
            state[name] = _decode(entry, payload[offset:offset + length])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: tensor {name!r} cannot be decoded ({exc})") from None
    return state


def _install_quantized_weights(model: nn.Module, coded: set[str]) -> None:
    """Make the dequantized ``.weight`` the layer's frozen quantized weight, for good.

    Quantizing an already quantized weight again does not give it back (DoReFa's tanh), so the
    frozen copy must be used in every forward: ``requires_grad=False`` makes it valid with or
    without grad mode (see ``_QuantizedLayer.quantized_weight``).
    """
    for name, layer in quantized_layers(model):
        if f"{name}.weight" in coded:
            layer.weight.requires_grad_(False)
            layer.frozen_weight = layer.weight.detach().clone()
            layer._frozen_version = layer.weight._version  # what QConv2d.freeze records


def load_packed(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model of a packed file (CPU, eval mode); its eval logits equal the original's.

    Reads only this format (no pickle). FileNotFoundError for a missing file; ValueError naming
    the file for anything else: not this format, a truncated file, a header or payload that does
    not match its sha256, a header without a field it reads (or of another type), or a tensor
    table that does not fit the model.

    The quantized layers hold the stored (dequantized) weights as ``.weight`` and as their
    frozen quantized weight, with ``requires_grad=False``: the original full-precision latent
    weights are not in the file, so this model is for inference (or for training the rest).
    """
    path = Path(path)
    header, payload = _split_file(path)
    with torch.inference_mode(False):  # ordinary tensors even when called under inference_mode
        return _rebuild(path, header, payload)


def _rebuild(path: Path, header: dict[str, Any], payload: bytes) -> nn.Module:
    spec = dict(header["model"])
    name = spec.pop("name")
    if sorted(spec) != sorted(MODEL_ARGS):
        raise ValueError(f"{path}: model arguments {sorted(spec)}; expected {list(MODEL_ARGS)}")
    try:
        model = _build_model(name, spec)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    state = _read_state(path, header, payload, model.state_dict())
    model.load_state_dict(state, strict=True)
    _install_quantized_weights(model, {e["name"] for e in header["tensors"]
                                       if e["encoding"] != "raw"})
    return model.eval()
