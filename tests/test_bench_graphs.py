"""The benchmark's graphs part (kdlib.bench.graphs) and what a lease does with it.

The real CUDA graph runs only on a GPU (tests/test_graphed_step.py's CUDA test, and the lease's
benchmark); here the check runs with the emulated capture (tests/graph_emulator.py), and the
processes side by side are replaced by their recorded numbers.
"""
from types import SimpleNamespace

import pytest
import torch

import kdlib.presets
from kdlib import lease
from kdlib.bench import render
from kdlib.bench.graphs import check_graph_step, graphs_verdict, measure_graphs
from kdlib.budget import RunTimer
from kdlib.presets import build_config
from test_graphed_step import EmulatedCapture


@pytest.mark.slow
def test_the_check_finds_a_faithful_replay_equal_and_a_faulty_one_not():
    good = check_graph_step("cpu", preset="smoke", steps=6, capture=EmulatedCapture())
    assert good == {"equal": True, "eager_repeatable": True, "steps": 6, "max_abs_diff": 0.0}

    def skips_every_other_replay(fn, stream):
        calls = []

        def replay():
            calls.append(1)
            if len(calls) % 2:
                fn()
        return replay

    bad = check_graph_step("cpu", preset="smoke", steps=6, capture=skips_every_other_replay)
    assert not bad["equal"] and bad["eager_repeatable"] and bad["max_abs_diff"] > 0


@pytest.mark.slow
def test_a_capture_the_device_refuses_is_a_failed_check_not_an_equal_one(monkeypatch):
    """A run whose capture is refused goes on eagerly (tests/test_graphed_step.py); the check
    and the replaying variant must not take those eager steps for replayed ones."""
    import kdlib.step as step_mod
    from kdlib.bench.variants import BY_NAME, make_context
    from graph_emulator import emulated_capture

    def refusing(fn, stream):
        emulated_capture(fn, stream)
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="could not be captured: RuntimeError: operation not"):
        check_graph_step("cpu", preset="smoke", steps=6, capture=refusing)
    monkeypatch.setattr(step_mod, "capture_for", lambda device: refusing)
    gen = torch.Generator().manual_seed(0)
    ctx = make_context(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen),
                       torch.randint(0, 100, (64,), generator=gen), batch_size=8, device="cpu")
    runner = BY_NAME["kd_w4_graphs"].build(ctx)
    try:
        for _ in range(step_mod.GRAPH_WARMUP_STEPS):
            runner.step()  # eager warm-up steps
        with pytest.raises(RuntimeError, match="could not be captured"):
            runner.step()
    finally:
        runner.close()


def test_the_check_needs_cuda_or_a_capture():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_graph_step("cpu", preset="smoke")


def _eager(rates):
    return {"variant": "kd_w4", "seconds": 10.0, "by_jobs": {
        str(k): {"images_per_s": float(r), "per_process": [r / k] * k} for k, r in rates.items()}}


EAGER = _eager({1: 3834, 2: 7588, 4: 17222, 8: 18744})


