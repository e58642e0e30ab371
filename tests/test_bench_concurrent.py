"""k training processes side by side (the GPU benchmark's question "do runs at once pay?"),
run here on the CPU with tiny steps; and the choice of how many to run at once."""
import json

import pytest
import torch

from kdlib.bench.concurrent import best_jobs, concurrent_throughput, worth_running
from kdlib.bench.variants import make_context


@pytest.mark.slow
def test_k_processes_each_time_the_real_step_over_one_window():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 100, (64,), generator=gen)
    result = concurrent_throughput(images, labels, jobs=(1, 2), preset="smoke", model="resnet8",
                                   seconds=0.2, warmup=1)
    assert set(result["by_jobs"]) == {"1", "2"} and result["variant"] == "kd_w4"
    for k, entry in result["by_jobs"].items():
        assert len(entry["per_process"]) == int(k) and all(r > 0 for r in entry["per_process"])
        assert entry["images_per_s"] == pytest.approx(sum(entry["per_process"]))
        assert entry["ready_s"] > 0  # the slowest process's build and warm-up (a compile)
        assert "cudagraph_skips" not in entry  # an eager step: nothing to say about graphs
    assert "best_jobs" not in result and worth_running(result) in (1, 2)  # derived when read


def test_a_failing_worker_is_reported_not_waited_for():
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="unknown_model|resnet_nope"):
        concurrent_throughput(images, labels, jobs=(2,), preset="smoke", model="resnet_nope",
                              seconds=0.1, timeout=120)


@pytest.mark.parametrize("rates, expected", [
    ({"1": 100.0, "2": 190.0, "4": 200.0}, 2),  # 4 adds 5%: not worth a job
    ({"1": 100.0, "2": 105.0, "4": 300.0}, 4),  # 2 adds little, but 4 is far ahead of 1
    ({"1": 100.0, "2": 90.0}, 1),
    ({"1": 100.0}, 1),
    # the H200 (results/bench/NVIDIA_H200.json): 8 adds 8.8% over 4, 12 adds 10.3% with
    # three times the processes (1.1^log2 3 = 16% needed)
    ({"1": 3834.0, "2": 7588.0, "4": 17222.0, "8": 18744.0, "12": 18989.0}, 4),
    ({"1": 100.0, "2": 200.0, "4": 400.0, "8": 800.0, "12": 1000.0}, 12),  # +25% for 1.5x: worth it
    ({"1": 100.0, "2": 1.1 * 100.0}, 2),  # exactly 10% more: "at least" counts it
])
def test_best_jobs_adds_a_process_only_for_ten_percent_more(rates, expected):
    assert best_jobs({k: {"images_per_s": v} for k, v in rates.items()}) == expected


def test_process_counts_follow_the_hosts_cores():
    from kdlib.bench.run import device_concurrency

    assert device_concurrency(16) == (1, 2, 4, 8, 12)  # the H200's host: 2 cores kept
    assert device_concurrency(6) == (1, 2, 4)
    assert device_concurrency(2) == device_concurrency(None) == (1,)


def _entries(rates: dict) -> dict:
    return {str(k): {"images_per_s": float(r), "per_process": [r / k] * k}
            for k, r in rates.items()}


