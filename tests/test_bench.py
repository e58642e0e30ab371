"""kdlib.bench: the benchmark's machinery and its report (behaviour only, no timing thresholds)."""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdlib.step
from kdlib import bench
from kdlib.bench import render_markdown, run_benchmark, typical
from kdlib.bench.run import bench_file_name
from kdlib.bench.targets import CEILINGS, INFO_RATIOS, TARGETS, compute_ratios
from kdlib.bench.variants import BY_NAME, COMPILE_WARMUP_STEPS, make_context
from kdlib.experiments import plan_students
from kdlib.models import create_model
from kdlib.presets import build_config
from kdlib.quant import dorefa_activation, dorefa_weight, quantized_layers
from kdlib.schedules import lr_at

ROOT = Path(__file__).resolve().parent.parent
MEASURE = importlib.import_module("kdlib.bench.measure")  # kdlib.bench.measure: the function
# Every variant but the compiled ones (compiling takes minutes on a CPU; built, not run, below).
FAST = ["fp32", "w4a4", "kd_w4", "kd_w4_nchw", "kd_w4_channels_last", "kd_w4_bf16",
        "kd_w4_typical", "data_kdlib", "data_typical"]
TINY = dict(batch_size=4, windows=3, steps=1, warmup=0, matmul_size=32, flops_probe_batch=2)
# ResNet-20 on 32x32, 100 classes, counted by hand in multiply-adds: stem 3->16 at 32x32, six
# 16->16 convs at 32x32, then per later stage one strided conv and five convs, and the classifier.
STEM_MACS = 32 * 32 * 16 * 3 * 9
RESNET20_MACS = (STEM_MACS + 6 * 32 * 32 * 16 * 16 * 9
                 + 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9
                 + 8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9 + 64 * 100)
FORWARD_FLOPS = 2 * RESNET20_MACS  # 81.1 MFLOP per image
# backward: input and weight gradients of every layer (2x forward), but no input gradient of
# the stem
TRAIN_FLOPS = 3 * FORWARD_FLOPS - 2 * STEM_MACS


def _images(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            torch.randint(0, 100, (n,), generator=gen))


@pytest.fixture(scope="module")
def tiny_result() -> dict:
    images, labels = _images()
    return run_benchmark(images, labels, device="cpu", data_source="generated", variants=FAST,
                         log=lambda m: None, **TINY)


def _tiny_context(batch_size: int = 4):
    images, labels = _images()
    return make_context(images, labels, batch_size=batch_size, device="cpu")


# ----------------------------------------------------------------------------- the result dict
@pytest.mark.slow
def test_result_has_every_field_and_consistent_times(tiny_result):
    r = json.loads(json.dumps(tiny_result, allow_nan=False))  # plain JSON, no NaN
    assert r["format"] == bench.FORMAT and r["date"]
    for key in ("host", "cpu_model", "cores", "torch", "threads", "device"):
        assert r["machine"][key] not in (None, ""), key
    assert r["machine"]["device"] == "cpu" and r["machine"]["threads"] == torch.get_num_threads()
    expected = {"batch_size": 4, "windows": 3, "steps": 1, "warmup": 0, "data": "generated",
                "preset": "quick", "variant_order": FAST}
    assert {k: r["settings"][k] for k in expected} == expected
    assert list(r["variants"]) == FAST
    for name, entry in r["variants"].items():
        assert entry["label"] == BY_NAME[name].label and entry["status"] == "ok"
        assert len(entry["images_per_s_windows"]) == 3 and len(entry["step_ms_windows"]) == 3
        assert entry["images_per_s"] == statistics.median(entry["images_per_s_windows"])
        assert entry["step_ms"] == statistics.median(entry["step_ms_windows"])
        for ips, ms in zip(entry["images_per_s_windows"], entry["step_ms_windows"]):
            assert math.isclose(ips * ms / 1000.0, 4)  # images/s = steps * batch / seconds
        assert len(entry["cpu_per_wall_windows"]) == 3 and entry["warmup_s"] >= 0
    assert set(r["ratios"]) == set(TARGETS) | set(INFO_RATIOS)
    assert r["load_average_start"] is None or len(r["load_average_start"]) == 3


def test_a_variant_with_the_same_run_config_is_timed_once(tiny_result):
    v = tiny_result["variants"]
    # the preset trains in one memory format: that variant is kd_w4 itself, the other is timed
    same = "kd_w4_channels_last" if build_config("quick").channels_last else "kd_w4_nchw"
    other = ({"kd_w4_channels_last", "kd_w4_nchw"} - {same}).pop()
    assert v[same]["same_as"] == "kd_w4" and "same_as" not in v[other]
    assert v[same]["step_ms_windows"] == v["kd_w4"]["step_ms_windows"]
    assert v[other]["step_ms_windows"] != v["kd_w4"]["step_ms_windows"]
    assert v[same]["label"] == BY_NAME[same].label


def test_flop_counts_are_the_hand_counted_ones(tiny_result):
    v = tiny_result["variants"]
    assert FORWARD_FLOPS == 81_113_600
    assert v["fp32"]["flops_per_image"] == TRAIN_FLOPS == v["w4a4"]["flops_per_image"]
    for name in ("kd_w4", "kd_w4_nchw", "kd_w4_channels_last", "kd_w4_bf16", "kd_w4_typical"):
        assert v[name]["flops_per_image"] == TRAIN_FLOPS + FORWARD_FLOPS, name  # + teacher forward
    assert "flops_per_image" not in v["data_kdlib"] and "gflops" not in v["data_typical"]


def test_gflops_are_flops_over_the_median_step_time(tiny_result):
    ceilings = tiny_result["ceilings"]
    assert set(ceilings) == set(CEILINGS)
    assert [ceilings[c]["dtype"] for c in CEILINGS] == ["float32", "bfloat16"]
    for c in ceilings.values():
        assert c["gflops"] == statistics.median(c["gflops_windows"]) \
            and len(c["gflops_windows"]) == 3
    for name, entry in tiny_result["variants"].items():
        if "gflops" not in entry:
            continue
        assert entry["flops_per_step"] == entry["flops_per_image"] * 4
        assert entry["gflops"] == pytest.approx(entry["flops_per_step"]
                                                / (entry["step_ms"] / 1000) / 1e9)
        for c in CEILINGS:
            assert entry["of_ceiling"][c] == pytest.approx(entry["gflops"] / ceilings[c]["gflops"])


def test_ratios_are_computed_from_the_measurements(tiny_result):
    v, c = tiny_result["variants"], tiny_result["ceilings"]

    def quantity(name, q):
        entry = c.get(name) or v.get(name)
        return None if entry is None else entry[q]

    specs = [(k, *s) for k, s in TARGETS.items()] \
        + [(k, *s, None, None) for k, s in INFO_RATIOS.items()]
    for key, _what, q, num, den, op, target in specs:
        ratio = tiny_result["ratios"][key]
        a, b = quantity(num, q), quantity(den, q)
        if a is None or b is None:  # a variant not in FAST
            assert ratio["value"] is None and ratio["met"] is None, key
            continue
        assert ratio["value"] == pytest.approx(a / b, rel=1e-12), key
        if target is None:
            assert ratio["met"] is None
        else:
            assert ratio["met"] == (a / b >= target if op == ">=" else a / b <= target)