def test_the_graphs_part_is_recorded_rendered_and_decides_the_grid(monkeypatch):
    import kdlib.bench.concurrent as concurrent
    import kdlib.bench.graphs as graphs
    import kdlib.bench.profile as profile

    asked = []

    def side_by_side(images, labels, *, jobs, variant, **_):
        asked.append((variant, tuple(jobs)))
        return _eager({1: 20000, 2: 36000, 4: 45000, 8: 47000}) | {"variant": variant}

    monkeypatch.setattr(concurrent, "concurrent_throughput", side_by_side)
    monkeypatch.setattr(graphs, "check_graph_step", lambda device, **_: {
        "equal": True, "eager_repeatable": True, "steps": 8, "max_abs_diff": 0.0})
    profiled = {"variant": "kd_w4_graphs", "steps": 20, "wall_ms_per_step": 5.0,
                "device_busy_ms_per_step": 4.5, "device_busy_fraction": 0.9,
                "kernel_launches_per_step": 25.0, "bound": "device (kernels)", "top": []}
    monkeypatch.setattr(profile, "profile_variant", lambda ctx, variant, **_: profiled)
    ctx = SimpleNamespace(device=torch.device("cpu"),
                          images=torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                          labels=torch.zeros(2, dtype=torch.int64))
    part = measure_graphs(ctx, seconds=10.0, preset="gpu", model="resnet20", log=print)
    assert asked == [("kd_w4_graphs", (1, 2, 4, 8))] and part["profile"] == profiled
    bench = {"concurrency": EAGER, "graphs": part}
    assert render._optional_line(part, "profile", "?", render._profile_line) == [
        "- profile of `kd_w4_graphs` (20 steps, torch.profiler): the GPU busy 4.5 ms of each "
        "5.0 ms step (90%), 25 kernel launches a step; bound by device (kernels); most time: "]
    line = render._graphs_line(part)
    assert "the same bits as eager steps yes (8 KD 4-bit steps, deterministic cuDNN)" in line
    assert "1 × 20000 = 20000 img/s" in line and "8 × 5875 = 47000 img/s" in line
    verdict = graphs_verdict(bench)
    assert verdict["use"] \
        and "4 replaying processes 45,000 img/s against 4 eager ones 17,222" in verdict["why"]
    assert render._graphs_verdict_line(bench)[0].startswith(
        "- CUDA graphs for a grid's runs (`lease go` sets `cuda_graphs`): **replay**")
    assert lease.replays_steps(bench, "gpu") and lease.auto_jobs(bench, "gpu") == 4
    assert not lease.replays_steps({"concurrency": EAGER}, "gpu")  # no graphs part yet
    assert graphs_verdict({"concurrency": EAGER}) is None

    differs = {**part, "check": {"equal": False, "eager_repeatable": True, "steps": 8,
                                 "max_abs_diff": 3e-7}}
    assert not graphs_verdict({**bench, "graphs": differs})["use"]
    assert "**no** (weights up to 3e-07 apart after 8 steps" in render._graphs_line(differs)
    slower = {**part, "concurrency": _eager({1: 3000, 2: 6000, 4: 9000})}
    assert not graphs_verdict({**bench, "graphs": slower})["use"]
    assert not lease.replays_steps({**bench, "graphs": slower}, "gpu")
    assert lease.auto_jobs({**bench, "graphs": slower}, "gpu") == 4  # the eager count
    failed = {"check": {"error": "RuntimeError: operation not permitted when stream is capturing"},
              "concurrency": {"error": "RuntimeError: 1 concurrent kd_w4_graphs processes failed"}}
    assert "the check failed" in graphs_verdict({**bench, "graphs": failed})["why"]
    assert "not checked (RuntimeError: operation not permitted" in render._graphs_line(failed)
    # a preset that compiles (`paper`, once decided) runs compiled processes, never replaying ones
    monkeypatch.setattr(kdlib.presets, "build_config",
                        lambda *args, **kwargs: build_config(*args, **kwargs).replace(compile=True))
    assert not lease.replays_steps(bench, "gpu") and lease.auto_jobs(bench, "gpu") == 1


def test_estimates_of_replayed_runs_use_the_replaying_processes_rates():
    graphs = {"check": {"equal": True}, "concurrency": _eager({1: 20000, 2: 36000, 4: 45000})}
    bench = {"machine": {"device": "cuda", "gpu": "G"}, "settings": {"model": "resnet20"},
             "variants": {"kd_w4": {"images_per_s": 3834.0}}, "concurrency": EAGER,
             "graphs": graphs}
    cfg = build_config("gpu", overrides={"method": "direct_kd", "teacher_id": "t", "w_bits": 4,
                                         "a_bits": 4, "cuda_graphs": True})
    eager = RunTimer("cuda:G", bench=bench, jobs=4)
    replayed = RunTimer("cuda:G", bench=bench, jobs=4, graphs=True)
    assert "3834 img/s a run with 4 at a time" in eager.estimate(cfg).source  # never above alone
    assert "11250 img/s a run with 4 at a time" in replayed.estimate(cfg).source
    # a finished eager run does not time a replayed one, nor the other way round
    record = {"device": "cuda", "gpu": "G", "config": cfg.replace(cuda_graphs=False).to_dict(),
              "history": [{"seconds": 30.0}]}
    replayed.add(record)
    assert replayed.estimate(cfg).source.startswith("benchmark")
    assert replayed.estimate(cfg.replace(cuda_graphs=False)).source.startswith("1 finished run")