def test_an_older_gpu_benchmark_gets_the_process_counts_it_lacks(monkeypatch):
    """A benchmark that measured 1, 2 and 4 processes on a 16-core host: the next lease measures
    8 and 12, merges them (dated) and chooses again; where that fails, it is noted and not
    tried at every lease after."""
    from types import SimpleNamespace

    from kdlib import lease
    from kdlib.bench import concurrent, run

    existing = {"machine": {"usable_cores": 16}, "profile": {"top": [], "grouped_weights": True},
                "grouped": {"check": {"exact": True}},
                "concurrency": {"variant": "kd_w4", "seconds": 10.0, "best_jobs": 4,
                                "by_jobs": _entries({1: 100, 2: 200, 4: 400})}}
    assert lease.missing_parts(existing, "cuda") == {"concurrency": [8, 12], "compiled": True,
                                                     "graphs": True}
    # the compiled part decides whether long runs compile: a `paper` lease measures it, a
    # `gpu` lease (2- to 15-epoch runs, which would compile again each) trains instead
    assert "compiled" in lease.missing_parts(existing, "cuda", "paper")
    assert "compiled" not in lease.missing_parts(existing, "cuda", "gpu")
    assert lease.missing_parts(existing, "cpu") == {}  # a CPU runs one run per core already
    asked = []

    def measured(images, labels, *, jobs, seconds, **_):
        asked.append((list(jobs), seconds))
        return {"variant": "kd_w4", "seconds": seconds, "by_jobs": _entries({8: 800, 12: 830})}

    monkeypatch.setattr(concurrent, "concurrent_throughput", measured)
    ctx = SimpleNamespace(images=torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                          labels=torch.zeros(4, dtype=torch.int64), device=torch.device("cuda"))
    merged = run.add_concurrency(existing, [8, 12], ctx, preset="gpu", model="resnet20", log=print)
    assert asked == [([8, 12], 10.0)]
    assert list(merged["by_jobs"]) == ["1", "2", "4", "8", "12"]
    assert worth_running(merged) == 8  # 12 adds 3.75%, under the 5.7% that 1.5x must add
    assert "best_jobs" not in merged  # the old file's stored count is not carried on
    assert "date" in merged["by_jobs"]["8"] and "date" not in merged["by_jobs"]["4"]
    measured_now = {"division": "float64"}
    existing["graphs"] = {"check": {"error": "RuntimeError: x"}}  # failed is an answer: not again
    assert lease.missing_parts({**existing, "concurrency": merged, "compiled": measured_now},
                               "cuda") == {}
    # compiled levels measured before compiled graphs divided in float64 (the H200's first,
    # inexact at 4, 8 and 16 bits): measured again
    assert lease.missing_parts({**existing, "concurrency": merged, "compiled": {"levels": {}}},
                               "cuda") == {"compiled": True}

    def failing(*_, **__):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(concurrent, "concurrent_throughput", failing)
    kept = run.add_concurrency(existing, [8, 12], ctx, preset="gpu", model="resnet20", log=print)
    assert kept["by_jobs"] == existing["concurrency"]["by_jobs"] and worth_running(kept) == 4
    assert "out of memory" in kept["added_error"]
    assert "concurrency" not in lease.missing_parts({**existing, "concurrency": kept}, "cuda")


def test_a_benchmark_from_before_grouped_weights_gets_that_part_and_a_new_profile():
    from kdlib import lease

    older = {"machine": {"usable_cores": 2}, "profile": {"top": [], "bound": "host"}}
    assert lease.missing_parts(older, "cpu") == {"profile": True, "grouped": True}
    done = {**older, "profile": {**older["profile"], "grouped_weights": True},
            "grouped": {"error": "RuntimeError: x"}}  # failed is an answer too: not again
    assert lease.missing_parts(done, "cpu") == {}
    assert lease.missing_parts({**done, "profile": {"error": "RuntimeError: y"}}, "cpu") == {}


def test_processes_that_do_not_answer_in_time_are_killed_not_waited_for():
    import time

    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.int64)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no result within 0.5 s"):
        concurrent_throughput(images, labels, jobs=(2,), preset="smoke", model="resnet8",
                              seconds=600.0, timeout=0.5)  # they would time for ten minutes
    assert time.monotonic() - started < 60  # not 2 x 30 s of joins, nor the ten minutes


def test_completing_a_benchmark_writes_each_part_as_it_comes(fake_data_root, tmp_path, monkeypatch):
    """A lease cut short in the compiled part (minutes) keeps the short parts measured before."""
    import json

    from kdlib import lease
    from kdlib.bench import run

    order = []

    def part(name, value):
        def measure(*_, **__):
            order.append(name)
            return value
        return measure

    def interrupted(*_, **__):
        order.append("compiled")
        raise KeyboardInterrupt  # what `timeout` does to `go`

    monkeypatch.setattr(run, "grouped_part", part("grouped", {"check": {"exact": True}}))
    monkeypatch.setattr(run, "profile_or_error", part("profile", {"grouped_weights": True}))
    presets = []  # measured at the benchmark's own preset, comparable with its first timings
    monkeypatch.setattr(run, "graphs_part", lambda *_, preset, **__: presets.append(preset)
                        or part("graphs", {"check": {"equal": True}})())
    monkeypatch.setattr(run, "compiled_part", interrupted)
    older = {"machine": {"host": "h", "gpu": None}, "settings": {"preset": "smoke"}}
    monkeypatch.setattr(lease.decisions, "missing_parts", lambda *_: {
        "compiled": True, "graphs": True, "grouped": True, "profile": True})
    with pytest.raises(KeyboardInterrupt):  # a lease of another grid completes it
        lease.complete_bench(older, tmp_path, fake_data_root, "cpu", preset="gpu",
                             model="resnet8", log=print)
    assert order == ["grouped", "profile", "graphs", "compiled"]  # the short parts first
    assert presets == ["smoke"]
    written = json.loads((tmp_path / "h.json").read_text())
    assert written["grouped"] == {"check": {"exact": True}} and "compiled" not in written
    assert written["graphs"] == {"check": {"equal": True}}