def test_compute_ratios_targets_and_unmeasured_variants():
    ms = {"fp32": 100.0, "w4a4": 104.0, "w1a1": 140.0, "kd_w4": 150.0, "kd_w4_bf16": 100.0,
          "kd_w4_typical": 600.0}
    variants = {k: {"status": "ok", "step_ms": x} for k, x in ms.items()}
    variants["kd_w4"]["gflops"] = 80.0
    ceilings = {"matmul_fp32": {"status": "ok", "gflops": 100.0}}
    r = compute_ratios(variants, ceilings)
    assert r["kd_w4_of_fp32_ceiling"]["value"] == pytest.approx(0.8)
    assert r["kd_w4_of_fp32_ceiling"]["met"] is False
    assert r["bf16_kd_speedup"]["value"] == pytest.approx(1.5) and r["bf16_kd_speedup"]["met"]
    assert r["quant_overhead_w4"]["value"] == pytest.approx(1.04) and r["quant_overhead_w4"]["met"]
    assert r["kd_speedup_vs_typical"]["value"] == pytest.approx(4.0)
    assert r["kd_speedup_vs_typical"]["met"] is None  # reported, no target
    assert r["bf16_kd_of_bf16_ceiling"]["value"] is None  # no bf16 ceiling given
    variants["w4a4"]["step_ms"] = 106.0
    assert compute_ratios(variants, ceilings)["quant_overhead_w4"]["met"] is False
    del variants["kd_w4_bf16"]
    assert compute_ratios(variants, ceilings)["bf16_kd_speedup"]["met"] is None


def test_a_ratio_exactly_at_its_target_meets_it():
    # targets are "at least" / "at most": a ratio on the target itself meets it
    for key, (_what, quantity, num, den, op, target) in TARGETS.items():
        variants = {num: {"status": "ok", quantity: target}}
        ceilings = {den: {"status": "ok", quantity: 1.0}}
        if den not in CEILINGS:
            variants[den] = ceilings.pop(den)
        ratio = compute_ratios(variants, ceilings)[key]
        assert ratio["value"] == target and ratio["met"] is True, key


def test_a_ratio_ignores_a_variant_whose_measurement_did_not_succeed():
    variants = {"w4a4": {"status": "ok", "step_ms": 100.0},
                "fp32": {"status": "error", "step_ms": 100.0, "error": "RuntimeError: boom"}}
    ratio = compute_ratios(variants)["quant_overhead_w4"]
    assert ratio["value"] is None and ratio["met"] is None


def test_a_ratio_over_a_zero_measurement_has_no_value():
    # a ceiling that measured 0 GFLOP/s (a timer too coarse for it) gives no ratio, not a crash
    variants = {"kd_w4": {"status": "ok", "gflops": 80.0}}
    ceilings = {"matmul_fp32": {"status": "ok", "gflops": 0.0}}
    ratio = compute_ratios(variants, ceilings)["kd_w4_of_fp32_ceiling"]
    assert ratio["value"] is None and ratio["met"] is None


def test_summarise_counts_every_step_of_a_window():
    steps, batch_size, seconds = 5, 4, [2.0, 1.0, 4.0]
    s = MEASURE.summarise(seconds, steps, batch_size)
    assert s["images_per_s_windows"] == pytest.approx([steps * batch_size / x for x in seconds])
    assert s["step_ms_windows"] == pytest.approx([1000.0 * x / steps for x in seconds])
    assert s["images_per_s"] == pytest.approx(steps * batch_size / 2.0)  # the median window


