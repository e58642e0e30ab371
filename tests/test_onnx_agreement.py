"""kdlib.export.agreement and `python -m kdlib onnx`: how ONNX Runtime agrees with kdlib."""
from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kdlib import cli
from kdlib.config import RunConfig
from kdlib.data import load_cifar100
from kdlib.export import agreement, save_packed
from kdlib.models import create_model
from kdlib.results import packed_path, save_record
from kdlib.train import evaluate

from conftest import on_ci

# the export extra: a skip here, but CI's dev extra installs it and there a skip would hide
# that these tests never ran
onnxruntime = (importlib.import_module if on_ci() else pytest.importorskip)("onnxruntime")


def model_like_trained(bits: int, quantizer: str = "dorefa") -> nn.Module:
    """A resnet8 whose BatchNorm statistics come from one batch (activations of unit scale, so
    that codes spread over the levels as in a trained model)."""
    torch.manual_seed(bits)
    model = create_model("resnet8", num_classes=100, w_bits=bits, a_bits=bits,
                         quantizer=quantizer)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    return model.eval()


def test_first_flips_finds_each_images_first_differing_layer_and_its_distance_to_a_tie():
    # image 0 agrees; image 1 differs at layer 1; image 2 at layer 0, and again at layer 1
    layer0 = np.array([[0.2, 1.0], [2.0, 3.0], [1.4999999, 0.0]])
    layer1 = np.array([[0.0, 1.0], [2.5000002, 1.0], [3.0, 2.0]])
    codes0 = np.array([[0.0, 1.0], [2.0, 3.0], [2.0, 0.0]])
    codes1 = np.array([[0.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    flipped, found = agreement.first_flips([layer0, layer1], [codes0, codes1], 3)
    assert flipped.tolist() == [False, True, True]
    assert [(layer, kd.tolist(), ort.tolist()) for layer, kd, ort, _ in found] == [
        (0, [1.0], [2.0]), (1, [3.0], [2.0])]  # image 2 once, at its first layer
    distances = agreement.tie_distances(found, [3, 7])  # levels: 2 bits at 0, 3 bits at 1
    assert distances == pytest.approx([1e-7 / 3, 2e-7 / 7], abs=1e-9)


def test_a_model_agrees_where_no_code_flips_and_kdlib_evaluates_as_the_runs_do(fake_data_root):
    images, labels = load_cifar100(fake_data_root, train=False, download=False)
    images, labels = images[:24], labels[:24]
    model = model_like_trained(2)
    measured = agreement.measure(model, images, labels, batch_size=8, self_images=5)
    assert measured["images"] == 24 and measured["self_images"] == 5
    assert measured["unflipped_max_diff"] <= agreement.TOLERANCE
    assert measured["first_flips_one_level"] and measured["tie_distance"] <= 1e-5
    assert 0 <= measured["flipped"] <= 1 and measured["top1_equal"] >= 0.9
    # the kdlib side is evaluate()'s, channels_last as the runs evaluated
    top1 = evaluate(model, images, labels, batch_size=8, channels_last=True)["top1"]
    assert measured["accuracy_kdlib"] == pytest.approx(top1)


def test_measuring_refuses_activations_it_cannot_read_codes_of(fake_data_root):
    images, labels = load_cifar100(fake_data_root, train=False, download=False)
    with pytest.raises(ValueError, match="PACTActivationQuantizer"):
        agreement.measure(model_like_trained(4, "pact"), images[:4], labels[:4])


def _save_run(folder, cfg: RunConfig, top1: float = 99.0) -> None:
    metrics = {"best_epoch": 1, "best_val_top1": 1.0, "best_val_top5": 5.0, "test_top1": top1,
               "test_top5": 5.0, "final_test_top1": 1.0, "final_test_top5": 5.0}
    save_record(folder, {"run_id": cfg.run_id(), "config": cfg.to_dict(), "metrics": metrics,
                         "history": [{}]})
    save_packed(model_like_trained(cfg.w_bits), packed_path(folder, cfg.run_id()),
                model_name=cfg.model, run_id=cfg.run_id())


def test_the_command_measures_the_teacher_and_the_method_and_the_readme_shows_it(
        tmp_path, fake_data_root, capsys):
    teacher = RunConfig(model="resnet8", method="teacher", seed=0)
    link = RunConfig(model="resnet8", method="ta_chain", w_bits=2, a_bits=2, seed=0,
                     teacher_id=teacher.run_id(), init_id=teacher.run_id())
    other = RunConfig(model="resnet8", method="progressive", w_bits=1, a_bits=1, seed=0)
    for cfg in (teacher, link, other):
        _save_run(tmp_path, cfg)
    assert agreement.render_onnx_agreement(tmp_path).startswith("_Not measured")
    assert cli.main(["onnx", "--results-dir", str(tmp_path), "--data-dir", str(fake_data_root),
                     "--images", "12"]) == 0
    result = json.loads((tmp_path / agreement.RESULT_FILE).read_text())
    assert [(m["run_id"], m["bits"]) for m in result["models"]] == [
        (teacher.run_id(), 32), (link.run_id(), 2)]  # not the other method's
    assert all(m["images"] == 12 for m in result["models"])
    assert result["models"][0]["flipped"] == 0  # no activation quantizer, nothing to flip
    table = agreement.render_onnx_agreement(tmp_path)
    assert "| 32 " in table and "| 2 " in table and "| 1 " not in table
    assert "`ta_chain` of seed 0" in table and "first 12 CIFAR-100 test images" in table
    assert "a subset: its test top-1 is not the records'" in table  # of the 200 fake ones
    assert f"in {result['seconds'] / 60:.1f} minutes." in table and result["seconds"] > 0
    assert "wrote" in capsys.readouterr().out and "Stale" not in table
    assert cli.main(["onnx", "--results-dir", str(tmp_path), "--data-dir", str(fake_data_root)
                     ]) == 0  # all 200 test images: compared with the records' 99% (untrained)
    assert "kdlib's test top-1 is NOT each run's recorded one" in agreement.render_onnx_agreement(
        tmp_path)
    _save_run(tmp_path, link, top1=2.0)  # retrained since: the table no longer describes it
    assert f"**Stale:** the records of `{link.run_id()}`" in agreement.render_onnx_agreement(
        tmp_path)


def test_the_command_refuses_a_folder_without_the_methods_models(tmp_path, fake_data_root,
                                                                  capsys):
    _save_run(tmp_path, RunConfig(model="resnet8", method="progressive", w_bits=1, a_bits=1))
    assert cli.main(["onnx", "--results-dir", str(tmp_path), "--data-dir", str(fake_data_root),
                     "--seed", "3"]) == cli.EXIT_USAGE
    assert "no packed model of `ta_chain` or the teacher, seed 3" in capsys.readouterr().err
    assert cli.main(["onnx", "--results-dir", str(tmp_path), "--method", "nope"]) == cli.EXIT_USAGE
    assert cli.main(["onnx", "--results-dir", str(tmp_path), "--images", "0"]) == cli.EXIT_USAGE
    assert not (tmp_path / agreement.RESULT_FILE).exists()


def test_without_onnxruntime_the_command_names_the_extra_before_reading_data(tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an import of it then raises
    assert cli.main(["onnx", "--results-dir", str(tmp_path), "--data-dir",
                     str(tmp_path / "no-data-here")]) == cli.EXIT_USAGE
    assert "needs onnxruntime: pip install -e '.[export]'" in capsys.readouterr().err


@pytest.mark.parametrize("value, text", [(1.017e-06, "1.1e-06"), (9e-06, "9e-06"),
                                         (8.61e-06, "8.7e-06"), (0.00028, "0.00028"),
                                         (2.0, "2"), (0.0, "0")])
def test_a_bound_is_rounded_up_never_down(value, text):
    """The table's 'within' figures: 1.017e-06 printed as 1e-06 claimed a bound it broke."""
    assert agreement.bound_text(value) == text
    assert float(text) >= value
