"""How ONNX Runtime's logits agree with kdlib's on one model and one set of images: the
figures of README "Use a trained model" (``python -m kdlib onnx`` measures the committed
models of a preset into ``onnx_agreement.json``, :func:`render_onnx_agreement` draws them).

ORT computes kdlib's operations on kdlib's values but sums its convolutions in another order,
as PyTorch itself does at another batch size. A pre-activation within float rounding of a
rounding tie of the next activation quantizer then lands one level away, and the flip moves the
logits. So, per model (:func:`measure`):

* ``flipped``: the share of images on which some activation code differs between kdlib and ORT
  without graph optimisations (each ``Round`` stays as written, and its output is compared);
* ``unflipped_max_diff``: the largest logit difference on the other images, which the export
  promises within 1e-4; ``tie_distance``: how far from a tie kdlib's quantizer input lay at
  each image's first flip, in input units (a graph whose scale is off flips far from ties);
* ``within_tolerance``, ``max_diff``, ``top1_equal``, the two test accuracies: ORT with its
  default optimisations, what a user runs, against kdlib;
* ``self_within_tolerance``, ``self_max_diff``: kdlib against itself, one image a batch against
  the measured batch size, on the first ``self_images`` images.

kdlib evaluates as its runs do (channels_last, :func:`kdlib.train.evaluate`'s batch size).
"""
from __future__ import annotations

import importlib
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from kdlib.checkout import shown_path
from kdlib.data import eval_batches
from kdlib.export.onnx_graph import INPUT_NAME, to_onnx
from kdlib.export.packed import load_packed
from kdlib.fileio import write_json_atomic
from kdlib.markdown import markdown_table
from kdlib.quant import DoReFaActivationQuantizer, quantized_layers
from kdlib.results import bits_label, environment_info, load_results, packed_path

TOLERANCE, TOLERANCE_TEXT = 1e-4, "1e-4"  # what the export promises where no code flips
BATCH_SIZE = 1000  # kdlib.train.evaluate's
SELF_IMAGES = 1000  # images kdlib also evaluates one at a time (about 7 s a model on 2 cores)


def onnxruntime():
    """The onnxruntime module, or an ImportError that names the extra that installs it."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ImportError("measuring ONNX agreement needs onnxruntime: pip install -e "
                          "'.[export]' (or onnx onnxruntime)") from exc


def _logits(model: nn.Module, x: Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).float().numpy()


def quantizer_inputs(model: nn.Module, x: Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """kdlib's logits and, per active activation quantizer in call order, its input on the level
    scale, ``n * clamp(x, 0, 1)`` (the codes are this value rounded; n = 2^bits - 1)."""
    scaled, hooks = [], []
    for _, layer in quantized_layers(model):
        quantizer = layer.input_quantizer
        if not quantizer.active:
            continue
        if not isinstance(quantizer, DoReFaActivationQuantizer):
            raise ValueError(f"ONNX agreement compares DoReFa activation codes; this model's "
                             f"activations are quantized by {type(quantizer).__name__}")
        levels = (1 << quantizer.bits) - 1
        hooks.append(quantizer.register_forward_pre_hook(
            lambda _, inputs, n=levels: scaled.append(
                (torch.clamp(inputs[0], 0, 1) * n).float().contiguous().numpy())))
    try:
        logits = _logits(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, scaled


def onnx_sessions(path: Path):
    """(ORT without graph optimisations, every ``Round`` output added to the graph's outputs:
    the activation codes in kdlib's call order; ORT with its default optimisations)."""
    import onnx  # the export extra's, as to_onnx needs it

    ort = onnxruntime()
    proto = onnx.load(str(path))
    rounds = [node.output[0] for node in proto.graph.node if node.op_type == "Round"]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in rounds)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    cpu = ["CPUExecutionProvider"]
    return (ort.InferenceSession(proto.SerializeToString(), options, providers=cpu),
            ort.InferenceSession(str(path), providers=cpu))


Flip = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # layer, kdlib's codes, ORT's, kdlib's input


def first_flips(scaled: Sequence[np.ndarray], codes: Sequence[np.ndarray], n_images: int
                ) -> tuple[np.ndarray, list[Flip]]:
    """Per image of ``n_images``, whether any code differs between kdlib (``scaled`` rounded)
    and ORT (``codes``), layer by layer in call order; and for each image that has one, at its
    first layer with a difference: that layer's index, kdlib's codes, ORT's codes and kdlib's
    input on the level scale at the differing positions."""
    flipped = np.zeros(n_images, dtype=bool)
    found = []
    for layer, (kd_scaled, ort_codes) in enumerate(zip(scaled, codes, strict=True)):
        kd_scaled, ort_codes = kd_scaled.reshape(n_images, -1), ort_codes.reshape(n_images, -1)
        differs = np.round(kd_scaled) != ort_codes
        for i in np.flatnonzero(differs.any(axis=1) & ~flipped):
            at = differs[i]
            found.append((layer, np.round(kd_scaled[i, at]), ort_codes[i, at], kd_scaled[i, at]))
        flipped |= differs.any(axis=1)
    return flipped, found