def test_a_timing_window_waits_for_the_device_after_its_last_step(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(MEASURE, "sync", lambda device: events.append("sync"))
    MEASURE.time_window(lambda: events.append("step"), 3, torch.device("cpu"))
    # queued device work is waited for before the clock starts and before it stops
    assert events == ["sync", "step", "step", "step", "sync"]


def test_measure_warms_up_then_interleaves_windows():
    calls: list[str] = []

    def runner(name: str, **kw) -> bench.Runner:
        return bench.Runner(lambda: calls.append(name), batch_size=1, **kw)

    runners = {"a": runner("a", rewarm=0), "b": runner("b", rewarm=2, warmup_min=3)}
    times = bench.measure(runners, windows=3, steps=2, warmup=1, device=torch.device("cpu"))
    assert "".join(calls) == ("a" + "bbb"             # warm-up (b: at least warmup_min)
                              + "aa" + "bb"           # round 1
                              + "aa" + "bb" + "bb"    # round 2: b re-warms 2 steps, then 2 timed
                              + "aa" + "bb" + "bb")   # round 3
    assert {k: len(v["wall"]) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(len(v["cpu"]) == 3 and v["warmup_s"] >= 0 for v in times.values())


@pytest.mark.slow
def test_a_variant_failing_its_warm_up_is_recorded_and_the_others_are_timed(monkeypatch):
    calls: list[str] = []

    def broken() -> None:
        calls.append("x")
        raise RuntimeError("inductor cannot compile this")

    runners = {"ok": bench.Runner(lambda: calls.append("o"), batch_size=1),
               "broken": bench.Runner(broken, batch_size=1)}
    times = bench.measure(runners, windows=2, steps=1, warmup=2, device=torch.device("cpu"))
    assert "".join(calls) == "oo" + "x" + "o" + "oo"  # tried once, never timed (o re-warms 1)
    assert times["broken"] == {"error": "RuntimeError: inductor cannot compile this"}
    assert len(times["ok"]["wall"]) == 2
    # and in a benchmark: that variant says so, the rest keeps its numbers and FLOPs
    from kdlib.bench import concurrent as bench_concurrent, run as bench_run

    real = bench_run.measure

    def measure_with_compile_broken(runners, **kw):
        runners["kd_w4_compile"].step = broken
        return real(runners, **kw)

    def no_processes(*args, **kw):
        raise RuntimeError("2 concurrent kd_w4 processes failed: CUDA out of memory")

    monkeypatch.setattr(bench_run, "measure", measure_with_compile_broken)
    monkeypatch.setattr(bench_concurrent, "concurrent_throughput", no_processes)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    result = run_benchmark(images, torch.arange(64) % 100, preset="smoke", model="resnet8",
                           variants=["kd_w4", "kd_w4_compile"], windows=1, steps=1, warmup=1,
                           matmul_size=64, flops_probe_batch=2, workers=0, concurrency=(1, 2))
    assert result["variants"]["kd_w4_compile"]["status"] == "failed"
    assert "inductor" in result["variants"]["kd_w4_compile"]["error"]
    assert result["variants"]["kd_w4"]["status"] == "ok" \
        and result["variants"]["kd_w4"]["gflops"] > 0
    assert "out of memory" in result["concurrency"]["error"]
    text = render_markdown(result)
    assert "| failed |" in text and "side by side: not measured (RuntimeError: 2 concurrent" in text
    result["concurrency"] = {"variant": "kd_w4", "seconds": 10.0, "by_jobs": {
        "1": {"images_per_s": 9000.0, "per_process": [9000.0]},
        "2": {"images_per_s": 16000.0, "per_process": [8100.0, 7900.0]}}}
    assert ("side by side on one device (10 s each): 1 × 9000 = 9000 img/s, 2 × 8000 = 16000 "
            "img/s; worth running: 2 at a time") in render_markdown(result)


def test_a_profile_counts_the_steps_and_names_where_the_time_goes():
    from kdlib.bench.profile import profile_runner, profile_variant

    x = torch.randn(64, 64)
    calls = []
    result = profile_runner(lambda: calls.append(torch.mm(x, x)), torch.device("cpu"), steps=4,
                            warmup=2)
    assert len(calls) == 6 and result["steps"] == 4 and result["kernel_launches_per_step"] == 0
    assert result["top"][0]["name"] == "aten::mm" and result["top"][0]["calls_per_step"] == 1
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    ctx = make_context(images, torch.arange(64) % 100, preset="smoke", model="resnet8", workers=0)
    real = profile_variant(ctx, "kd_w4", steps=2, warmup=1)
    assert real["variant"] == "kd_w4" and real["batch_size"] == ctx.cfg.batch_size
    assert any("conv" in t["name"] for t in real["top"])  # the step's own operators
    on_gpu = {"variant": "kd_w4", "steps": 20, "wall_ms_per_step": 35.6,
              "kernel_launches_per_step": 900,
              "device_busy_ms_per_step": 3.2, "device_busy_fraction": 0.09,
              "bound": "host (kernel launches)",
              "top": [{"name": "sm90_xmma_fprop", "ms_per_step": 0.8}]}
    text = render_markdown({"variants": {}, "profile": on_gpu})
    assert ("the GPU busy 3.2 ms of each 35.6 ms step (9%), 900 kernel launches a step; bound by "
            "host (kernel launches); most time: sm90_xmma_fprop 0.80 ms") in text


def test_device_time_counts_kernels_not_the_ranges_around_them():
    """The H200's first profile counted "Optimizer.step#SGD.step", a record_function range whose
    device-side copy spans the update's kernels, as 0.22 ms of GPU work beside those kernels."""
    from types import SimpleNamespace

    from kdlib.bench.profile import device_kernels

    def event(key, device, us, annotation=False):
        return SimpleNamespace(key=key, device_type=f"DeviceType.{device}",
                               self_device_time_total=us, is_user_annotation=annotation)

    events = [event("sm90_xmma_fprop", "CUDA", 800.0), event("aten::conv2d", "CPU", 0.0),
              event("Optimizer.step#SGD.step", "CUDA", 222.0, annotation=True),
              event("multi_tensor_apply_kernel", "CUDA", 40.0), event("idle", "CUDA", 0.0)]
    assert [e.key for e in device_kernels(events)] == ["sm90_xmma_fprop",
                                                       "multi_tensor_apply_kernel"]


def test_matmul_ceiling_step_is_one_product_of_the_recorded_size():
    runner = bench.matmul_runner(torch.device("cpu"), torch.bfloat16, size=64)
    assert runner.info["size"] == 64 and runner.info["dtype"] == "bfloat16"
    assert bench.count_flops(runner.step) == runner.flops_per_step == 2 * 64**3


# ----------------------------------------------------------------------------- kdlib's variants
def test_kd_w4_times_kdlib_step_train_step_with_the_quick_configuration(monkeypatch):
    calls = []
    real = kdlib.step.train_step

    def counting(trainer, x, y, lr, **kw):  # run_step's eager step
        calls.append((trainer, x.shape[0], lr))
        return real(trainer, x, y, lr, **kw)

    monkeypatch.setattr(kdlib.step, "train_step", counting)
    images, labels = _images()
    result = run_benchmark(images, labels, device="cpu", variants=["kd_w4"], log=lambda m: None,
                           grouped=False, **{**TINY, "windows": 2, "steps": 2, "warmup": 1})
    # warm-up 1, window 2 steps, re-warm 1, window 2 steps, then one step counting the FLOPs
    assert [batch for _, batch, _ in calls] == [4] * 6 + [2]
    assert result["variants"]["kd_w4"]["flops_per_image"] == TRAIN_FLOPS + FORWARD_FLOPS
    # the trainer is built from the quick preset's direct_kd 4-bit run, as the pipeline plans it
    planned = plan_students("quick", "resnet20", 0, ["direct_kd"], [4])[1].to_dict()
    trainer, _, lr = calls[0]
    got = trainer.cfg.to_dict()
    ids = ("teacher_id", "init_id")
    assert {k: x for k, x in got.items() if k not in ids} == {
        **{k: x for k, x in planned.items() if k not in ids}, "batch_size": 4}
    assert trainer.mode == "hinton" and lr == lr_at(0.0, trainer.cfg)  # the first step of fit()
    assert {layer.w_bits for _, layer in quantized_layers(trainer.model)
            if layer.is_quantized} == {4}
    assert not any(layer.is_quantized for _, layer in quantized_layers(trainer.teacher))
    assert len({id(t) for t, _, _ in calls[:6]}) == 1  # every timed step trains the same trainer


def test_kd_w4_teacher_runs_in_inference_mode_with_frozen_unchanged_weights():
    runner = BY_NAME["kd_w4"].build(_tiny_context())
    trainer = runner.trainer
    seen = []

    def spy(module, inputs, output):
        seen.append({"inference_mode": torch.is_inference_mode_enabled(),
                     "requires_grad": output.requires_grad, "graph": output.grad_fn is not None,
                     "training": module.training,
                     "frozen": all(layer.frozen_weight is not None
                                   for _, layer in quantized_layers(module))})

    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    handle = trainer.teacher.register_forward_hook(spy)
    try:
        runner.step()
        runner.step()
    finally:
        handle.remove()
        runner.close()
    assert seen == [{"inference_mode": True, "requires_grad": False, "graph": False,
                     "training": False, "frozen": True}] * 2
    after = trainer.teacher.state_dict()
    assert all(torch.equal(after[k], teacher_before[k]) for k in teacher_before)
    assert all(p.grad is None for p in trainer.teacher.parameters())
    # the student did train: its weights moved and it has gradients
    assert not torch.equal(trainer.model.state_dict()["conv1.weight"],
                           student_before["conv1.weight"])
    assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)
    # closing leaves the teacher as make_trainer got it: train mode, no frozen copies
    assert trainer.teacher.training
    assert all(layer.frozen_weight is None for _, layer in quantized_layers(trainer.teacher))


def test_every_kdlib_variant_records_and_applies_its_switches():
    ctx = _tiny_context()
    base = build_config("quick")
    expected = {  # name: (precision, channels_last, compile, bits, teacher bits)
        "fp32": (base.precision, base.channels_last, base.compile, 32, None),
        "w4a4": (base.precision, base.channels_last, base.compile, 4, None),
        "w1a1": (base.precision, base.channels_last, base.compile, 1, None),
        "kd_w4": (base.precision, base.channels_last, base.compile, 4, 32),
        "kd_w4_nchw": (base.precision, False, base.compile, 4, 32),
        "kd_w4_channels_last": (base.precision, True, base.compile, 4, 32),
        "kd_w4_bf16": ("bf16", base.channels_last, base.compile, 4, 32),
        "kd_w4_compile": (base.precision, base.channels_last, True, 4, 32),
        "kd_w4_bf16_compile": ("bf16", base.channels_last, True, 4, 32),
        "kd_w4_graphs": (base.precision, base.channels_last, base.compile, 4, 32),
    }
    for name, (precision, channels_last, compiled, bits, teacher_bits) in expected.items():
        runner = BY_NAME[name].build(ctx)  # built, not run: compiling would take minutes here
        try:
            trainer = runner.trainer
            assert runner.info["switches"] == {
                "precision": precision, "channels_last": channels_last, "compile": compiled,
                "cuda_graphs": name == "kd_w4_graphs", "w_bits": bits, "a_bits": bits,
                "teacher_bits": teacher_bits}, name
            assert trainer.graphed is None  # a CPU has no CUDA graphs: the step stays eager
            assert runner.info["run_config"] == trainer.cfg.to_dict()
            assert (trainer.teacher is not None) == (teacher_bits is not None)
            assert all(layer.precision == precision for _, layer in quantized_layers(trainer.model))
            conv = trainer.model.layer1[0].conv1.weight
            assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last, name
            assert (trainer.forward is not trainer.model) == compiled, name
            assert runner.warmup_min == (COMPILE_WARMUP_STEPS if compiled else 0)
        finally:
            runner.close()


def test_kdlib_variants_draw_the_batches_and_learning_rates_fit_draws(monkeypatch):
    """Step after step, kd_w4 trains on fit()'s batches (train_batches of epoch 0, then of
    epoch 1, ...) at lr_at of the fractional epoch, the schedule wrapping at the run's end."""
    from kdlib.data import train_batches

    seen = []
    monkeypatch.setattr(kdlib.step, "run_step",
                        lambda trainer, x, y, lr: seen.append((x.clone(), y.clone(), lr)))
    ctx = _tiny_context()  # 48 images, batches of 4: 12 steps an epoch
    runner = BY_NAME["kd_w4"].build(ctx)
    try:
        for _ in range(14):
            runner.step()
    finally:
        runner.close()
    cfg = runner.trainer.cfg
    expected = []
    for epoch in (0, 1):
        for i, (x, y) in enumerate(train_batches(ctx.images_dev, ctx.labels_dev, 4, seed=cfg.seed,
                                                 epoch=epoch, channels_last=cfg.channels_last)):
            expected.append((x, y, lr_at(epoch % cfg.epochs + i / 12, cfg)))
    for (x, y, lr), (x_fit, y_fit, lr_fit) in zip(seen, expected):
        assert torch.equal(y, y_fit) and torch.equal(x, x_fit)
        assert lr == lr_fit
    assert len({lr for _, _, lr in seen}) > 1  # the schedule moves within an epoch


# ----------------------------------------------------------------------------- typical pipeline
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_typical_quantizers_agree_with_kdlib(bits):
    gen = torch.Generator().manual_seed(bits)
    w = (0.2 * torch.randn(16, 8, 3, 3, generator=gen)).requires_grad_()
    x = (0.6 * torch.randn(4, 8, 6, 6, generator=gen) + 0.5).requires_grad_()
    grad_w, grad_x = torch.randn(w.shape, generator=gen), torch.randn(x.shape, generator=gen)
    ours_w, ours_x = dorefa_weight(w, bits), dorefa_activation(x, bits)
    theirs_w, theirs_x = typical.quantize_weight(w, bits), typical.ActivationQuantizer(bits)(x)
    assert torch.equal(theirs_w, ours_w) and torch.equal(theirs_x, ours_x)
    g_ours = torch.autograd.grad([ours_w, ours_x], [w, x], [grad_w, grad_x])
    g_theirs = torch.autograd.grad([theirs_w, theirs_x], [w, x], [grad_w, grad_x])
    for a, b in zip(g_theirs, g_ours):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bits", [32, 4])
def test_typical_resnet20_is_kdlibs_resnet20(bits):
    ours = create_model("resnet20", w_bits=bits, a_bits=bits).train()
    theirs = typical.ResNet20(100, bits=bits).train()
    theirs.load_state_dict(ours.state_dict())  # strict: the same layers, names and shapes
    assert sum(p.numel() for p in theirs.parameters()) == 275_572
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8)
    losses = [F.cross_entropy(m(x), y) for m in (ours, theirs)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for m, loss in zip((ours, theirs), losses):
        loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():  # equal up to fp32 summation order
        error = (theirs_params[name].grad - p.grad).norm() / p.grad.norm()
        assert error < 1e-4, (name, float(error))


def test_typical_module_imports_neither_kdlib_quant_nor_models():
    tree = ast.parse((ROOT / "kdlib" / "bench" / "typical.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [m for m in imported if m.startswith(("kdlib.quant", "kdlib.models"))]


def test_typical_step_keeps_the_teacher_graph_and_requantizes_every_step(monkeypatch):
    calls = []
    real = typical.quantize_weight
    monkeypatch.setattr(typical, "quantize_weight", lambda w, b: calls.append(b) or real(w, b))
    runner = BY_NAME["kd_w4_typical"].build(_tiny_context())
    kd_step = runner.trainer
    seen = []
    kd_step.teacher.register_forward_hook(
        lambda m, i, out: seen.append((out.requires_grad, m.training)))
    try:
        runner.step()
        runner.step()
    finally:
        runner.close()
    assert seen == [(True, False)] * 2  # eval(), but a graph recorded (no no_grad)
    assert calls.count(4) == 2 * 18  # the student's 18 block convs, quantized afresh each step
    assert kd_step.count == 8 and math.isfinite(kd_step.loss_sum)  # loss.item() per step
    assert all(p.grad is None for p in kd_step.teacher.parameters())  # logits were detached


def test_typical_variant_uses_a_dataloader_with_workers_over_pil_images(tiny_result):
    for name in ("kd_w4_typical", "data_typical"):
        loader = tiny_result["variants"][name]["info"]["loader"]
        assert loader["class"] == "torch.utils.data.dataloader.DataLoader"
        assert loader["num_workers"] == 2 and loader["dataset"] == "PILImageDataset"
        assert loader["batch_size"] == 4
        assert [t.split("(")[0] for t in loader["transforms"]] == [
            "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]


def test_typical_loader_object():
    images, labels = _images(20)
    loader = bench.typical_loader(images, labels, batch_size=4, workers=2)
    assert loader.num_workers == 2 and loader.drop_last
    assert isinstance(loader.dataset, bench.PILImageDataset)
    x, y = loader.dataset[3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == int(labels[3])
    xb, yb = next(iter(loader))  # really runs through worker processes
    assert xb.shape == (4, 3, 32, 32) and yb.shape == (4,)


def test_pil_dataset_keeps_pixels_and_layout():
    images, labels = _images(5)
    ds = bench.PILImageDataset(images, labels)  # no transform: the PIL image itself
    img, target = ds[2]
    assert img.size == (32, 32) and img.mode == "RGB" and target == int(labels[2])
    assert torch.equal(torch.tensor(np.asarray(img)).permute(2, 0, 1), images[2])
    with pytest.raises(ValueError, match="uint8"):
        bench.PILImageDataset(images.float(), labels)


def test_typical_step_computes_kdlibs_kd_loss_with_kdlibs_optimizer():
    """(d) computes what (c) computes, written another way: Hinton's loss at the run's
    temperature and alpha (kdlib.losses.kd_loss), SGD with the run's settings."""
    import copy

    from kdlib.losses import kd_loss

    ctx = _tiny_context()
    typical_runner, kdlib_runner = (BY_NAME[n].build(ctx) for n in ("kd_w4_typical", "kd_w4"))
    try:
        kd_step, trainer = typical_runner.trainer, kdlib_runner.trainer
        ours, theirs = trainer.optimizer.param_groups[0], kd_step.optimizer.param_groups[0]
        for key in ("lr", "momentum", "nesterov", "weight_decay", "dampening"):
            assert theirs[key] == ours[key], key
        cfg = trainer.cfg
        assert cfg.kd_temperature != 1 and cfg.kd_alpha != 0.5  # so a swap or a lost T shows
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 100, (4,), generator=gen)
        student = copy.deepcopy(kd_step.student)  # the weights the step's loss is taken at
        with torch.no_grad():
            expected = kd_loss(student(x), kd_step.teacher(x), y, cfg.kd_temperature,
                               cfg.kd_alpha).item()
        kd_step(x, y)
        assert kd_step.count == 4
        assert kd_step.loss_sum / kd_step.count == pytest.approx(expected, rel=1e-5)
    finally:
        typical_runner.close()
        kdlib_runner.close()


def test_typical_loader_shuffles_each_epoch():
    images, labels = _images(20)
    loader = bench.typical_loader(images, torch.arange(20), batch_size=4, workers=0)
    epochs = [torch.cat([y for _, y in loader]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(20))  # every image once
    assert epochs[0].tolist() != list(range(20)) and epochs[0].tolist() != epochs[1].tolist()


def test_typical_variants_rewarm_past_the_batches_their_workers_prefetched():
    """Between windows the DataLoader's workers keep filling their queues; the un-timed steps
    before a later window use those up (workers x prefetch_factor), then one more."""
    ctx = _tiny_context()
    for name in ("kd_w4_typical", "data_typical"):
        runner = BY_NAME[name].build(ctx)
        try:
            assert ctx.workers == 2 and runner.rewarm == 2 * 2 + 1, name
        finally:
            runner.close()


# ----------------------------------------------------------------------------- markdown
def test_render_markdown_shows_every_variant_ceiling_ratio_and_the_machine(tiny_result):
    # sort_keys as in the written file: the table keeps the variants' run order anyway
    md = render_markdown(json.loads(json.dumps(tiny_result, sort_keys=True)))
    lines = md.splitlines()
    rows = lines[2:lines.index("")]  # after the header and the separator
    assert [r.split("`")[1] for r in rows] == FAST
    bf16_row = rows[FAST.index("kd_w4_bf16")]
    assert "| bf16, " in bf16_row \
        and f"{tiny_result['variants']['kd_w4_bf16']['gflops']:.1f}" in bf16_row
    assert "channels_last" in rows[FAST.index("kd_w4_channels_last")]
    for key, (what, _q, _n, _d, op, _t) in TARGETS.items():
        line = next(line for line in lines if line.startswith(f"- {what}:"))
        ratio = tiny_result["ratios"][key]
        assert f"target {op} " in line
        assert ("**met**" if ratio["met"] else "**missed**") in line
    line = next(line for line in lines if line.startswith(f"- {TARGETS['quant_overhead_w4'][0]}:"))
    assert f"{tiny_result['ratios']['quant_overhead_w4']['value']:.2f}×" in line \
        and "1.05×" in line
    assert "(target >= 85%)" in md
    ceiling = next(line for line in lines if "matmul ceilings" in line)
    for c in tiny_result["ceilings"].values():
        assert f"{c['dtype']} {c['gflops']:.1f} GFLOP/s" in ceiling
    m = tiny_result["machine"]
    for text in (m["host"], m["cpu_model"], f"{m['cores']} cores", m["torch"], tiny_result["date"]):
        assert str(text) in lines[-1]


def test_the_grouped_weights_part_checks_times_and_counts(tiny_result):
    grouped = tiny_result["grouped"]
    assert grouped["check"]["exact"] \
        and set(grouped["check"]["by_bits"]) == {"1", "2", "4", "8", "16"}
    steps = grouped["steps"]
    assert {n: len(steps[n]["images_per_s_windows"]) for n in steps} == {
        "kd_w4": TINY["windows"], "kd_w4_per_layer": TINY["windows"]}
    ops = grouped["ops_per_step"]
    assert ops["kd_w4"] < ops["kd_w4_per_layer"] - 300  # ResNet-20's 18 quantized convs
    line = next(line for line in render_markdown(tiny_result).splitlines()
                if "quantized together" in line)
    assert "yes at 1, 2, 4, 8, 16 bits" in line \
        and f"{ops['kd_w4']} vs {ops['kd_w4_per_layer']}" in line


def test_render_markdown_handles_missing_measurements():
    variants = {"fp32": {"status": "ok", "label": "(a)", "step_ms": 10.0, "images_per_s": 12800.0,
                         "images_per_s_windows": [12800.0]}}
    md = render_markdown({"variants": variants, "ratios": compute_ratios(variants), "machine": {},
                          "settings": {}})
    assert md.count("not measured") == len(TARGETS) and "12800" in md


def test_render_markdown_gives_each_process_count_its_mean_rate_and_total_in_numeric_order():
    rates = {"12": [90.0, 110.0] * 6, "2": [100.0, 200.0], "1": [120.0]}
    concurrency = {"variant": "kd_w4", "seconds": 10.0,
                   "by_jobs": {k: {"images_per_s": sum(r), "per_process": r}
                               for k, r in rates.items()}}
    md = render_markdown({"variants": {}, "ratios": {}, "machine": {}, "settings": {},
                          "concurrency": concurrency})
    line = next(line for line in md.splitlines() if "side by side" in line)
    expected = [f"{k} × {sum(rates[k]) / len(rates[k]):.0f} = {sum(rates[k]):.0f} img/s"
                for k in ("1", "2", "12")]
    assert ", ".join(expected) in line


# ----------------------------------------------------------------------------- entry point
def _args(tmp_path, data_dir, **kw) -> argparse.Namespace:
    base = dict(data_dir=str(data_dir), out=str(tmp_path / "bench"), windows=1, steps=1,
                device="cpu", batch_size=8, warmup=0, matmul_size=32,
                variants=["fp32", "w4a4", "kd_w4", "kd_w4_typical"])
    return argparse.Namespace(**{**base, **kw})


def test_bench_files_of_two_processors_on_one_host_name_never_overwrite_each_other():
    """Every VM here is called `vm`: a CPU benchmark is named by host and processor, a GPU's by
    its card alone (its host's CPU does not set its speed)."""
    def name(**machine):
        return bench_file_name({"machine": {"gpu": None, "host": "vm", **machine}})

    amd = name(cpu_model="AMD EPYC (family 26, model 2)")
    xeon = name(cpu_model="Intel(R) Xeon(R) Processor (family 6, model 167)")
    assert amd == "vm-AMD_EPYC_family_26_model_2.json"
    assert xeon == "vm-Intel_R_Xeon_R_Processor_family_6_model_167.json" != amd
    assert name(cpu_model=None) == "vm.json"  # a machine that does not name its processor
    assert name(gpu="NVIDIA H200", cpu_model="Intel Xeon") == "NVIDIA_H200.json"


def test_main_writes_host_json_and_prints_the_table(tmp_path, fake_data_root, capsys):
    assert bench.main(_args(tmp_path, fake_data_root)) == 0
    files = list((tmp_path / "bench").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no stray temporary file
    result = json.loads(files[0].read_text())
    assert files[0].name == bench_file_name(result)
    assert files[0].name.startswith(result["machine"]["host"] + "-")  # <host>-<processor>
    assert set(result["variants"]) == {"fp32", "w4a4", "kd_w4", "kd_w4_typical"}
    assert result["ratios"]["quant_overhead_w1"]["value"] is None  # w1a1 not run
    assert "500 images" in result["settings"]["data"]
    # the settings it was given, and where its images came from
    assert result["ceilings"]["matmul_fp32"]["size"] == 32
    assert result["settings"]["data_root"] == str(Path(fake_data_root).absolute())
    out = capsys.readouterr().out
    assert out.strip() == render_markdown(result).strip()

    from kdlib.report import render_bench  # what the README shows
    assert render_bench(tmp_path / "bench") == render_markdown(result)


def test_window_rates_are_per_window_work_over_its_seconds():
    """A ceiling's GFLOP/s per window is FLOPs per step x steps / wall seconds; a variant's
    cpu_per_wall is the window's CPU seconds over its wall seconds."""
    from types import SimpleNamespace

    from kdlib.bench.run import _ceiling_entry, _variant_entry

    times = {"wall": [2.0, 4.0, 1.0], "cpu": [1.0, 4.0, 3.0], "warmup_s": 0.5}
    ceiling = _ceiling_entry(times, SimpleNamespace(flops_per_step=1e9, info={}), steps=10)
    assert ceiling["gflops_windows"] == [5.0, 2.5, 10.0] and ceiling["gflops"] == 5.0
    assert ceiling["cpu_per_wall_windows"] == [0.5, 1.0, 3.0]
    entry = _variant_entry("kd_w4", times, SimpleNamespace(batch_size=4, info={}), steps=10)
    assert entry["cpu_per_wall_windows"] == [0.5, 1.0, 3.0]
    assert entry["step_ms"] == 200.0  # 2 s over 10 steps, the median window


def test_a_benchmark_over_exactly_one_batch_of_images_runs():
    images, labels = _images(4)
    result = run_benchmark(images, labels, device="cpu", variants=["data_kdlib"],
                           log=lambda m: None, later_parts=False,
                           **{**TINY, "windows": 1, "flops_probe_batch": 4})
    assert result["variants"]["data_kdlib"]["status"] == "ok"


def test_the_grouped_part_is_measured_only_with_kd_w4(monkeypatch):
    from kdlib.bench import run

    def grouped_part(*_, **__):
        raise AssertionError("the grouped part measures kd_w4's step, which was not asked for")

    monkeypatch.setattr(run, "grouped_part", grouped_part)
    images, labels = _images(8)
    result = run_benchmark(images, labels, device="cpu", variants=["data_kdlib"],
                           log=lambda m: None, grouped=True, **{**TINY, "windows": 1})
    assert "grouped" not in result and result["variants"]["data_kdlib"]["status"] == "ok"


def test_main_passes_the_warmup_it_is_given(tmp_path, fake_data_root):
    assert bench.main(_args(tmp_path, fake_data_root, variants=["data_kdlib"], warmup=2)) == 0
    result = json.loads(next((tmp_path / "bench").iterdir()).read_text())
    assert result["settings"]["warmup"] == 2


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
@pytest.mark.slow
def test_bench_on_real_cifar100(tmp_path, real_data_root):
    assert bench.main(_args(tmp_path, real_data_root, variants=["kd_w4", "kd_w4_typical"])) == 0
    result = json.loads(next((tmp_path / "bench").iterdir()).read_text())
    assert result["settings"]["data"] == "CIFAR-100 training set, 50000 images"
    assert result["settings"]["data_root"] == str(real_data_root.absolute())
    v = result["variants"]
    ratio = result["ratios"]["kd_speedup_vs_typical"]["value"]
    assert ratio == pytest.approx(v["kd_w4_typical"]["step_ms"] / v["kd_w4"]["step_ms"])
    for entry in v.values():
        assert entry["images_per_s"] * entry["step_ms"] / 1000 == pytest.approx(8)
        assert entry["gflops"] == pytest.approx(
            (TRAIN_FLOPS + FORWARD_FLOPS) * 8 / (entry["step_ms"] / 1000) / 1e9)


def test_a_profile_waits_for_the_device_around_its_steps_and_times_each(monkeypatch):
    import time

    profile = importlib.import_module("kdlib.bench.profile")
    events: list[str] = []
    monkeypatch.setattr(profile, "sync", lambda device: events.append("sync"))
    profile.profile_runner(lambda: events.append("step"), torch.device("cpu"), steps=3, warmup=2)
    # the warm-up's queued work is done before the clock starts, the last step's before it stops
    assert events == ["step"] * 2 + ["sync"] + ["step"] * 3 + ["sync"]

    start = time.perf_counter()
    result = profile.profile_runner(lambda: time.sleep(0.02), torch.device("cpu"), steps=4,
                                    warmup=1)
    elapsed_ms = 1000.0 * (time.perf_counter() - start)
    assert 20.0 <= result["wall_ms_per_step"] and 4 * result["wall_ms_per_step"] <= elapsed_ms
    assert result["host_cpu_per_wall"] < 0.5  # a sleeping host: not busy all along


def test_a_profiles_top_operators_take_their_time_per_step():
    from kdlib.bench.profile import profile_runner

    x = torch.randn(256, 256)
    result = profile_runner(lambda: torch.mm(x, x), torch.device("cpu"), steps=8, warmup=1)
    top = result["top"][0]
    assert top["name"] == "aten::mm" and top["calls_per_step"] == 1
    assert 0 < top["ms_per_step"] <= result["wall_ms_per_step"]  # one step's share, not all 8


def test_the_benchmark_parts_close_the_runners_they_build(monkeypatch):
    """A runner holds a prefetching batch iterator and the teacher's frozen state (the typical
    variant: DataLoader workers): a profile or grouped part that raised must not leak them."""
    import dataclasses

    from kdlib.bench.grouped import PAIR, measure_grouped
    from kdlib.bench.profile import profile_or_error

    built, closed = [], []
    real = BY_NAME["kd_w4"]

    def counted(ctx):
        runner = real.build(ctx)
        inner = runner.close
        runner.close = lambda: closed.append(1) or inner()
        built.append(1)
        return runner

    monkeypatch.setitem(BY_NAME, "kd_w4", dataclasses.replace(real, build=counted))
    profile = importlib.import_module("kdlib.bench.profile")

    def no_profiler(step, device, **kw):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(profile, "profile_runner", no_profiler)
    ctx = _tiny_context()
    assert profile_or_error(ctx, 2, lambda m: None) == {"error": "RuntimeError: CUPTI unavailable"}
    assert len(built) == len(closed) == 1

    def fails(runners, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(MEASURE, "measure", fails)
    part = measure_grouped(ctx, windows=2, steps=3, warmup=0, log=lambda m: None)
    assert part["steps"] == {"error": "RuntimeError: out of memory"}
    assert len(built) == len(closed) == 1 + len(PAIR)


def test_the_grouped_part_rates_count_every_step_of_a_window(monkeypatch):
    from kdlib.bench.grouped import PAIR, measure_grouped

    monkeypatch.setattr(MEASURE, "measure", lambda runners, *, windows, steps, **kw: {
        name: {"wall": [0.5] * windows} for name in runners})
    part = measure_grouped(_tiny_context(batch_size=4), windows=2, steps=5, warmup=0,
                           log=lambda m: None)
    for name in PAIR:
        assert part["steps"][name]["images_per_s"] == pytest.approx(5 * 4 / 0.5)


def test_a_window_records_wall_and_cpu_seconds_of_its_own_steps(monkeypatch):
    """img/s is steps x batch over the window's wall seconds: the wall clock and the process's
    CPU clock must not be swapped, nor the warm-up counted in a window (clock faked)."""
    from types import SimpleNamespace

    clock = SimpleNamespace(wall=100.0, cpu=7.0)
    monkeypatch.setattr(MEASURE, "time", SimpleNamespace(perf_counter=lambda: clock.wall,
                                                         process_time=lambda: clock.cpu))

    def step() -> None:  # each step: half a second of wall time, an eighth of CPU time
        clock.wall += 0.5
        clock.cpu += 0.125

    assert MEASURE.time_window(step, 3, torch.device("cpu")) == (1.5, 0.375)
    times = bench.measure({"a": bench.Runner(step, batch_size=4)}, windows=2, steps=3, warmup=2,
                          device=torch.device("cpu"))
    assert times["a"] == {"wall": [1.5, 1.5], "cpu": [0.375, 0.375], "warmup_s": 1.0}


def test_a_slow_matmul_ceiling_is_made_smaller_but_not_below_256(monkeypatch):
    """A product over MATMUL_MAX_SECONDS halves the size (one at a time, so the largest size
    that fits is kept) until one fits or 256 is reached; the FLOPs follow the size used."""
    sizes = []

    def seconds(a, b, out, inner):
        sizes.append(a.shape[0])
        return 1.0 if a.shape[0] > limit else 0.01

    monkeypatch.setattr(MEASURE, "_matmul_seconds", seconds)
    limit = 512
    runner = bench.matmul_runner(torch.device("cpu"), torch.float32, size=1024)
    assert sizes == [1024, 512] and runner.info["size"] == 512
    limit, sizes[:] = 0, []  # every size too slow
    runner = bench.matmul_runner(torch.device("cpu"), torch.float32, size=1024)
    assert sizes == [1024, 512] and runner.info["size"] == 256
    assert runner.flops_per_step == 2 * 256**3


def test_same_bits_compares_raw_bits_not_values():
    """The speed switches' equality checks compare raw bits: -0.0 is not 0.0, NaN equals itself,
    and equal bytes of another dtype or shape are not the same tensor."""
    x = torch.tensor([1.5, float("nan"), 0.0])
    assert MEASURE.same_bits(x, x.clone())
    assert not MEASURE.same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not MEASURE.same_bits(torch.zeros(2), torch.zeros(2, dtype=torch.int32))
    assert not MEASURE.same_bits(torch.zeros(4), torch.zeros(2, 2))


def test_count_ops_counts_operators_that_launch_kernels_not_views():
    x = torch.randn(4, 4)
    assert MEASURE.count_ops(lambda: x.view(16).unsqueeze(0).t()) == 0
    assert MEASURE.count_ops(lambda: (x + 1).sum()) == 2


def test_the_result_s_rates_are_steps_times_batch_over_the_measured_seconds(monkeypatch):
    """With the windows' seconds known (measure faked): each window's img/s is steps x batch /
    seconds and the ceilings' GFLOP/s FLOPs x steps / seconds (steps != 1, so a lost factor
    shows); a variant that failed keeps its error and gets no FLOPs; the date is UTC."""
    import datetime as dt

    from kdlib.bench import run as bench_run

    walls = {"fp32": [0.5, 2.0, 1.0], "matmul_fp32": [1.0, 0.25, 0.5],
             "matmul_bf16": [1.0, 1.0, 1.0]}

    def measured(runners, *, windows, steps, **kw):
        assert windows == 3 and steps == 2
        out = {n: {"wall": w, "cpu": [0.5 * s for s in w], "warmup_s": 0.1}
               for n, w in walls.items()}
        return {**out, "w4a4": {"error": "RuntimeError: out of memory"}}

    monkeypatch.setattr(bench_run, "measure", measured)
    images, labels = _images()
    r = run_benchmark(images, labels, device="cpu", variants=["fp32", "w4a4"],
                      log=lambda m: None, later_parts=False, **{**TINY, "steps": 2})
    fp32 = r["variants"]["fp32"]
    assert fp32["images_per_s_windows"] == [16.0, 4.0, 8.0] and fp32["images_per_s"] == 8.0
    assert fp32["step_ms"] == 500.0 and fp32["cpu_per_wall_windows"] == [0.5] * 3
    ceiling = r["ceilings"]["matmul_fp32"]
    assert ceiling["size"] == 32
    assert ceiling["gflops_windows"] == pytest.approx([2 * 32**3 * 2 / w / 1e9 for w in walls[
        "matmul_fp32"]])
    assert fp32["gflops"] == pytest.approx(fp32["flops_per_image"] * 4 / 0.5 / 1e9)
    failed = r["variants"]["w4a4"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: out of memory"
    assert "gflops" not in failed
    assert dt.datetime.fromisoformat(r["date"]).utcoffset() == dt.timedelta(0)


def test_a_cpu_benchmark_runs_processes_side_by_side_and_later_parts_only_when_asked(monkeypatch):
    """On a CPU one run already uses every core: no processes side by side unless counts are
    given (and then each warms up at least a step); later_parts=False leaves the grouped part to
    the lease that completes the benchmark."""
    from kdlib.bench import run as bench_run

    calls = []

    def processes(ctx, variant, counts, **kw):
        calls.append((tuple(counts), kw["warmup"]))
        return {"variant": variant, "seconds": 1.0, "by_jobs": {}}

    def grouped_part(*_, **__):
        raise AssertionError("later_parts=False: the grouped part is left for later")

    monkeypatch.setattr(bench_run, "processes_or_error", processes)
    monkeypatch.setattr(bench_run, "grouped_part", grouped_part)
    images, labels = _images(8)
    common = dict(device="cpu", log=lambda m: None, later_parts=False, **{**TINY, "windows": 1})
    result = run_benchmark(images, labels, variants=["kd_w4"], **common)
    assert calls == [] and "concurrency" not in result and "grouped" not in result
    result = run_benchmark(images, labels, variants=["data_kdlib"], concurrency=(1, 2), **common)
    assert calls == [((1, 2), 1)] and result["concurrency"]["variant"] == "kd_w4"


def test_run_benchmark_refuses_impossible_settings_before_measuring(monkeypatch):
    from kdlib.bench import run as bench_run

    def measured(*_, **__):
        raise AssertionError("measured despite an impossible setting")

    monkeypatch.setattr(bench_run, "measure", measured)
    images, labels = _images(8)
    for kw, message in (({"workers": -1}, "workers=-1"), ({"windows": True}, "windows=True"),
                        ({"images": images.float()}, "uint8"),
                        ({"images": images[:, :1]}, r"\[8, 1, 32, 32\]|\(8, 1, 32, 32\)")):
        with pytest.raises(ValueError, match=message):
            run_benchmark(**{"images": images, "labels": labels, "device": "cpu",
                             "variants": ["data_kdlib"], "log": lambda m: None, **TINY, **kw})


def test_the_grouped_part_times_the_benchmark_s_windows_steps_and_warm_up(monkeypatch):
    from kdlib.bench import grouped, run as bench_run

    seen = {}
    monkeypatch.setattr(grouped, "measure_grouped", lambda ctx, **kw: seen.update(kw) or {})
    bench_run.grouped_part(None, {"windows": 2, "steps": 7, "warmup": 1}, lambda m: None)
    assert {k: seen[k] for k in ("windows", "steps", "warmup")} == {
        "windows": 2, "steps": 7, "warmup": 1}


def test_a_speedup_is_above_one_where_its_switch_makes_the_step_faster():
    """Every speed-up is the slower step's time over the faster's: 3x where the switch (or
    kdlib over the typical pipeline) takes a third of the time."""
    slow_fast = {"channels_last_speedup": ("kd_w4_nchw", "kd_w4_channels_last"),
                 "compile_speedup": ("kd_w4", "kd_w4_compile"),
                 "bf16_kd_speedup": ("kd_w4", "kd_w4_bf16"),
                 "kd_speedup_vs_typical": ("kd_w4_typical", "kd_w4"),
                 "data_speedup_vs_typical": ("data_typical", "data_kdlib")}
    for key, (slow, fast) in slow_fast.items():
        variants = {slow: {"status": "ok", "step_ms": 30.0},
                    fast: {"status": "ok", "step_ms": 10.0}}
        assert compute_ratios(variants)[key]["value"] == pytest.approx(3.0), key


def test_render_markdown_rows_relative_times_shares_and_unordered_variants():
    """The table's last column is each step's time over fp32's (a 20 ms step against fp32's
    10 ms is 2.00x, a far shorter one gets a third digit), a variant timed once says whose step
    it is, ceiling shares and ratios over a ceiling are percentages, and a variant missing from
    variant_order still gets its row."""
    def ok(ms, **kw):
        return {"status": "ok", "step_ms": ms, "images_per_s": 4000.0 / ms,
                "images_per_s_windows": [4000.0 / ms], **kw}

    variants = {"fp32": ok(10.0), "kd_w4": ok(20.0, gflops=5.0, of_ceiling={
        "matmul_fp32": 0.25, "matmul_bf16": 0.5}), "data_kdlib": ok(0.5), "w1a1": ok(10.0)}
    variants["kd_w4_nchw"] = {**variants["kd_w4"], "same_as": "kd_w4"}
    ceilings = {"matmul_fp32": {"status": "ok", "gflops": 20.0, "dtype": "float32", "size": 32}}
    md = render_markdown({"variants": variants, "ceilings": ceilings,
                          "ratios": compute_ratios(variants, ceilings), "machine": {},
                          "settings": {"variant_order": ["fp32", "kd_w4", "kd_w4_nchw",
                                                         "data_kdlib"]}})
    rows = {line.split("`")[1]: line for line in md.splitlines()
            if line.startswith("| ") and "`" in line}
    assert list(rows) == ["fp32", "kd_w4", "kd_w4_nchw", "data_kdlib", "w1a1"]
    assert rows["kd_w4"].endswith("| 2.00× |") and rows["data_kdlib"].endswith("| 0.050× |")
    assert "| 25% / 50% |" in rows["kd_w4"]
    assert "same step as `kd_w4`" in rows["kd_w4_nchw"]
    assert f"- {TARGETS['kd_w4_of_fp32_ceiling'][0]}: 25% (target >= 85%) — **missed**" in md


def test_render_markdown_names_the_bit_widths_whose_check_failed():
    """A grouped check whose gradients differ, or compiled levels whose weights are inexact,
    must not read as exact."""
    grouped = {"check": {"exact": False, "by_bits": {
        "1": {"values": True, "gradients": True}, "4": {"values": True, "gradients": False}}},
        "steps": {"error": "RuntimeError: not timed"}}
    compiled = {"levels": {"by_bits": {
        "2": {"activation_exact": True, "weight_exact": False, "weight_levels_unlike_eager": 0},
        "4": {"activation_exact": True, "weight_exact": True, "weight_levels_unlike_eager": 0}}},
        "concurrency": {"error": "RuntimeError: not measured"}}
    md = render_markdown({"variants": {}, "ratios": {}, "machine": {}, "settings": {},
                          "grouped": grouped, "compiled": compiled})
    assert "**no** at 4 bits (of 1, 4)" in md
    assert "**no**: exact at 4 bits, **not** at 2 (weight) bits" in md


def test_a_compiled_variant_counts_its_flops_on_an_eager_step(monkeypatch):
    """FLOPs of kd_w4_compile are counted on an eager step (compiling changes how, not what, is
    computed, and would take minutes): the same count as kd_w4's."""
    from kdlib.bench import variants

    real, compiled = variants._kdlib_runner, []

    def runner(cfg, ctx):
        compiled.append(cfg.compile)
        if cfg.compile:
            raise AssertionError("the FLOPs probe compiles")
        return real(cfg, ctx)

    monkeypatch.setattr(variants, "_kdlib_runner", runner)
    assert BY_NAME["kd_w4_compile"].flops(_tiny_context(), 2) == TRAIN_FLOPS + FORWARD_FLOPS
    assert compiled == [False]


def test_every_build_of_a_variant_starts_from_the_same_weights():
    """Each variant's models are seeded from the run config, as experiments builds them: two
    builds (a re-run, a process side by side) train the same student from the same teacher."""
    ctx = _tiny_context()
    first, second = (BY_NAME["kd_w4"].build(ctx) for _ in range(2))
    try:
        for a, b in ((first.trainer.model, second.trainer.model),
                     (first.trainer.teacher, second.trainer.teacher)):
            sa, sb = a.state_dict(), b.state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    finally:
        first.close()
        second.close()


def test_the_grouped_check_finds_gradients_that_differ_under_equal_values(monkeypatch):
    """Grouped weights must match per-layer ones in their gradients too, not only their values."""
    from kdlib.bench import grouped

    class DoubledGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return q.clone()

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    real = grouped.dorefa_weights
    monkeypatch.setattr(grouped, "dorefa_weights",
                        lambda ws, b: [DoubledGradient.apply(q) for q in real(ws, b)])
    assert grouped.check_weights("cpu", bits=(4,)) == {
        "exact": False, "by_bits": {"4": {"values": True, "gradients": False}}}
