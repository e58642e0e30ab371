"""kdlib.bench: the benchmark's machinery and its report (behaviour only, no timing thresholds)."""
from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np
import pytest
import torch

from kdlib import bench
from kdlib.bench import (INFO_RATIOS, SKIPPED_NO_CUDA, TARGETS, VARIANTS, PILImageDataset,
                         compute_ratios, render_markdown, run_benchmark, typical_loader)

TINY = dict(batch_size=4, windows=3, steps=1, warmup=0, matmul_size=32, matmul_reps=2,
            flops_probe_batch=2)


def _images(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            torch.randint(0, 100, (n,), generator=gen))


@pytest.fixture(scope="module")
def tiny_result() -> dict:
    images, labels = _images()
    return run_benchmark(images, labels, device="cpu", data_source="generated", log=lambda m: None,
                         **TINY)


# ----------------------------------------------------------------------------- the result dict
def test_result_has_every_field(tiny_result):
    r = json.loads(json.dumps(tiny_result, allow_nan=False))  # plain JSON, no NaN
    assert r["format"] == 1 and r["date"]
    for key in ("host", "cpu_model", "cores", "torch", "threads", "device"):
        assert r["machine"][key] not in (None, ""), key
    assert r["machine"]["device"] == "cpu" and r["machine"]["threads"] == torch.get_num_threads()
    expected = {"batch_size": 4, "windows": 3, "steps": 1, "warmup": 0, "data": "generated"}
    assert {k: r["settings"][k] for k in expected} == expected
    assert list(r["variants"]) == [v.name for v in VARIANTS]
    for v in VARIANTS:
        entry = r["variants"][v.name]
        assert entry["label"] == v.label
        if v.cuda_only:
            assert entry["status"] == SKIPPED_NO_CUDA  # device="cpu" above
            assert "images_per_s" not in entry
            continue
        assert entry["status"] == "ok"
        assert len(entry["images_per_s_windows"]) == 3 and len(entry["step_ms_windows"]) == 3
        assert entry["images_per_s"] == statistics.median(entry["images_per_s_windows"])
        assert entry["step_ms"] == statistics.median(entry["step_ms_windows"])
        for ips, ms in zip(entry["images_per_s_windows"], entry["step_ms_windows"]):
            assert ips > 0 and math.isclose(ips * ms / 1000.0, 4)  # steps=1, batch 4
        assert len(entry["cpu_per_wall_windows"]) == 3
        assert all(c >= 0 for c in entry["cpu_per_wall_windows"])
    assert set(r["ratios"]) == set(TARGETS) | set(INFO_RATIOS)
    assert r["load_average_start"] is None or len(r["load_average_start"]) == 3


def test_ratios_are_computed_from_the_measured_step_times(tiny_result):
    v = tiny_result["variants"]
    for key, (_, num, den, op, target) in TARGETS.items():
        ratio = tiny_result["ratios"][key]
        assert ratio["value"] == pytest.approx(v[num]["step_ms"] / v[den]["step_ms"], rel=1e-12)
        assert ratio["target"] == target and ratio["op"] == op
        assert ratio["met"] == (ratio["value"] >= target if op == ">=" else ratio["value"] <= target)
    for key, (_, num, den) in INFO_RATIOS.items():
        ratio = tiny_result["ratios"][key]
        assert ratio["value"] == pytest.approx(v[num]["step_ms"] / v[den]["step_ms"], rel=1e-12)
        assert ratio["target"] is None and ratio["met"] is None
    f = tiny_result["flops"]
    assert f["train_per_step"] == pytest.approx(f["train_per_image"] * 4)
    assert f["train_per_image"] > 2.5 * f["forward_per_image"] > 0  # backward ~ 2x forward
    assert f["achieved_gflops_fp32"] == pytest.approx(
        f["train_per_step"] / (v["fp32"]["step_ms"] / 1000) / 1e9)
    assert f["matmul"]["gflops"] == statistics.median(f["matmul"]["gflops_windows"])
    assert f["fraction_of_matmul"] == pytest.approx(f["achieved_gflops_fp32"] / f["matmul"]["gflops"])


def test_resnet20_flop_count_is_the_known_one():
    # ResNet-20 forward at 32x32, 100 classes: ~40.6 M multiply-adds = ~81 MFLOP per image.
    flops = bench.count_train_flops(batch_size=4, probe_batch=2)
    assert flops["forward_per_image"] == pytest.approx(81.1e6, rel=0.01)