def test_a_benchmark_part_that_fails_is_recorded_and_the_rest_goes_on(fake_data_root, tmp_path,
                                                                      monkeypatch):
    """`go` trains after completing its benchmark: a part that raises (not an interruption)
    must not stop the parts after it, nor the grid. Recorded as failed, it is not measured
    again; a failed count of processes leaves the counts measured before."""
    import json

    from kdlib import lease
    from kdlib.bench import run
    from kdlib.bench.graphs import graphs_verdict
    from kdlib.bench.compiled import compile_verdict
    from kdlib.quant.ste import COMPILED_DIVISION

    def failing(*_, **__):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(run, "grouped_part", failing)
    monkeypatch.setattr(run, "profile_or_error", lambda *_, **__: {"grouped_weights": True})
    monkeypatch.setattr(run, "graphs_part", failing)
    monkeypatch.setattr(run, "add_concurrency", failing)
    monkeypatch.setattr(run, "compiled_part", failing)
    counts = {"by_jobs": {"1": {"images_per_s": 100.0}}}
    older = {"machine": {"host": "h", "gpu": None}, "settings": {"preset": "smoke"},
             "concurrency": counts}
    monkeypatch.setattr(lease.decisions, "missing_parts", lambda *_: {
        "compiled": True, "graphs": True, "grouped": True, "profile": True, "concurrency": [8]})
    logged = []
    lease.complete_bench(older, tmp_path, fake_data_root, "cpu", preset="smoke", model="resnet8",
                         log=logged.append)
    written = json.loads((tmp_path / "h.json").read_text())
    assert written["profile"] == {"grouped_weights": True}  # measured after a failed part
    assert written["concurrency"] == counts
    for name in ("grouped", "graphs", "compiled"):
        assert "no kernel image" in written[name]["error"], name
        assert any(f"the {name} part failed" in line for line in logged)
    assert written["compiled"]["division"] == COMPILED_DIVISION  # not measured again
    assert not graphs_verdict(written)["use"] and not compile_verdict(written, 480)["pays"]
    assert lease.groups_weights(written)[0] is False  # its check never ran: per layer
    monkeypatch.undo()
    missing = lease.missing_parts(written, "cpu", "paper")
    assert "grouped" not in missing and "compiled" not in missing


def test_a_lease_leaves_the_parts_its_benchmark_allowance_cannot_hold_for_the_next(
        fake_data_root, tmp_path, monkeypatch):
    """A part whose estimate exceeds what is left of the allowance waits for a later lease
    (said in the log); the parts after it that fit still go, and the grouped check (this
    lease's grid decides on it) and the compiled part (a preset needs it before its first run)
    never wait. The next lease measures what waited. The parts take the seconds of a clock of
    the test's own."""
    import json
    from types import SimpleNamespace

    from kdlib import lease
    from kdlib.bench import run
    from kdlib.lease import decisions

    now = [0.0]
    monkeypatch.setattr(decisions, "time", SimpleNamespace(monotonic=lambda: now[0]))
    order = []
    takes = {"grouped": 20, "profile": 15, "graphs": 120, "concurrency": 48, "compiled": 150}

    def part(name, value):
        def measure(*_, **__):
            order.append(name)
            now[0] += takes[name]
            return value
        return measure

    monkeypatch.setattr(run, "grouped_part", part("grouped", {"check": {"exact": True}}))
    monkeypatch.setattr(run, "profile_or_error", part("profile", {"grouped_weights": True}))
    monkeypatch.setattr(run, "graphs_part", part("graphs", {"check": {"equal": True}}))
    monkeypatch.setattr(run, "add_concurrency", part("concurrency", {"by_jobs": {"8": {}}}))
    monkeypatch.setattr(run, "compiled_part", part("compiled", {"division": "float64"}))

    def missing(result, *_):
        out = {k: True for k in ("grouped", "profile", "graphs", "compiled") if k not in result}
        return {**out, **({} if "8" in result["concurrency"]["by_jobs"]
                          else {"concurrency": [8, 12]})}

    monkeypatch.setattr(decisions, "missing_parts", missing)
    first = {"machine": {"host": "h", "gpu": None}, "settings": {"preset": "smoke"},
             "concurrency": {"by_jobs": {"1": {}, "2": {}, "4": {}}}}
    logged = []
    lease.complete_bench(first, tmp_path, fake_data_root, "cpu", preset="smoke",
                         model="resnet8", seconds=60.0, log=logged.append)
    assert order == ["grouped", "profile", "compiled"]  # 20 + 15 s; then 25 s were left
    assert "bench: the graphs part (about 120 s) waits for a later lease: 25 s of the " \
           "benchmark's allowance left" in logged
    assert any(line.startswith("bench: the concurrency part (about 48 s) waits")
               for line in logged)
    written = json.loads((tmp_path / "h.json").read_text())
    assert set(missing(written)) == {"graphs", "concurrency"}
    order.clear()
    lease.complete_bench(written, tmp_path, fake_data_root, "cpu", preset="smoke",
                         model="resnet8", seconds=lease.BENCH_ALLOWANCE_S, log=logged.append)
    assert order == ["graphs", "concurrency"]  # the next lease: 168 s of its 180
    assert missing(json.loads((tmp_path / "h.json").read_text())) == {}
    order.clear()
    lease.complete_bench(first, tmp_path, fake_data_root, "cpu", preset="smoke",
                         model="resnet8", seconds=-10.0, log=logged.append)
    assert order == ["grouped", "compiled"]  # first timings that overran the allowance