def tie_distances(found: Sequence[Flip], levels: Sequence[int]) -> np.ndarray:
    """How far each first-flip input lay from a rounding tie, in the quantizer's input units
    (``found`` as :func:`first_flips` gives it; ``levels``: each layer's 2^bits - 1)."""
    return np.concatenate([np.abs(s - np.floor(s) - 0.5) / levels[layer]
                           for layer, _, _, s in found] + [np.zeros(0)])


def measure(model: nn.Module, images_u8: Tensor, labels: Tensor, *,
            batch_size: int = BATCH_SIZE, self_images: int = SELF_IMAGES) -> dict[str, Any]:
    """ORT against kdlib on ``model`` (eval mode, CPU) and uint8 ``images_u8``: the figures
    the module docstring lists."""
    model = model.eval()
    levels = [(1 << layer.input_quantizer.bits) - 1 for _, layer in quantized_layers(model)
              if layer.input_quantizer.active]  # per active quantizer, as quantizer_inputs
    with tempfile.TemporaryDirectory() as tmp:
        plain, default = onnx_sessions(to_onnx(model, Path(tmp) / "model.onnx"))
    flipped, kd_all, ort_all, ties, one_level = [], [], [], [], True
    unflipped_max = 0.0
    for x, _ in eval_batches(images_u8, labels, batch_size, channels_last=True):
        logits, scaled = quantizer_inputs(model, x)
        feed = {INPUT_NAME: x.contiguous().numpy()}
        plain_logits, *codes = plain.run(None, feed)
        batch_flipped, found = first_flips(scaled, codes, len(x))
        ties.append(tie_distances(found, levels))
        one_level &= all(np.array_equal(np.abs(kd - o), np.ones(len(kd))) for _, kd, o, _ in found)
        diff = np.abs(plain_logits - logits).max(axis=1)
        unflipped_max = max(unflipped_max, float(diff[~batch_flipped].max(initial=0.0)))
        flipped.append(batch_flipped)
        kd_all.append(logits)
        ort_all.append(default.run(None, feed)[0])
    kd_logits, ort_logits = np.concatenate(kd_all), np.concatenate(ort_all)
    diff = np.abs(ort_logits - kd_logits).max(axis=1)
    truth = labels.numpy()
    alone = min(self_images, len(truth))
    one_at_a_time = np.concatenate([_logits(model, x) for x, _ in eval_batches(
        images_u8[:alone], labels[:alone], 1, channels_last=True)])
    self_diff = np.abs(one_at_a_time - kd_logits[:alone]).max(axis=1)
    return {
        "images": len(truth), "batch_size": batch_size, "self_images": alone,
        "flipped": float(np.concatenate(flipped).mean()),
        "unflipped_max_diff": unflipped_max,
        "tie_distance": float(np.concatenate(ties).max(initial=0.0)),
        "first_flips_one_level": bool(one_level),
        "within_tolerance": float((diff <= TOLERANCE).mean()), "max_diff": float(diff.max()),
        "top1_equal": float((ort_logits.argmax(1) == kd_logits.argmax(1)).mean()),
        "accuracy_kdlib": float((kd_logits.argmax(1) == truth).mean() * 100),
        "accuracy_onnx": float((ort_logits.argmax(1) == truth).mean() * 100),
        "self_within_tolerance": float((self_diff <= TOLERANCE).mean()),
        "self_max_diff": float(self_diff.max()),
    }


RESULT_FILE = "onnx_agreement.json"  # in a preset's results folder


def measure_committed(results_dir: str | Path, images_u8: Tensor, labels: Tensor, *,
                      method: str = "ta_chain", seed: int = 0, limit: int | None = None,
                      log=print) -> dict[str, Any]:
    """:func:`measure` on each packed model of ``method`` and the teacher (its 32-bit row) of
    ``seed`` that ``results_dir`` records and holds, on the test set ``images_u8`` (its first
    ``limit`` images); written to ``results_dir``/:data:`RESULT_FILE` and returned. A
    ValueError names what is missing."""
    import onnx  # the export extra's, as to_onnx needs it

    started = time.monotonic()
    frame = load_results(results_dir)
    rows = frame[frame["method"].isin(["teacher", method]) & (frame["seed"] == seed)
                 & frame["packed_file"]]
    if rows.empty:
        raise ValueError(f"no packed model of `{method}` or the teacher, seed {seed}, in "
                         f"{Path(results_dir) / 'models'}: train them first (`make run`)")
    rows = rows.sort_values("w_bits", ascending=False)
    test_set = len(labels)
    images_u8, labels = images_u8[:limit], labels[:limit]
    models = []
    for row in rows.itertuples():
        log(f"onnx: {row.run_id} on {len(labels)} test images")
        measured = measure(load_packed(packed_path(results_dir, row.trained_as)), images_u8,
                           labels)
        models.append({"run_id": row.run_id, "bits": int(row.w_bits), "a_bits": int(row.a_bits),
                       "record_test_top1": float(row.test_top1), **measured})
    result = {"method": method, "seed": seed, "test_set_images": test_set,
              "versions_onnx": {"onnx": onnx.__version__,
                                "onnxruntime": onnxruntime().__version__},
              **environment_info(), "models": models,
              "seconds": time.monotonic() - started}
    write_json_atomic(Path(results_dir) / RESULT_FILE, result)
    return result