def test_measure_warms_up_then_interleaves_windows():
    calls: list[str] = []

    def runner(name: str, **kw) -> bench._Runner:
        return bench._Runner(lambda: calls.append(name), **kw)

    runners = {"a": runner("a", rewarm=0), "b": runner("b", rewarm=2, warmup_min=3)}
    times = bench.measure(runners, windows=3, steps=2, warmup=1, device=torch.device("cpu"))
    assert "".join(calls) == ("a" + "bbb"             # warm-up (b: at least warmup_min)
                              + "aa" + "bb"           # round 1
                              + "aa" + "bb" + "bb"    # round 2: b re-warms 2 steps, then 2 timed
                              + "aa" + "bb" + "bb")   # round 3
    assert {k: len(v["wall"]) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(len(v["cpu"]) == 3 for v in times.values())


def test_compute_ratios_targets_and_unmeasured_variants():
    ms = {"fp32": 100.0, "w4a4": 120.0, "w1a1": 140.0, "kd_w4": 150.0, "kd_w4_typical": 600.0}
    variants = {k: {"status": "ok", "step_ms": x} for k, x in ms.items()}
    r = compute_ratios(variants)
    assert r["kd_speedup_vs_typical"]["value"] == pytest.approx(4.0) and r["kd_speedup_vs_typical"]["met"]
    assert r["quant_overhead_w4"]["value"] == pytest.approx(1.2) and r["quant_overhead_w4"]["met"]
    assert r["quant_overhead_w1"]["value"] == pytest.approx(1.4) and not r["quant_overhead_w1"]["met"]
    assert r["kd_overhead_w4"]["value"] == pytest.approx(1.25) and r["kd_overhead_w4"]["met"]
    variants["kd_w4_typical"] = {"status": SKIPPED_NO_CUDA}
    del variants["w1a1"]
    r = compute_ratios(variants)
    for key in ("kd_speedup_vs_typical", "quant_overhead_w1"):
        assert r[key]["value"] is None and r[key]["met"] is None


# ----------------------------------------------------------------------------- typical pipeline
def test_typical_variant_uses_a_dataloader_with_workers_over_pil_images(tiny_result):
    config = tiny_result["variants"]["kd_w4_typical"]["config"]
    loader = config["loader"]
    assert loader["class"] == "torch.utils.data.dataloader.DataLoader"
    assert loader["num_workers"] == 2 and loader["dataset"] == "PILImageDataset"
    assert loader["batch_size"] == 4
    assert [t.split("(")[0] for t in loader["transforms"]] == [
        "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert "padding=4" in loader["transforms"][0]
    assert config["loss_item_per_step"] and "no no_grad" in config["teacher"]
    assert tiny_result["variants"]["data_typical"]["config"]["loader"]["num_workers"] == 2
    # ours: on-device batches, teacher under inference_mode with frozen quantized weights
    ours = tiny_result["variants"]["kd_w4"]["config"]
    assert "train_batches" in ours["pipeline"] and "inference_mode" in ours["teacher"]
    assert "freeze_quantized_weights" in ours["teacher"]


def test_typical_loader_object():
    images, labels = _images(20)
    loader = typical_loader(images, labels, batch_size=4, workers=2)
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert loader.num_workers == 2 and loader.drop_last
    assert isinstance(loader.dataset, PILImageDataset)
    x, y = loader.dataset[3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == int(labels[3])
    xb, yb = next(iter(loader))  # really runs through worker processes
    assert xb.shape == (4, 3, 32, 32) and yb.shape == (4,)


def test_pil_dataset_keeps_pixels_and_layout():
    images, labels = _images(5)
    ds = PILImageDataset(images, labels)  # no transform: the PIL image itself
    img, target = ds[2]
    assert img.size == (32, 32) and img.mode == "RGB" and target == int(labels[2])
    assert torch.equal(torch.tensor(np.asarray(img)).permute(2, 0, 1), images[2])
    with pytest.raises(ValueError, match="uint8"):
        PILImageDataset(images.float(), labels)


# ----------------------------------------------------------------------------- markdown
def test_render_markdown_shows_every_variant_ratio_and_the_machine(tiny_result):
    # sort_keys as in the written file: the table keeps the variants' own order anyway
    md = render_markdown(json.loads(json.dumps(tiny_result, sort_keys=True)))
    lines = md.splitlines()
    rows = lines[2:lines.index("")]  # after the header and the separator
    assert [r.split("`")[1] for r in rows] == [v.name for v in VARIANTS]
    for v in VARIANTS:
        assert v.label in md
    assert md.count(SKIPPED_NO_CUDA) == sum(v.cuda_only for v in VARIANTS)
    for key, (what, *_rest, op, target) in TARGETS.items():
        line = next(line for line in md.splitlines() if line.startswith(f"- {what}:"))
        assert f"target {op} {target:g}×" in line
        ratio = tiny_result["ratios"][key]
        assert f"{ratio['value']:.2f}×" in line
        assert ("**met**" if ratio["met"] else "**missed**") in line
    for key, (what, *_rest) in INFO_RATIOS.items():
        line = next(line for line in lines if line.startswith(f"- {what}:"))
        assert line.endswith("(no target)") and f"{tiny_result['ratios'][key]['value']:.2f}×" in line
    m = tiny_result["machine"]
    machine_line = lines[-1]
    for text in (m["host"], m["cpu_model"], f"{m['cores']} cores", m["torch"], tiny_result["date"]):
        assert str(text) in machine_line
    assert "GFLOP/s" in md and "matmul" in md


def test_render_markdown_handles_missing_measurements():
    variants = {"fp32": {"status": "ok", "label": "(a)", "step_ms": 10.0, "images_per_s": 12800.0,
                         "images_per_s_windows": [12800.0]},
                "kd_w4_bf16": {"status": SKIPPED_NO_CUDA, "label": "bf16"}}
    md = render_markdown({"variants": variants, "ratios": compute_ratios(variants), "machine": {},
                          "settings": {}})
    assert "not measured" in md and SKIPPED_NO_CUDA in md and "12800" in md


# ----------------------------------------------------------------------------- entry point
def _args(tmp_path, data_dir, **kw) -> argparse.Namespace:
    base = dict(data_dir=str(data_dir), out=str(tmp_path / "bench"), windows=1, steps=1,
                device="cpu", batch_size=8, warmup=0, matmul_size=32,
                variants=["fp32", "w4a4", "kd_w4", "kd_w4_typical"])
    return argparse.Namespace(**{**base, **kw})


def test_main_writes_host_json_and_prints_the_table(tmp_path, fake_data_root, capsys):
    assert bench.main(_args(tmp_path, fake_data_root)) == 0
    files = list((tmp_path / "bench").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no stray temporary file
    result = json.loads(files[0].read_text())
    assert files[0].stem == bench._safe_host(result["machine"]["host"])
    assert set(result["variants"]) == {"fp32", "w4a4", "kd_w4", "kd_w4_typical"}
    assert result["ratios"]["quant_overhead_w1"]["met"] is None  # w1a1 not run
    assert "500 images" in result["settings"]["data"]
    out = capsys.readouterr().out
    assert out.strip() == render_markdown(result).strip()

    from kdlib.report import render_bench  # what the README shows
    assert render_bench(tmp_path / "bench") == render_markdown(result)


def test_bad_settings_fail_before_anything_is_measured(tmp_path, fake_data_root):
    for kw, message in (({"windows": 0}, "windows=0"), ({"steps": -1}, "steps=-1"),
                        ({"variants": ["fp64"]}, "unknown variant"),
                        ({"batch_size": 10_000}, "batch_size=10000")):
        with pytest.raises(ValueError, match=message):
            bench.main(_args(tmp_path, fake_data_root, **kw))
    assert not (tmp_path / "bench").exists()


def test_cli_bench_bad_argument_is_a_one_line_error(tmp_path, capsys):
    from kdlib.cli import main as cli_main

    assert cli_main(["bench", "--windows", "0", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "windows=0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.realdata
def test_bench_on_real_cifar100(tmp_path, real_data_root):
    assert bench.main(_args(tmp_path, real_data_root, variants=["kd_w4", "kd_w4_typical"])) == 0
    result = json.loads(next((tmp_path / "bench").iterdir()).read_text())
    assert result["settings"]["data"] == "CIFAR-100 training set, 50000 images"
    assert result["settings"]["data_root"] == str(real_data_root.absolute())
    assert result["ratios"]["kd_speedup_vs_typical"]["value"] > 0