def test_a_new_gpu_benchmark_times_the_variants_and_four_processes_then_parts_that_fit(
        fake_data_root, tmp_path, monkeypatch):
    """`go`'s first benchmark on a GPU: the variants and 1, 2, 4 processes side by side (what
    the grid's estimates need), written at once; then the later parts, given what is left of
    the allowance. No GPU is touched: the measuring is replaced."""
    import sys
    from types import SimpleNamespace

    from kdlib.bench import run
    from kdlib.lease import device as lease_device

    measure = sys.modules["kdlib.bench.measure"]  # kdlib.bench.measure is also a function
    asked, completed = {}, {}
    now = [1000.0]
    monkeypatch.setattr(lease_device, "time", SimpleNamespace(monotonic=lambda: now[0]))

    def benchmark(images, labels, **kwargs):
        asked.update(kwargs)
        now[0] += 100.0  # the first timings took 100 s of the allowance
        return {"machine": {"host": "h", "gpu": "NVIDIA H100 80GB HBM3", "usable_cores": 16},
                "settings": {"preset": "gpu"},
                "concurrency": {"by_jobs": {str(k): {} for k in kwargs["concurrency"]}}}

    def complete(result, bench_dir, data_root, device, **kwargs):
        completed.update(kwargs, result=result)
        return bench_dir / "h.json"

    monkeypatch.setattr(run, "run_benchmark", benchmark)
    monkeypatch.setattr(measure, "usable_cores", lambda: 16)
    monkeypatch.setattr(lease_device, "complete_bench", complete)
    logged = []
    path = lease_device._bench_device("auto", tmp_path, "NVIDIA_H100", "cuda", fake_data_root,
                                      preset="gpu", model="resnet20", bench_args=None,
                                      started=0.0, log=logged.append)
    assert asked["later_parts"] is False and asked["concurrency"] == [1, 2, 4]
    assert path.exists() and any(line.startswith("benchmark written") for line in logged)
    assert set(lease_device.missing_parts(completed["result"], "cuda", "gpu")) == \
        {"grouped", "profile", "graphs", "concurrency"}
    assert completed["seconds"] == lease_device.BENCH_ALLOWANCE_S - 100.0 == 80.0


def test_go_benchmarks_anew_when_told_to_and_falls_back_to_timing_the_steps_alone(
        fake_data_root, tmp_path, monkeypatch):
    """`--bench always` measures anew though results/bench holds this device's benchmark; a
    full benchmark that fails leaves a minimal one of fit()'s steps, then its later parts (the
    grid needs estimates more than the rest: a lease without them trains blind)."""
    import kdlib.budget
    from kdlib import lease
    from kdlib.bench import run
    from kdlib.lease import device as lease_device

    asked, completed, logged = [], [], []

    def benchmark(images, labels, **kwargs):
        asked.append(kwargs)
        if len(asked) == 1:
            raise RuntimeError("no kernel image")
        return {"machine": {"host": "h", "cpu_model": "c"}, "settings": {"preset": "smoke"}}

    monkeypatch.setattr(run, "run_benchmark", benchmark)
    monkeypatch.setattr(lease_device, "complete_bench",
                        lambda result, *a, **k: completed.append(result) or tmp_path / "h-c.json")
    whole = {"machine": {}, "profile": {"grouped_weights": True}, "grouped": {}}
    assert lease.missing_parts(whole, "cpu", "smoke") == {}
    monkeypatch.setattr(kdlib.budget, "load_bench", lambda folder, kind: whole)
    kwargs = dict(preset="smoke", model="resnet8", bench_args=None, started=0.0,
                  log=logged.append)
    for bench in ("auto", "never"):  # nothing to measure, or told not to: no file written
        assert lease_device._bench_device(bench, tmp_path, "cpu:c", "cpu", fake_data_root,
                                          **kwargs) is None
    assert asked == completed == [] and not list(tmp_path.iterdir())
    path = lease_device._bench_device("always", tmp_path, "cpu:c", "cpu", fake_data_root,
                                      **kwargs)
    assert path == tmp_path / "h-c.json" and json.loads(path.read_text())["machine"]["host"] == "h"
    assert len(asked) == 2 and {k: asked[1][k] for k in lease.FALLBACK_BENCH} == \
        lease.FALLBACK_BENCH
    assert "benchmark failed (RuntimeError: no kernel image)" in logged[0]
    assert completed == [json.loads(path.read_text())]  # its later parts, as far as they fit


