"""torch.compile's part of a GPU benchmark: do the compiled quantizers keep every level exact,
and how fast do compiled processes run side by side. The check compiles for real here (the
CPU's C++ backend, seconds); on a GPU the lease runs it with Triton."""
import pytest
import torch

from kdlib.bench import render
from kdlib.bench.compiled import measure_compiled
from kdlib.compile_check import check_levels


@pytest.mark.slow
def test_compiled_quantizers_give_exact_levels_here():
    result = check_levels("cpu", bits=(4, 16))
    assert result["exact"] and set(result["by_bits"]) == {"4", "16"}
    assert result["by_bits"]["16"] == {"activation_exact": True, "weight_exact": True,
                                       "weight_levels_unlike_eager": 0}


def one_ulp_up(fn):
    """What an approximate division would do: some values one ulp above k/n."""
    def run(x, w):
        return tuple(torch.nextafter(t, torch.full_like(t, 2.0)) for t in fn(x, w))
    return run


def test_a_compiler_one_ulp_off_is_caught():
    result = check_levels("cpu", bits=(2, 8), compile_fn=one_ulp_up)
    assert not result["exact"]
    assert not any(e["activation_exact"] or e["weight_exact"] for e in result["by_bits"].values())


def test_the_compiled_part_is_recorded_and_rendered(monkeypatch):
    from types import SimpleNamespace

    import kdlib.bench.concurrent as concurrent

    asked = []

    def side_by_side(images, labels, *, jobs, variant, **_):
        asked.append((variant, tuple(jobs)))
        rate = {"kd_w4_compile": 30000.0, "kd_w4_cudagraphs": 21000.0}[variant]
        return {"variant": variant, "seconds": 1.0,
                "by_jobs": {str(k): {"images_per_s": rate * k / jobs[0], "ready_s": 40.0 + k,
                                     "per_process": [rate / jobs[0]] * k} for k in jobs}}

    monkeypatch.setattr(concurrent, "concurrent_throughput", side_by_side)
    ctx = SimpleNamespace(device=torch.device("cpu"),
                          images=torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                          labels=torch.zeros(2, dtype=torch.int64))
    part = measure_compiled(ctx, [4, 8], seconds=1.0, preset="gpu", model="resnet20", log=print,
                            compile_fn=lambda fn: fn)
    assert part["division"] == "float64"  # a later lease measures it again if that changes
    part["levels"]["by_bits"] = dict(sorted(part["levels"]["by_bits"].items()))  # as JSON stores it
    line = render._compiled_line(part)
    assert "every quantizer level exact yes at 2, 4, 8, 16 bits" in line  # the default widths
    assert asked == [("kd_w4_compile", (4, 8)), ("kd_w4_cudagraphs", (1,))]
    assert ("4 at once: 30000 img/s (44 s to compile), "
            "8 at once: 60000 img/s (48 s to compile)") in line
    assert ("replayed as CUDA graphs (`kd_w4_cudagraphs`, reduce-overhead), "
            "one process: 21000 img/s") in line
    older = {k: v for k, v in part.items() if k != "cudagraphs"}  # before it existed
    assert "CUDA graph" not in render._compiled_line(older)
    part["cudagraphs"]["by_jobs"]["1"]["cudagraph_skips"] = 2
    assert "21000 img/s (2 compiled graph(s) ran without CUDA graphs)" \
        in render._compiled_line(part)
    broken = measure_compiled(ctx, [4, 8], seconds=1.0, preset="gpu", model="resnet20", log=print,
                              compile_fn=one_ulp_up)
    assert ("exact **no**: **not** at 2 (activation, weight), 4 (activation, weight)"
            in render._compiled_line(broken))
    mixed = {**part, "levels": {"exact": False, "by_bits": {
        "2": {"activation_exact": True, "weight_exact": True, "weight_levels_unlike_eager": 0},
        "8": {"activation_exact": False, "weight_exact": True, "weight_levels_unlike_eager": 9}}}}
    assert ("exact **no**: exact at 2 bits, **not** at 8 (activation) bits;"
            in render._compiled_line(mixed))
    failing = {"levels": {"error": "BackendCompilerFailed: no C compiler"},
               "concurrency": {"error": "RuntimeError: 4 concurrent processes failed"},
               "cudagraphs": {"error": "RuntimeError: 1 concurrent kd_w4_cudagraphs processes: "
                                       "no result\nStack trace: File x.py, line 1"}}
    assert "not checked (BackendCompilerFailed" in render._compiled_line(failing)
    assert "replayed as CUDA graphs, not measured (RuntimeError" in render._compiled_line(failing)
    assert "\n" not in render._compiled_line(failing)  # a stack trace would break the list
    assert "not measured (RuntimeError" in render._compiled_line(failing)