def test_go_trains_replayed_runs_where_the_benchmark_says_so(fake_data_root, tmp_path,
                                                              monkeypatch):
    import kdlib.budget
    import kdlib.executors

    planned = []
    monkeypatch.setattr(kdlib.executors, "execute_processes",
                        lambda plan, **kw: planned.append((plan, kw["jobs"])) or [])
    graphs = {"check": {"equal": True}, "concurrency": _eager({1: 200, 2: 400, 4: 800})}
    monkeypatch.setattr(kdlib.budget, "load_bench", lambda folder, kind: {
        "concurrency": _eager({1: 100, 2: 200, 4: 300}), "graphs": graphs})
    lease.go(preset="smoke", minutes=1, jobs="auto", results_dir=tmp_path / "results",
             repo_root=tmp_path / "repo", model="resnet8", bench="never",
             stash=tmp_path / "stash", data_root=fake_data_root, log=lambda m: None)
    ((plan, jobs),) = planned
    assert jobs == 4 and plan and all(cfg.cuda_graphs for cfg in plan)
    run_ids = {cfg.run_id() for cfg in plan}  # the same runs as eager ones: records carry over
    assert run_ids == {cfg.replace(cuda_graphs=False).run_id() for cfg in plan}


def test_the_replayed_variant_profiles_and_times_where_it_cannot_replay():
    """On a CPU kd_w4_graphs is the eager step (a lease's parts must not fail for want of a
    GPU where they are rehearsed): it builds, profiles and steps."""
    from kdlib.bench.profile import profile_variant
    from kdlib.bench.variants import make_context

    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    ctx = make_context(images, torch.randint(0, 100, (256,)), preset="smoke", device="cpu")
    result = profile_variant(ctx, "kd_w4_graphs", steps=2, warmup=1)
    assert result["variant"] == "kd_w4_graphs" and result["bound"] == "host (no device)"


def test_the_replayed_variant_is_profiled_on_replays_only(monkeypatch):
    """kd_w4_graphs' warm-up (its runner's ``warmup_min``, which the timed windows and the
    processes side by side also honour) covers the eager steps and the capture, so every
    profiled step is a replay (a profile of warm-up steps would count eager launches)."""
    import kdlib.step as step_mod
    from kdlib.bench.profile import profile_variant
    from kdlib.bench.variants import make_context

    capture = EmulatedCapture()
    monkeypatch.setattr(step_mod, "capture_for", lambda device: capture)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    ctx = make_context(images, torch.arange(64) % 100, preset="smoke", model="resnet8", workers=0)
    result = profile_variant(ctx, "kd_w4_graphs", steps=3, warmup=1)
    assert result["steps"] == 3 and capture.captures == 1
    assert capture.replays == 1 + 3  # the captured step's own replay, then the 3 profiled


def test_the_check_runs_with_deterministic_cudnn_and_restores_the_settings():
    from kdlib.bench.graphs import deterministic_cudnn

    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    inside = []
    try:
        cudnn.deterministic, cudnn.benchmark = False, True
        with pytest.raises(RuntimeError, match="a failing check"):
            with deterministic_cudnn():
                inside.append((cudnn.deterministic, cudnn.benchmark))
                raise RuntimeError("a failing check")
        assert inside == [(True, False)]  # eager repeats itself bit for bit
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)  # the run's own again
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def test_the_check_s_largest_difference_counts_either_sign_and_only_floats():
    from kdlib.bench.graphs import _max_abs_diff

    eager = {"w": torch.tensor([0.5, 1.0]), "n": torch.tensor(3)}
    replayed = {"w": torch.tensor([0.5, 0.75]), "n": torch.tensor(9)}
    assert _max_abs_diff(eager, replayed) == _max_abs_diff(replayed, eager) == 0.25
    assert _max_abs_diff(eager, eager) == 0.0


def test_the_check_refuses_steps_that_all_run_before_the_capture():
    from kdlib.step import GRAPH_WARMUP_STEPS

    capture = EmulatedCapture()
    with pytest.raises(ValueError, match="none would be replayed"):
        check_graph_step("cpu", preset="smoke", model="resnet8", steps=GRAPH_WARMUP_STEPS,
                         capture=capture)
    assert capture.captures == 0


def test_the_check_refuses_more_steps_than_one_epoch_of_its_images():
    from kdlib.bench.graphs import CHECK_IMAGES

    per_epoch = CHECK_IMAGES // build_config("smoke").batch_size
    with pytest.raises(ValueError, match="more than one epoch"):
        check_graph_step("cpu", preset="smoke", steps=per_epoch + 1, capture=EmulatedCapture())