def test_k_processes_sum_their_rates_and_report_the_slowest_start(monkeypatch):
    """The parent's bookkeeping, with threads standing in for the spawned processes."""
    import queue
    import threading
    from types import SimpleNamespace

    import kdlib.bench.concurrent as concurrent

    class Process(threading.Thread):
        def __init__(self, target, args):
            super().__init__(target=target, args=args, daemon=True)

        def kill(self):
            pass

    answers = iter([(100.0, 3.0), (300.0, 7.0), (200.0, 5.0)])  # (images/s, ready_s) each

    def worker(*args):
        rate, ready = next(answers)
        args[-1].put(("ok", rate, {"ready_s": ready}))

    context = SimpleNamespace(Barrier=threading.Barrier, Queue=queue.Queue, Process=Process)
    monkeypatch.setattr(concurrent, "torch_mp", SimpleNamespace(get_context=lambda kind: context))
    monkeypatch.setattr(concurrent, "_worker", worker)
    images, labels = torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64)
    entry = concurrent_throughput(images, labels, jobs=(3,), seconds=0.1)["by_jobs"]["3"]
    assert sorted(entry["per_process"]) == [100.0, 200.0, 300.0]
    assert entry["images_per_s"] == 600.0  # all processes' images together
    assert entry["ready_s"] == 7.0  # the slowest one's build and warm-up


def test_a_process_times_only_the_steps_after_its_warm_up_and_the_barrier(monkeypatch):
    """On a fake clock that advances 0.5 s a step: batch 4 is 8 images/s, warm-up or not."""
    import queue
    from types import SimpleNamespace

    import kdlib.bench.concurrent as concurrent
    import kdlib.bench.variants as variants
    from kdlib.bench.measure import Runner

    clock, events = {"t": 0.0}, []

    def step():
        clock["t"] += 0.5
        events.append("step")

    runner = Runner(step=step, batch_size=4)
    monkeypatch.setattr(variants, "make_context",
                        lambda *a, **kw: SimpleNamespace(device=torch.device("cpu")))
    monkeypatch.setattr(variants, "BY_NAME", {"fake": SimpleNamespace(build=lambda ctx: runner)})
    monkeypatch.setattr(concurrent, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # a worker's, not this process's
    monkeypatch.setattr(concurrent, "sync", lambda device: events.append("sync"))
    barrier = SimpleNamespace(wait=lambda: events.append("barrier"), abort=lambda: None)
    out: queue.Queue = queue.Queue()
    concurrent._worker("fake", None, None, "smoke", "resnet8", "cpu", 3, 2.0,
                       barrier, out)
    status, rate, notes = out.get_nowait()
    assert status == "ok" and rate == pytest.approx(4 / 0.5)
    assert notes["ready_s"] == pytest.approx(3 * 0.5)  # the three warm-up steps
    # the warm-up's device work is done before the processes start timing together
    assert events[:5] == ["step", "step", "step", "sync", "barrier"]


def test_processes_side_by_side_draw_from_the_first_concurrency_images(monkeypatch):
    """Each spawned process gets a copy of its images: only the first CONCURRENCY_IMAGES go."""
    from kdlib.bench import concurrent

    seen = []
    monkeypatch.setattr(concurrent, "CONCURRENCY_IMAGES", 8)
    monkeypatch.setattr(concurrent, "concurrent_throughput",
                        lambda images, labels, **kw: seen.append((len(images), len(labels))) or {})
    ctx = make_context(torch.zeros(48, 3, 32, 32, dtype=torch.uint8), torch.arange(48) % 100,
                       batch_size=4, device="cpu")
    concurrent.processes_or_error(ctx, "kd_w4", (1,), seconds=1.0, preset="quick",
                                  model="resnet20", what="test", log=lambda m: None)
    assert seen == [(8, 8)]