def test_the_cuda_graphs_variant_compiles_fit_s_kd_step_in_reduce_overhead_mode(monkeypatch):
    """Built, not run (compiling takes minutes on this CPU; the lease times it on the GPU)."""
    from kdlib.bench.variants import BY_NAME, COMPILE_WARMUP_STEPS, make_context

    compiled, outputs = [], []

    def fake_compile(module, **kw):
        compiled.append((module, kw))
        return lambda x: outputs.append(module(x)) or outputs[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    images = torch.zeros(256, 3, 32, 32, dtype=torch.uint8)
    ctx = make_context(images, torch.zeros(256, dtype=torch.int64), preset="smoke", device="cpu")
    runner = BY_NAME["kd_w4_cudagraphs"].build(ctx)
    try:
        trainer = runner.trainer
        assert trainer.cfg.method == "direct_kd" \
            and (trainer.cfg.w_bits, trainer.cfg.a_bits) == (4, 4)
        assert not trainer.cfg.compile  # the run config's compile means the default mode
        assert [(m, kw["mode"]) for m, kw in compiled] == [(trainer.model, "reduce-overhead"),
                                                           (trainer.teacher, "reduce-overhead")]
        assert runner.info["switches"]["compile"] \
            and runner.info["compile_mode"] == "reduce-overhead"
        assert runner.warmup_min == COMPILE_WARMUP_STEPS
        marks = []
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
        runner.step()  # the step fit() runs, through the (here uncompiled) forwards
        runner.step()
        assert len(marks) == 2  # each step starts a new generation of graph outputs
        x = torch.zeros(2, 3, 32, 32)
        with torch.inference_mode():
            logits = trainer.teacher_forward(x)
        assert torch.equal(logits, outputs[-1]) and logits.data_ptr() != outputs[-1].data_ptr()
    finally:
        runner.close()


def test_a_cuda_graphs_process_reports_the_graphs_inductor_ran_without_them():
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from kdlib.bench.concurrent import _graph_notes

    assert _graph_notes(SimpleNamespace(info={})) == {}  # eager and plain compiled steps: nothing
    before = counters["inductor"]["cudagraph_skips"]
    counters["inductor"]["cudagraph_skips"] += 3
    try:
        notes = _graph_notes(SimpleNamespace(info={"compile_mode": "reduce-overhead"}))
        assert notes == {"cudagraph_skips": before + 3}
    finally:
        counters["inductor"]["cudagraph_skips"] = before



def _bench_with(compiled: dict | None, eager_rates: dict) -> dict:
    result = {"concurrency": {"variant": "kd_w4", "seconds": 10.0, "by_jobs": {
        str(k): {"images_per_s": r, "per_process": [r / k] * k} for k, r in eager_rates.items()}},
        "variants": {"kd_w4_compile": {"warmup_s": 41.0}}}
    return {**result, "compiled": compiled} if compiled is not None else result


def test_compile_pays_only_with_exact_levels_and_more_images_a_lease():
    from kdlib.bench.compiled import compile_verdict

    eager = {1: 3834.0, 2: 7588.0, 4: 17222.0, 8: 18744.0}  # the H200's: 4 worth running
    exact = {"exact": True, "by_bits": {}}
    side = {"variant": "kd_w4_compile", "by_jobs": {
        "4": {"images_per_s": 30000.0, "ready_s": 50.0},
        "8": {"images_per_s": 60000.0, "ready_s": 90.0}}}
    assert compile_verdict(_bench_with(None, eager), 480.0) is None
    verdict = compile_verdict(_bench_with(
        {"division": "float64", "levels": exact, "concurrency": side}, eager), 480.0)
    assert verdict["pays"]  # 60,000 x 390 s = 23.4 M against 17,222 x 480 s = 8.3 M
    assert "8 compiled processes 60,000 img/s after 90 s to compile: 23.4 M images" \
        in verdict["why"]
    assert "4 eager ones 17,222 img/s: 8.3 M" in verdict["why"]
    slow = {**side, "by_jobs": {"8": {"images_per_s": 60000.0, "ready_s": 400.0}}}
    assert not compile_verdict(_bench_with(  # 60,000 x 80 s = 4.8 M: the compile eats the lease
        {"division": "float64", "levels": exact, "concurrency": slow}, eager), 480.0)["pays"]
    inexact = compile_verdict(_bench_with(
        {"division": "float64", "levels": {"exact": False}, "concurrency": side}, eager), 480.0)
    assert not inexact["pays"] and "not exact" in inexact["why"]
    before = compile_verdict(_bench_with({"levels": exact, "concurrency": side}, eager), 480.0)
    assert not before["pays"] and "measured again" in before["why"]
    older = {**side, "by_jobs": {"8": {"images_per_s": 60000.0}}}  # no ready_s: one process's 41 s
    assert "after 41 s to compile" in compile_verdict(_bench_with(
        {"division": "float64", "levels": exact, "concurrency": older}, eager), 480.0)["why"]
    line = render._verdict_line(_bench_with(
        {"division": "float64", "levels": exact, "concurrency": side}, eager))
    assert line and line[0].startswith("- torch.compile for a grid of long runs by this "
                                       "benchmark's rule (`paper` compiles, decided before its "
                                       "first run): **pays** (8 compiled")


def test_jobs_auto_follows_the_step_the_preset_runs(monkeypatch):
    from kdlib import lease, presets

    eager = {1: 3834.0, 2: 7588.0, 4: 17222.0, 8: 18744.0}
    side = {"by_jobs": {"4": {"images_per_s": 30000.0}, "8": {"images_per_s": 60000.0}}}
    bench = _bench_with({"division": "float64", "levels": {"exact": True},
                         "concurrency": side}, eager)
    assert lease.auto_jobs(bench, "gpu") == 4  # eager: 8 adds under 10%
    compiling = presets.build_config("gpu").replace(compile=True)
    monkeypatch.setattr(presets, "build_config", lambda *a, **k: compiling)
    assert lease.auto_jobs(bench, "gpu") == 8  # compiled: 8 doubles 4
    assert lease.auto_jobs(None, "gpu") == 1


def test_a_long_grid_does_not_start_before_its_compile_switch_is_decided(fake_data_root, tmp_path,
                                                                          monkeypatch):
    """`compile` is in the run id: a lease of a long grid that does not compile (paper before
    it was decided) whose benchmark says compiling pays trains nothing until the preset says
    compile, or its runs would be orphaned by the switch."""
    import kdlib.budget
    import kdlib.executors
    from kdlib import lease, presets

    real = presets.build_config
    monkeypatch.setattr(presets, "build_config",
                        lambda *a, **k: real(*a, **k).replace(compile=False))

    pays = _bench_with({"division": "float64", "levels": {"exact": True, "by_bits": {}},
                        "concurrency": {"variant": "kd_w4_compile", "by_jobs": {
                            "8": {"images_per_s": 60000.0, "ready_s": 50.0}}}},
                       {1: 3834.0, 2: 7588.0, 4: 17222.0, 8: 18744.0})
    assert "set compile=True" in lease.compile_undecided(pays, "paper", None, tmp_path)
    assert lease.compile_undecided(pays, "gpu", None, tmp_path) is None  # short runs: never compile
    slower = {**pays, "compiled": {**pays["compiled"], "levels": {"exact": False}}}
    assert lease.compile_undecided(slower, "paper", None, tmp_path) is None
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")  # decided already: its records stand
    assert lease.compile_undecided(pays, "paper", None, tmp_path) is None

    started, logged = [], []
    monkeypatch.setattr(kdlib.executors, "execute_processes", lambda *a, **k: started.append(1))
    monkeypatch.setattr(kdlib.budget, "load_bench", lambda folder, kind: pays)
    lease.go(preset="paper", minutes=1, jobs=2, results_dir=tmp_path / "paper",
             repo_root=tmp_path / "repo", model="resnet8", bench="never",
             stash=tmp_path / "stash", data_root=fake_data_root, log=logged.append)
    assert not started and any("grid: not started: torch.compile pays" in m for m in logged)


@pytest.mark.parametrize("exact", [True, False])
def test_a_paper_lease_trains_its_compiled_grid_where_the_levels_are_exact(
        fake_data_root, tmp_path, monkeypatch, exact):
    """`paper` compiles (decided before its first run): its first lease trains at once, every
    planned run compiled, unless the benchmark found the compiled levels inexact there."""
    import kdlib.budget
    import kdlib.executors
    from kdlib import lease

    bench = _bench_with({"division": "float64", "levels": {"exact": exact, "by_bits": {}},
                         "concurrency": {"variant": "kd_w4_compile", "by_jobs": {
                             "8": {"images_per_s": 60000.0, "ready_s": 50.0}}}},
                        {1: 3834.0, 2: 7588.0, 4: 17222.0, 8: 18744.0})
    started, logged = [], []
    monkeypatch.setattr(kdlib.executors, "execute_processes",
                        lambda plan, **k: started.append(plan))
    monkeypatch.setattr(kdlib.budget, "load_bench", lambda folder, kind: bench)
    lease.go(preset="paper", minutes=1, jobs=2, results_dir=tmp_path / "paper",
             repo_root=tmp_path / "repo", model="resnet8", bench="never",
             stash=tmp_path / "stash", data_root=fake_data_root, log=logged.append)
    if exact:
        assert len(started) == 1 and started[0] and all(cfg.compile for cfg in started[0])
    else:
        assert not started
        assert any("grid: not started: `paper` compiles, but this device's benchmark found "
                   "them not exact" in m for m in logged)


@pytest.mark.parametrize("compiled, why", [
    ({"division": "float64", "levels": {"exact": False, "by_bits": {}}}, "found them not exact"),
    ({"division": "float64", "levels": {"error": "RuntimeError: no C++ compiler"}},
     "could not check them (RuntimeError: no C++ compiler)"),
    ({"division": "float64", "error": "RuntimeError: boom"}, "could not check them (RuntimeError"),
    ({"division": "float64", "levels": {"exact": True, "by_bits": {}}}, None),
    ({"division": "float32", "levels": {"exact": False}}, None),  # old code: each run checks
    (None, None),  # not measured here: each run checks for itself
])
def test_a_compiling_grid_does_not_start_where_the_benchmark_found_its_levels_not_exact(
        monkeypatch, tmp_path, compiled, why):
    from kdlib import lease, presets

    real = presets.build_config
    monkeypatch.setattr(presets, "build_config",
                        lambda *a, **k: real(*a, **k).replace(compile=True))
    bench = _bench_with(compiled, {1: 3834.0}) if compiled else {"variants": {}}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")  # records already: still refused
    reason = lease.compile_undecided(bench, "paper", None, tmp_path)
    if why is None:
        assert reason is None
    else:
        assert reason.startswith("`paper` compiles, but this device's benchmark " + why)
        assert "train only where the compiled quantizer levels are exact" in reason


@pytest.mark.parametrize("compiles", [True, False])
def test_a_lease_without_a_benchmark_decides_nothing_about_compile(monkeypatch, tmp_path,
                                                                   compiles):
    """No benchmark (none for this device, --bench never): nothing says compiling pays or that
    the compiled levels are inexact, so the grid trains (each compiled run checks itself)."""
    from kdlib import lease, presets

    real = presets.build_config
    monkeypatch.setattr(presets, "build_config",
                        lambda *a, **k: real(*a, **k).replace(compile=compiles))
    assert lease.compile_undecided(None, "paper", None, tmp_path) is None


def test_a_short_grid_s_first_benchmark_leaves_torch_compile_out():
    from kdlib import lease

    gpu, paper = lease.device_bench_args("gpu"), lease.device_bench_args("paper")
    assert "kd_w4_compile" in paper["variants"] and "kd_w4_compile" not in gpu["variants"]
    assert set(paper["variants"]) - set(gpu["variants"]) == {"kd_w4_compile"}
    assert gpu["windows"] == paper["windows"] == lease.DEVICE_BENCH["windows"]
    assert lease.device_bench_args("gpu", bench_args={"windows": 2}) == {"windows": 2}


def test_a_grid_may_compile_from_the_long_runs_epochs_on(monkeypatch):
    from kdlib import presets
    from kdlib.bench.compiled import LONG_RUN_EPOCHS, compile_may_pay

    assert compile_may_pay("paper") and not compile_may_pay("gpu")
    real = presets.build_config
    for epochs, may in ((LONG_RUN_EPOCHS - 1, False), (LONG_RUN_EPOCHS, True)):
        monkeypatch.setattr(presets, "build_config",
                            lambda *a, epochs=epochs, **k: real(*a, **k).replace(epochs=epochs))
        assert compile_may_pay("gpu") is may


def test_the_quantizers_are_compiled_as_training_runs_them():
    """Inputs that need gradients: the graph a compiled run's forward trains with."""
    seen = []

    def recording(fn):
        def run(x, w):
            seen.append((x.requires_grad, w.requires_grad))
            return fn(x, w)
        return run

    check_levels("cpu", bits=(4,), compile_fn=recording)
    assert seen == [(True, True)]


def test_one_inexact_quantizer_at_one_width_makes_the_levels_inexact():
    def activations_one_ulp_up_at_2_bits(fn):
        def run(x, w):
            a, q = fn(x, w)
            return (torch.nextafter(a, torch.full_like(a, 2.0)) if x.numel() == 4 else a), q
        return run

    result = check_levels("cpu", bits=(2, 4), compile_fn=activations_one_ulp_up_at_2_bits)
    assert not result["exact"]
    assert not result["by_bits"]["2"]["activation_exact"] and result["by_bits"]["2"]["weight_exact"]
    assert result["by_bits"]["4"]["activation_exact"] and result["by_bits"]["4"]["weight_exact"]


def test_other_exact_weight_levels_than_eager_s_are_counted_not_failed():
    def extremes_flipped(fn):  # +1 and -1 are both exact levels: a level unlike eager's
        def run(x, w):
            a, q = fn(x, w)
            return a, torch.where(q.abs() == 1, -q, q)
        return run

    result = check_levels("cpu", bits=(4,), compile_fn=extremes_flipped)
    assert result["exact"] and result["by_bits"]["4"]["weight_levels_unlike_eager"] > 0
    assert check_levels("cpu", bits=(4,), compile_fn=lambda fn: fn)["by_bits"]["4"][
        "weight_levels_unlike_eager"] == 0


@pytest.mark.parametrize("level, extreme", [(16.0, torch.amax), (-1.0, torch.amin)])
def test_a_weight_on_the_grid_but_past_its_end_levels_is_not_exact(level, extreme):
    """Level n + 1 (1 + 2/n) or -1 (-1 - 2/n) rebuilds from its integer, but no packed code
    holds it (4 bits: n = 15, codes 0 to 15)."""
    from kdlib.export.codes import dequantize

    outside = dequantize("dorefa", 4, torch.tensor([level]), None)

    def one_outside(fn):
        def run(x, w):
            a, q = fn(x, w)
            return a, torch.where(q == extreme(q), outside, q)
        return run

    result = check_levels("cpu", bits=(4,), compile_fn=one_outside)
    assert not result["exact"] and not result["by_bits"]["4"]["weight_exact"]


def test_a_compile_verdict_without_a_usable_measurement_says_why_and_does_not_pay():
    from kdlib.bench.compiled import compile_verdict

    eager = {1: 3834.0, 2: 7588.0, 4: 17222.0, 8: 18744.0}
    failed = compile_verdict(_bench_with({"error": "RuntimeError: no GPU"}, eager), 480.0)
    assert failed == {"pays": False, "why": "the compiled part failed: RuntimeError: no GPU"}
    side = {"by_jobs": {"8": {"images_per_s": 60000.0}}}  # no ready_s, no one-process warm-up
    unknown = {k: v for k, v in _bench_with({"division": "float64", "levels": {"exact": True},
                                             "concurrency": side}, eager).items()
               if k != "variants"}
    verdict = compile_verdict(unknown, 480.0)  # the compile may take the whole lease
    assert not verdict["pays"] and "after 480 s to compile" in verdict["why"]


def test_the_compile_verdict_weighs_the_count_of_processes_a_grid_would_run():
    from kdlib.bench.compiled import compile_verdict

    eager = {1: 3834.0, 2: 7588.0, 4: 17222.0, 8: 18744.0}
    side = {"by_jobs": {"4": {"images_per_s": 30000.0, "ready_s": 50.0},  # 8 adds under 10%
                        "8": {"images_per_s": 31000.0, "ready_s": 90.0}}}
    verdict = compile_verdict(_bench_with({"division": "float64", "levels": {"exact": True},
                                           "concurrency": side}, eager), 480.0)
    assert verdict["pays"] and "4 compiled processes 30,000 img/s after 50 s" in verdict["why"]


def test_compiling_as_fast_as_eager_does_not_pay():
    from kdlib.bench.compiled import compile_verdict

    side = {"by_jobs": {"1": {"images_per_s": 20000.0, "ready_s": 240.0}}}
    tie = compile_verdict(_bench_with({"division": "float64", "levels": {"exact": True},
                                       "concurrency": side}, {1: 10000.0}), 480.0)
    assert "4.8 M images" in tie["why"] and "4.8 M" in tie["why"].split(";")[1]
    assert not tie["pays"]  # the same images a lease: not worth a switch in the run id


@pytest.mark.parametrize("rates, counts", [
    ({1: 100.0, 2: 200.0, 4: 400.0, 8: 440.0}, [4, 8]),  # the eager step's worth-it count and 8
    ({1: 100.0, 2: 200.0, 4: 400.0, 8: 800.0, 12: 1000.0}, [8]),  # 12 worth it: still at most 8
])
def test_the_compiled_part_runs_at_most_eight_processes_compiling_at_once(rates, counts,
                                                                          monkeypatch):
    import kdlib.bench.compiled
    from kdlib.bench import run

    asked = []
    monkeypatch.setattr(kdlib.bench.compiled, "measure_compiled",
                        lambda ctx, jobs, **_: asked.append(list(jobs)) or {})
    concurrency = {"seconds": 3.0, "by_jobs": {str(k): {"images_per_s": r}
                                               for k, r in rates.items()}}
    run.compiled_part({"concurrency": concurrency}, None, preset="gpu", model="resnet20",
                      log=print)
    assert asked == [counts]


def test_a_first_benchmark_measures_the_counts_of_processes_it_is_given():
    """--bench-args' own counts of processes side by side stand on a GPU too."""
    from kdlib import lease

    args = lease.device_bench_args("gpu", bench_args={"concurrency": [1, 2]}, device="cuda")
    assert args["concurrency"] == [1, 2]
    assert all(k <= lease.decisions.FIRST_COUNTS_MAX
               for k in lease.device_bench_args("gpu", device="cuda")["concurrency"])


def test_a_preset_that_already_compiles_has_no_compile_decision_left_to_measure():
    """`paper` compiles: a `gpu` lease's spare time goes to no compiled part for it."""
    from kdlib import lease

    assert lease.later_compile_parts({"compiled": {"division": "an earlier one"}}, "cuda",
                                     "gpu") == []