@pytest.mark.slow
def test_the_check_compares_every_step_and_its_losses(monkeypatch):
    """Replays of every step after the warm-up; a replay whose weights are right but whose loss
    is not (a stale graph output), or whose losses are right but whose weights are not, is not
    the same bits; an eager run that does not repeat itself is reported."""
    import kdlib.step as step_mod

    steps = step_mod.GRAPH_WARMUP_STEPS + 2
    capture = EmulatedCapture()
    good = check_graph_step("cpu", preset="smoke", model="resnet8", steps=steps, capture=capture)
    assert good["equal"] and good["eager_repeatable"]
    assert capture.captures == 1 and capture.replays == steps - step_mod.GRAPH_WARMUP_STEPS

    real_call = step_mod.GraphedStep.__call__

    def wrong_loss(self, x, y, lr, **kw):
        loss, total, logits = real_call(self, x, y, lr, **kw)
        return loss + 1, total, logits

    with monkeypatch.context() as m:
        m.setattr(step_mod.GraphedStep, "__call__", wrong_loss)
        bad = check_graph_step("cpu", preset="smoke", model="resnet8", steps=steps,
                               capture=EmulatedCapture())
    assert not bad["equal"] and bad["eager_repeatable"] and bad["max_abs_diff"] == 0.0

    real_check = step_mod.GraphedStep.check_replayed

    def wrong_weights(self):  # after the last step: every loss stays right
        real_check(self)
        with torch.no_grad():
            next(self.trainer.model.parameters()).view(-1)[0] += 1e-3

    with monkeypatch.context() as m:
        m.setattr(step_mod.GraphedStep, "check_replayed", wrong_weights)
        bad = check_graph_step("cpu", preset="smoke", model="resnet8", steps=steps,
                               capture=EmulatedCapture())
    assert not bad["equal"] and bad["eager_repeatable"] and bad["max_abs_diff"] > 0.0

    real_make_trainer, made = step_mod.make_trainer, []

    def second_eager_run_differs(model, *args, **kw):
        made.append(1)
        if len(made) == 2:  # the second eager run: as a run-dependent kernel would
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1e-3
        return real_make_trainer(model, *args, **kw)

    monkeypatch.setattr(step_mod, "make_trainer", second_eager_run_differs)
    unrepeatable = check_graph_step("cpu", preset="smoke", model="resnet8", steps=steps,
                                    capture=EmulatedCapture())
    assert unrepeatable["equal"] and not unrepeatable["eager_repeatable"] and len(made) == 3


def test_the_graphs_part_profiles_the_replayed_step_and_records_a_failed_check(monkeypatch):
    import kdlib.bench.concurrent as concurrent
    import kdlib.bench.graphs as graphs
    import kdlib.bench.profile as profile

    profiled = []
    monkeypatch.setattr(concurrent, "concurrent_throughput",
                        lambda images, labels, *, jobs, variant, **_: _eager({1: 20000}))

    def refused(device, **_):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "check_graph_step", refused)
    monkeypatch.setattr(profile, "profile_variant",
                        lambda ctx, variant, **kw: profiled.append((variant, kw)) or {"steps": 1})
    ctx = SimpleNamespace(device=torch.device("cpu"),
                          images=torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                          labels=torch.zeros(2, dtype=torch.int64))
    part = measure_graphs(ctx, seconds=1.0, preset="gpu", model="resnet20", log=print, jobs=(1,))
    assert profiled == [("kd_w4_graphs", {"steps": graphs.PROFILE_STEPS})]
    assert part["check"] == {"error": "RuntimeError: operation not permitted when stream is "
                                      "capturing"}
    assert part["concurrency"]["by_jobs"]["1"]["images_per_s"] == 20000


def test_replaying_only_pays_for_more_images_a_second_and_says_when_eager_is_unsteady():
    equal = {"equal": True, "eager_repeatable": True, "steps": 8, "max_abs_diff": 0.0}
    tie = {"concurrency": _eager({1: 5000}),
           "graphs": {"check": equal, "concurrency": _eager({1: 5000})}}
    assert not graphs_verdict(tie)["use"]  # the same speed: nothing to gain
    steady = {**equal, "equal": False, "max_abs_diff": 1e-7}
    why = graphs_verdict({**tie, "graphs": {**tie["graphs"], "check": steady}})["why"]
    assert "differ from eager ones (at most 1e-07)" in why and "either" not in why
    unsteady = {**steady, "eager_repeatable": False}
    why = graphs_verdict({**tie, "graphs": {**tie["graphs"], "check": unsteady}})["why"]
    assert why.endswith("; eager steps did not repeat themselves either")