def _percent(share: float) -> str:
    """A share as a percentage, to the digit that tells 99.9 % from 100 % and 0.3 % from 0."""
    value = 100 * share
    if value in (0, 100):
        return f"{value:.0f} %"
    return f"{value:.2f} %" if value < 1 or value > 99 else f"{value:.1f} %"


def bound_text(value: float) -> str:
    """``value`` rounded up to two significant digits: a "within" that rounding never makes
    false (1.017e-06 is within 1.1e-06, not within 1e-06)."""
    if value <= 0:
        return "0"
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return f"{math.ceil(round(value / step, 9)) * step:.2g}"


def render_onnx_agreement(results_dir: str | Path) -> str:
    """Markdown: the table of ``results_dir``/:data:`RESULT_FILE`, what it was measured on, and
    whether its runs' records still hold the test top-1 they held then (else it is stale)."""
    path = Path(results_dir) / RESULT_FILE
    if not path.exists():
        return f"_Not measured in `{shown_path(results_dir)}` yet: `python -m kdlib onnx`._"
    result = json.loads(path.read_text())
    models = result["models"]
    table = pd.DataFrame([{
        "bits": bits_label(m["bits"], m["a_bits"]),
        "images with a flipped code": _percent(m["flipped"]),
        f"logits within {TOLERANCE_TEXT}": _percent(m["within_tolerance"]),
        "largest logit difference": f"{m['max_diff']:.2g}",
        "top-1 class equal": _percent(m["top1_equal"]),
        "test top-1, kdlib / ORT": f"{m['accuracy_kdlib']:.2f} / {m['accuracy_onnx']:.2f}",
        f"kdlib, batch 1 vs {m['batch_size']}: within {TOLERANCE_TEXT}":
            _percent(m["self_within_tolerance"]),
    } for m in models]).set_index("bits")
    recorded = load_results(results_dir).set_index("run_id")["test_top1"].to_dict()
    stale = [m["run_id"] for m in models if recorded.get(m["run_id"]) != m["record_test_top1"]]
    first = models[0]
    subset = first["images"] < result.get("test_set_images", first["images"])
    if subset:
        compared = "a subset: its test top-1 is not the records'"
    elif all(abs(m["accuracy_kdlib"] - m["record_test_top1"]) < 0.005 for m in models):
        compared = "kdlib's test top-1 is each run's recorded one"
    else:
        compared = "kdlib's test top-1 is NOT each run's recorded one"
    took = f" in {result['seconds'] / 60:.1f} minutes" if "seconds" in result else ""
    one_level = ("one level" if all(m["first_flips_one_level"] for m in models)
                 else "NOT always one level")
    lines = [markdown_table(table), "", (
        f"`{result['method']}` of seed {result['seed']} (32 bit: its teacher), "
        f"{'the first' if subset else 'all'} {first['images']:,} CIFAR-100 test images in "
        f"batches of {first['batch_size']} "
        f"(channels_last, as the runs evaluated; {compared}), onnxruntime "
        f"{result['versions_onnx']['onnxruntime']} with its default optimisations; flips "
        f"counted without optimisations, where each Round stays as written. On the images "
        f"without a flip the logits agree within "
        f"{bound_text(max(m['unflipped_max_diff'] for m in models))}; each image's first flip "
        f"is {one_level}, its input within {bound_text(max(m['tie_distance'] for m in models))} "
        f"of a "
        f"rounding tie. kdlib against itself: the first {first['self_images']:,} images one a "
        f"batch. Measured on {result['cpu_model']}, torch {result['versions']['torch']}, by "
        f"`python -m kdlib onnx`{took}.")]
    if stale:
        lines += ["", f"**Stale:** the records of {', '.join(f'`{r}`' for r in stale)} no "
                      "longer hold the test top-1 these models had (retrained or removed): "
                      "`python -m kdlib onnx` measures them again."]
    return "\n".join(lines)
