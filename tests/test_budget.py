"""A budgeted grid: time estimates from finished runs or the benchmark, runs started only when
they fit, the rest left for the next call; and the `processes` executor (several runs at once
on one machine), which must produce the serial executor's records.

Smoke preset on real data: ResNet-8, 200 training images, one thread per run.
"""
import json
import time
from pathlib import Path

import pytest
import torch

from kdlib import cli, experiments
from kdlib.budget import (START_ALLOWANCE_S, Admission, Budget, Deadline, RunTimer, leave_one_out,
                          load_bench, training_images)
from kdlib.results import checkpoint_path
from kdlib.device import cpu_model, device_kind, record_device_kind
from kdlib.executors import execute_processes
from kdlib.presets import build_config
from kdlib.run_order import (dependency_schedule, epochs_left_in, resume_first, start_order,
                             unblocking_first, work_left_in)
from kdlib.results import TIMING_FIELDS, load_records

TINY = {"train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 50}
GRID = dict(preset="smoke", model="resnet8", seeds=[0], chain=[32, 4, 1],
            chain_methods=["ta_chain", "progressive"], methods=["finetune", "direct_kd"],
            overrides=TINY)


def comparable(record: dict) -> dict:
    return {"run_id": record["run_id"], "config": record["config"], "metrics": record["metrics"],
            "same_run_as": record.get("same_run_as"),
            "history": [{k: v for k, v in row.items() if k not in TIMING_FIELDS}
                        for row in record["history"]]}


def student(method="direct_kd", bits=4, epochs=3, **extra):
    teacher = build_config("smoke", "resnet8", teacher=True, overrides=TINY)
    return build_config("smoke", "resnet8", overrides={
        **TINY, "method": method, "w_bits": bits, "a_bits": bits, "epochs": epochs,
        "teacher_id": teacher.run_id() if method == "direct_kd" else None,
        "init_id": None, **extra})


def record_of(cfg, epoch_seconds, call_seconds, device="cpu", gpu=None):
    return {"run_id": cfg.run_id(), "config": cfg.to_dict(), "device": device, "gpu": gpu,
            "history": [{"seconds": s} for s in epoch_seconds], "call_seconds": call_seconds}


def bench_file(rates: dict, gpu=None, model="resnet8", date="2026-12-01T00:00:00+00:00", cpu=None):
    return {"date": date,
            "machine": {"gpu": gpu, "device": "cuda" if gpu else "cpu", "cpu_model": cpu},
            "settings": {"model": model},
            "variants": {name: {"images_per_s": r} for name, r in rates.items()}}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_runs_with_weights_quantized_together_and_layer_by_layer_time_each_other_apart():
    """Grouped weights change a step's speed, not its bits (fewer operators: 652 against 1,136
    a KD step, on the CPU): a grouped run is timed by grouped runs, else by the benchmark's
    grouped step, and a record older than the switch counts as layer by layer."""
    grouped, per_layer = student(epochs=2), student(epochs=2, group_weights=False)
    assert grouped.group_weights and grouped.run_id() == per_layer.run_id()  # the same bits
    old = record_of(student(epochs=2, bits=2), [10.0, 10.0], call_seconds=20.0)
    del old["config"]["group_weights"]  # recorded before the switch existed
    bench = bench_file({"kd_w4": 100.0, "w4a4": 300.0})
    bench["grouped"] = {"steps": {"kd_w4": {"images_per_s": 200.0},
                                  "kd_w4_per_layer": {"images_per_s": 100.0}}}
    timer = RunTimer("cpu", bench=bench)  # records and benchmark of no named processor
    timer.add(old)
    assert timer.estimate(per_layer).epoch_s == pytest.approx(10.0)
    from_bench = timer.estimate(grouped)
    assert from_bench.runs == 0 and "200 img/s" in from_bench.source
    timer.add(record_of(student(epochs=2, bits=1), [6.0, 6.0], call_seconds=12.0))
    assert timer.estimate(grouped).epoch_s == pytest.approx(6.0)
    assert timer.estimate(per_layer).epoch_s == pytest.approx(10.0)
    del bench["grouped"]  # an older benchmark: its KD step, whichever way it ran
    assert "100 img/s" in RunTimer("cpu", bench=bench).estimate(grouped).source


def test_a_run_trains_on_its_subset_or_on_all_but_its_validation_images():
    assert training_images(8000, 2500) == 8000
    assert training_images(None, 5000) == 45_000
    assert training_images(float("nan"), 2500) == 47_500  # a records table's missing value


def test_estimate_takes_the_slowest_typical_epoch_and_the_typical_overhead_of_its_kind():
    timer = RunTimer("cpu")
    # one epoch slowed by something beside it: the run's median epoch (10 s) stands for it
    timer.add(record_of(student(epochs=3), [10.0, 30.0, 9.0], call_seconds=55.0))  # 6 s more
    timer.add(record_of(student(epochs=2, bits=1), [11.0, 12.0], call_seconds=24.0))  # 1 s more
    timer.add(record_of(student(epochs=1, bits=2), [8.0], call_seconds=10.0))  # 2 s more
    estimate = timer.estimate(student(epochs=5))
    assert estimate.epoch_s == pytest.approx(11.5) and estimate.extra_s == pytest.approx(2.0)
    assert estimate.seconds == pytest.approx(1.2 * (5 * 11.5 + 2.0))
    assert estimate.runs == 3 and "3 finished run(s)" in estimate.source
    assert timer.estimate(student(epochs=5), epochs_done=4).seconds == \
        pytest.approx(1.2 * (11.5 + 2.0))


def test_a_resumed_runs_record_adds_no_negative_overhead():
    """A resumed run's record holds all its epochs but times only its last call: what it spent
    besides its epochs counts as nothing, not as the epochs before that call taken off."""
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=3), [10.0, 10.0, 10.0], call_seconds=12.0))
    estimate = timer.estimate(student(epochs=3))
    assert estimate.extra_s == 0.0 and estimate.seconds == pytest.approx(1.2 * 30.0)


def test_a_record_without_epochs_is_not_a_timing():
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=1), [], call_seconds=5.0))  # no history to time from
    assert timer.estimate(student()).seconds is None
    timer.add(record_of(student(epochs=1, bits=1), [10.0], call_seconds=10.0))
    assert timer.estimate(student(epochs=1)).seconds == pytest.approx(12.0)


@pytest.mark.parametrize("folder", ["gpu", "quick", "quick_squeezenet"])
def test_the_committed_runs_estimated_from_one_another_err_long(folder):
    """Each committed run timed by the others, as a budget would time it: typically long (the
    1.2 margin over typical epochs), and short for at most 1 run in 10 (a budget's deadline
    stops those at an epoch boundary, but a run it admits should finish). On the records of
    2026-12-05 the rule is short for one run, one of `quick`'s."""
    results = Path(__file__).resolve().parents[1] / "results"
    ratios = sorted(leave_one_out(load_records(results / folder), results / "bench"))
    assert len(ratios) >= 20
    assert ratios[len(ratios) // 2] >= 1.1, ratios
    assert sum(r < 1 for r in ratios) <= len(ratios) // 10, ratios


@pytest.mark.parametrize("other", [
    dict(record=dict(device="cuda:0", gpu="NVIDIA H200")),  # another device
    dict(cfg=dict(method="finetune")),  # no teacher: a cheaper step
    dict(cfg=dict(batch_size=25)),
    dict(cfg=dict(train_size=150)),
    dict(cfg=dict(val_size=150)),  # a longer validation pass each epoch
    dict(cfg=dict(channels_last=True)),
    dict(cfg=dict(precision="bf16")),
])
def test_runs_of_another_kind_do_not_time_this_one(other):
    timer = RunTimer("cpu")
    cfg = student(**other.get("cfg", {}))
    timer.add(record_of(cfg, [10.0], 12.0, **other.get("record", {})))
    assert timer.estimate(student()).seconds is None


def test_an_alias_record_is_not_a_timing():
    timer = RunTimer("cpu")
    timer.add({**record_of(student(), [10.0], 12.0), "same_run_as": "other"})
    assert timer.records == []


def test_without_records_the_benchmark_of_this_device_gives_the_estimate(tmp_path):
    (tmp_path / "cpu.json").write_text(json.dumps(bench_file({"kd_w4": 100.0, "w4a4": 200.0})))
    (tmp_path / "gpu.json").write_text(json.dumps(bench_file({"kd_w4": 9e9}, gpu="NVIDIA H200")))
    timer = RunTimer("cpu", bench=load_bench(tmp_path, "cpu"))
    start = START_ALLOWANCE_S
    assert timer.estimate(student(epochs=2)).seconds == pytest.approx(
        1.2 * (2 * 200 / 100.0 * 1.25 + start))
    assert timer.estimate(student("finetune", epochs=2)).seconds == pytest.approx(
        1.2 * (2 * 200 / 200.0 * 1.25 + start))
    on_gpu = RunTimer("cuda:NVIDIA H200", bench=load_bench(tmp_path, "cuda:NVIDIA H200"))
    assert on_gpu.estimate(student()).seconds == pytest.approx(1.2 * start, rel=1e-6)
    assert load_bench(tmp_path, "cuda:NVIDIA H100") is None


def test_a_benchmark_of_another_device_or_model_gives_no_estimate():
    """load_bench picks a device's newest benchmark whatever its model: a ResNet-20 benchmark
    does not time a ResNet-8 run, nor a GPU's a run on the CPU."""
    assert RunTimer("cpu", bench=bench_file({"kd_w4": 100.0})).estimate(student()).seconds
    other_model = bench_file({"kd_w4": 100.0}, model="resnet20")
    assert RunTimer("cpu", bench=other_model).estimate(student()).seconds is None
    on_gpu = bench_file({"kd_w4": 100.0}, gpu="NVIDIA H200")
    assert RunTimer("cpu", bench=on_gpu).estimate(student()).seconds is None


def test_runs_side_by_side_are_estimated_at_their_per_process_rate():
    bench = bench_file({"kd_w4": 100.0})
    bench["concurrency"] = {"by_jobs": {"1": {"images_per_s": 100.0},
                                        "2": {"images_per_s": 160.0},  # 80 a process
                                        "4": {"images_per_s": 200.0}}}  # 50 a process

    def seconds(jobs, bench=bench):
        return RunTimer("cpu", bench=bench, jobs=jobs).estimate(student(epochs=2)).seconds

    def at(rate):
        return 1.2 * (2 * 200 / rate * 1.25 + START_ALLOWANCE_S)

    assert seconds(1) == pytest.approx(at(100.0))
    assert seconds(2) == pytest.approx(at(80.0))
    assert seconds(3) == pytest.approx(at(50.0))  # the next measured count up: 4
    assert seconds(8) == pytest.approx(at(25.0))  # beyond what was measured: the device is full
    no_concurrency = bench_file({"kd_w4": 100.0})
    assert seconds(2, no_concurrency) == pytest.approx(at(50.0))


def test_epochs_timed_beside_another_number_of_runs_are_scaled_to_this_one():
    """Lease 3 trained 12 at a time, the next trains 4: its epochs were 100/(830/12) = 1.45×
    as slow as at 4 (per process 69 vs 100 img/s, by the benchmark's processes side by side)."""
    bench = bench_file({"kd_w4": 100.0})
    bench["concurrency"] = {"by_jobs": {"1": {"images_per_s": 100.0},
                                        "4": {"images_per_s": 400.0},  # 100 a process
                                        "12": {"images_per_s": 830.0}}}  # 69 a process
    at_12 = {**record_of(student(epochs=2), [14.5, 14.0], call_seconds=30.0), "side_by_side": 12}
    per_row = record_of(student(epochs=2), [5.0, 10.0], call_seconds=22.0)
    per_row["history"][1]["side_by_side"] = 12  # a resumed run: its second epoch beside 12

    def epoch_s(record, jobs):
        timer = RunTimer("cpu", bench=bench, jobs=jobs)
        timer.add(record)
        return timer.estimate(student(epochs=1)).epoch_s

    faster = (830.0 / 12) / 100.0  # an epoch beside 4 over the same epoch beside 12
    assert epoch_s(at_12, 12) == pytest.approx(14.25)  # the run's median epoch
    assert epoch_s(at_12, 4) == pytest.approx(14.25 * faster)
    assert epoch_s(per_row, 4) == pytest.approx((5.0 + 10.0 * faster) / 2)  # only the row beside 12
    # the record's count (its last session's) stands for rows without one; a row's own wins
    assert epoch_s({**per_row, "side_by_side": 12}, 4) == pytest.approx((5.0 + 10.0) / 2 * faster)
    assert epoch_s({**per_row, "side_by_side": 1}, 12) == pytest.approx((5.0 / faster + 10.0) / 2)
    unknown = record_of(student(epochs=2), [14.5, 14.0], call_seconds=30.0)  # counts not recorded
    assert epoch_s(unknown, 4) == pytest.approx(14.25)


def test_fit_notes_the_runs_side_by_side_on_each_epoch(real_data_root, tmp_path, capsys):
    from kdlib.data import load_splits
    from kdlib.models import create_model
    from kdlib.train import fit

    cfg = student("finetune", epochs=1)
    data = load_splits(real_data_root, val_size=cfg.val_size, train_size=cfg.train_size,
                       test_size=cfg.test_size, seed=cfg.split_seed, download=False)
    torch.manual_seed(0)
    result = fit(create_model("resnet8", w_bits=4, a_bits=4), data, cfg, device="cpu",
                 progress=False, tensorboard=False, side_by_side=3)
    assert [row["side_by_side"] for row in result.history] == [3]
    assert "runs_in_flight" not in result.history[0]  # no executor counted them
    # three runs print into one log: each epoch's line names its run; a run alone's does not
    assert capsys.readouterr().out.startswith("finetune w4a4 s0: epoch   1/1  lr ")
    counts = iter([1, 3])  # one run in flight as the epoch starts, three as it ends
    result = fit(create_model("resnet8", w_bits=4, a_bits=4), data, cfg, device="cpu",
                 progress=False, tensorboard=False, side_by_side=1,
                 runs_in_flight=lambda: next(counts))
    assert capsys.readouterr().out.startswith("epoch   1/1  lr ")
    assert [(row["side_by_side"], row["runs_in_flight"]) for row in result.history] == [(1, 2.0)]


def test_the_newest_benchmark_of_a_device_is_used(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(bench_file({"kd_w4": 1.0}, date="2026-01-01")))
    (tmp_path / "b.json").write_text(json.dumps(bench_file({"kd_w4": 2.0}, date="2026-06-01")))
    (tmp_path / "broken.json").write_text("{")
    assert load_bench(tmp_path, "cpu")["variants"]["kd_w4"]["images_per_s"] == 2.0


def test_leave_one_out_leaves_out_runs_alone_of_their_kind_and_runs_without_a_call_time(
        tmp_path):
    """A run with no other of its kind would be timed by the benchmark, not by finished runs:
    left out, as is a record without ``call_seconds`` (nothing to hold its estimate against),
    which still times the others (what it spent besides its epochs counts as nothing)."""
    (tmp_path / "cpu.json").write_text(json.dumps(bench_file({"kd_w4": 100.0, "w4a4": 100.0})))
    untimed = record_of(student(epochs=2, bits=1), [10.0, 10.0], call_seconds=None)
    del untimed["call_seconds"]
    records = [record_of(student(epochs=2), [10.0, 10.0], call_seconds=24.0),
               record_of(student(epochs=2, bits=2), [10.0, 10.0], call_seconds=24.0),
               untimed,
               record_of(student("finetune", epochs=2), [5.0, 5.0], call_seconds=12.0)]
    # each of the two: 1.2 * (2 * 10 s + the median of 4 s and 0 s besides) over 24 s
    assert leave_one_out(records, tmp_path) == pytest.approx([1.1, 1.1])


def test_budget_admits_only_what_can_finish_in_the_time_left():
    clock = Clock()
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=1), [10.0], 10.0))
    budget = Budget(60.0, timer, clock=clock, span=False)
    assert budget.admit(student(epochs=4)).start  # 48 s <= 60 s
    assert budget.admit(student(epochs=5)).start  # 1.2 * 50 = 60 s: fits exactly
    assert not budget.admit(student(epochs=6)).start
    clock.now += 20.0
    refused = budget.admit(student(epochs=4))
    assert not refused.start and "48 s" in refused.why and "40 s left" in refused.why
    refused = budget.admit(student("finetune"))
    assert not refused.start and "kdlib bench" in refused.why  # nothing to estimate from
    with pytest.raises(ValueError, match="positive"):
        Budget(0, timer)


def test_a_budgeted_run_must_stop_by_the_end_of_the_time_left():
    """The deadline a run trains under is the budget's end (time left from now), not the
    whole budget from now."""
    clock = Clock()
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=1), [10.0], 10.0))
    budget = Budget(60.0, timer, clock=clock)
    clock.now += 20.0  # 40 s left
    before = time.time()
    admitted = budget.admit(student(epochs=2))
    after = time.time()
    assert admitted.start and before + 40.0 <= admitted.deadline.stop_at <= after + 40.0


def test_a_budgeted_start_line_names_its_estimate_and_the_time_left():
    """Every budgeted start, not only one that spans calls, so that a call's `done` seconds can
    be read against what was expected; no budget: the run id alone."""
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=1), [10.0], 10.0))
    run = student(epochs=4)
    admitted = Budget(60.0, timer, clock=Clock(), span=False).admit(run)
    assert experiments.start_line(run, admitted) == \
        f"start {run.run_id()}: needs ~48 s (1 finished run(s) of this kind), 60 s left"
    assert experiments.start_line(run, None) == f"start {run.run_id()}"


def test_a_done_line_gives_the_seconds_trained_or_the_run_an_alias_is():
    trained = {"run_id": "a", "wall_time_s": 47.6}
    assert experiments.done_line("a", trained) == "done a (48 s)"
    alias = {**trained, "run_id": "b", "same_run_as": "a"}  # copied seconds are not its own
    assert experiments.done_line("b", alias) == "done b (same run as a)"
    assert experiments.done_line("c", None) == "done c"


def test_a_run_longer_than_the_whole_budget_spans_calls_and_a_shorter_one_waits():
    clock = Clock()
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=1), [10.0], 10.0))  # 10 s an epoch, nothing besides
    budget = Budget(60.0, timer, clock=clock)
    long = budget.admit(student(epochs=6))  # 72 s: no call of this budget could finish it
    assert long.start and long.spans and "trains ~5 of its 6 remaining epochs" in long.why
    assert long.deadline.epoch_s == 10.0 and long.deadline.tail_s == 0.0
    resumed = budget.admit(student(epochs=6), epochs_done=2)  # 4 epochs left: 48 s
    assert resumed.start and not resumed.spans
    clock.now += 20.0  # 40 s left
    waits = budget.admit(student(epochs=4))  # 48 s: a fresh call finishes it, so it waits
    assert not waits.start and "48 s" in waits.why
    assert "trains ~3 of its 6" in budget.admit(student(epochs=6)).why
    clock.now += 30.0  # 10 s left: not even one epoch (12 s with the safety factor)
    assert not budget.admit(student(epochs=6)).start
    strict = Budget(60.0, timer, clock=Clock(), span=False)
    assert not strict.admit(student(epochs=6)).start


def test_a_run_as_long_as_the_whole_budget_waits_and_one_epoch_that_just_fits_spans():
    clock = Clock()
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=1), [10.0], 10.0))
    budget = Budget(60.0, timer, clock=clock)
    clock.now += 20.0  # 40 s left
    whole = budget.admit(student(epochs=5))  # 60 s: a fresh call of this budget finishes it
    assert not whole.start and not whole.spans
    clock.now += 28.0  # 12 s left: one epoch with the safety factor, exactly
    just = budget.admit(student(epochs=6))
    assert just.start and just.spans and "trains ~1 of its 6" in just.why


def test_a_spanning_run_counts_its_overhead_and_its_epochs_left():
    """What a run spends besides its epochs (5 s here) goes into its first call's need, the
    epochs it is said to train and its deadline's tail; a resumed run spans its epochs left."""
    clock = Clock()
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=1), [10.0], 15.0))  # 10 s an epoch, 5 s besides
    budget = Budget(60.0, timer, clock=clock)
    long = budget.admit(student(epochs=6))  # 1.2 * (60 + 5) = 78 s
    assert long.spans and "trains ~4 of its 6 remaining epochs" in long.why  # (50 - 5) // 10
    assert long.deadline.epoch_s == 10.0 and long.deadline.tail_s == 5.0
    resumed = budget.admit(student(epochs=10), epochs_done=3)  # 7 left: 1.2 * (70 + 5) = 90 s
    assert resumed.spans and "trains ~4 of its 7 remaining epochs" in resumed.why
    clock.now += 45.0  # 15 s left: an epoch and what is besides take 1.2 * 15 = 18 s
    assert not budget.admit(student(epochs=6)).start


def test_at_most_max_spans_runs_continue_next_call():
    """Each run that spans ends paused, and its checkpoint travels to the next call: a lease
    caps them (12 paused ResNet-20s filled 41 MB on the H200)."""
    timer = RunTimer("cpu")
    timer.add(record_of(student(epochs=1), [10.0], 10.0))
    budget = Budget(60.0, timer, clock=Clock(), max_spans=2)
    assert budget.admit(student(epochs=6)).spans and budget.admit(student(epochs=7)).spans
    third = budget.admit(student(epochs=8))
    assert not third.start and "2 run(s) already continue next call (at most 2)" in third.why
    assert budget.admit(student(epochs=4)).start  # one that finishes in the call still starts
    assert Budget(60.0, timer, clock=Clock(), max_spans=0).admit(student(epochs=6)).start is False


def test_a_deadline_admits_an_epoch_only_if_it_ends_in_time():
    deadline = Deadline(stop_at=100.0, epoch_s=10.0, tail_s=5.0)
    assert deadline.allows(0, 3, now=88.0)  # 88 + 1.2 * 10 = 100
    assert not deadline.allows(0, 3, now=89.0)
    assert deadline.allows(1, 3, measured=[2.0, 1.0], now=97.0)  # its own epochs replace 10 s
    assert not deadline.allows(2, 3, measured=[2.0], now=92.0)  # the last one has a test pass
    assert deadline.allows(2, 3, measured=[2.0], now=91.0)


def test_a_deadline_times_the_next_epoch_by_the_slowest_this_process_trained():
    deadline = Deadline(stop_at=100.0, epoch_s=1.0)
    assert deadline.allows(2, 4, measured=[5.0, 1.0], now=94.0)  # 94 + 1.2 * 5 = 100
    assert not deadline.allows(2, 4, measured=[5.0, 1.0], now=95.0)


def test_runs_with_a_checkpoint_go_first_the_rest_in_plan_order(tmp_path):
    from kdlib.results import save_record

    plan = experiments.plan_grid(**GRID)
    paused, finished = [plan[4], plan[2]], plan[6]
    for cfg in paused + [finished]:
        checkpoint_path(tmp_path, cfg.run_id()).parent.mkdir(exist_ok=True)
        checkpoint_path(tmp_path, cfg.run_id()).write_bytes(b"some epochs")
    save_record(tmp_path, {"run_id": finished.run_id(), "config": finished.to_dict(),
                           "metrics": {}, "history": []})  # its checkpoint holds a finished run
    ordered = resume_first(plan, tmp_path)
    assert ordered == [plan[2], plan[4]] + [c for c in plan if c not in paused]


def test_runs_with_a_record_are_not_scheduled_and_nothing_waits_for_them(tmp_path):
    """A teacher and progressive@4 recorded already: they are not trained again, the runs they
    teach or start wait for nothing, and finetune@4 (progressive@4's training, recorded) waits
    for nothing either. One run at a time, the recorded runs come first (nothing to train)."""
    from kdlib.results import save_record
    from kdlib.trained import TrainedIndex

    plan = experiments.plan_grid(**GRID)
    name = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    index = TrainedIndex()
    recorded = [cfg for cfg in plan if name[cfg.run_id()] in {("teacher", 32), ("progressive", 4)}]
    for cfg in recorded:
        save_record(tmp_path, {**record_of(cfg, [1.0], 2.0), "metrics": {},
                               "training_key": index.key(cfg)})
    schedule = [(name[cfg.run_id()], [name[d] for d in after])
                for cfg, after in dependency_schedule(plan, tmp_path)]
    assert schedule == [
        (("ta_chain", 4), []), (("ta_chain", 1), [("ta_chain", 4)]), (("progressive", 1), []),
        (("finetune", 4), []), (("finetune", 1), []), (("direct_kd", 4), [("ta_chain", 4)]),
        (("direct_kd", 1), []),
    ]
    ordered = [name[cfg.run_id()] for cfg in start_order(plan, tmp_path, lambda cfg: 1)]
    assert ordered[:2] == [("teacher", 32), ("progressive", 4)] and len(ordered) == len(plan)


def test_a_paused_run_starts_before_new_runs_of_its_weight(tmp_path):
    """One run at a time: finetune@1 has a checkpoint (its teacher a record), so among the runs
    nothing waits for, of one epoch each, it goes on first; the others in plan order."""
    from kdlib.results import save_record

    plan = experiments.plan_grid(**GRID)
    name = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    teacher = plan[0]
    save_record(tmp_path, {**record_of(teacher, [1.0], 2.0), "metrics": {}})
    paused = next(cfg for cfg in plan if name[cfg.run_id()] == ("finetune", 1))
    checkpoint_path(tmp_path, paused.run_id()).parent.mkdir(exist_ok=True)
    checkpoint_path(tmp_path, paused.run_id()).write_bytes(b"some epochs")
    ordered = [name[cfg.run_id()] for cfg in start_order(plan, tmp_path, lambda cfg: 1)]
    assert ordered[-4:] == [("finetune", 1), ("ta_chain", 1), ("progressive", 1), ("direct_kd", 1)]


def test_a_run_planned_twice_starts_once_as_first_planned(tmp_path):
    """Two configs of one run id (they differ in an execution-only field): the first stands."""
    run = student("finetune", epochs=1)
    replayed = run.replace(cuda_graphs=True)
    assert replayed.run_id() == run.run_id()
    (only,) = start_order([run, replayed], tmp_path, lambda cfg: 1)
    assert only.cuda_graphs is False


def test_runs_others_wait_for_start_first_then_the_shortest(tmp_path):
    """unblocking_first: the runs other runs wait for, the heaviest line of training behind
    them first; then the rest, shortest first; a run recorded as another weighs nothing; ties
    in plan order."""
    plan = experiments.plan_grid(**GRID)
    name = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    epochs = {("ta_chain", 1): 3, ("progressive", 1): 5, ("finetune", 1): 4, ("direct_kd", 1): 2,
              ("finetune", 4): 6}  # an alias: trains nothing, whatever its epochs
    ordered = unblocking_first(dependency_schedule(plan, tmp_path),
                               lambda cfg: epochs.get(name[cfg.run_id()], 1))
    assert [name[cfg.run_id()] for cfg, _ in ordered] == [
        ("teacher", 32),  # holds back progressive 4 then progressive 1: 1 + 5
        ("progressive", 4),  # holds back progressive 1's 5 (finetune 4 is it, recorded again)
        ("ta_chain", 4),  # holds back ta_chain 1's 3
        ("finetune", 4), ("direct_kd", 4),  # aliases of progressive 4 and ta_chain 4: nothing
        ("direct_kd", 1), ("ta_chain", 1), ("finetune", 1), ("progressive", 1),  # 2, 3, 4, 5
    ]


def test_without_a_budget_the_rest_start_longest_first(tmp_path):
    """longest_first (runs side by side, no budget): the runs others wait for first as under a
    budget, then the longest, so that a call does not end on a long run beside idle workers."""
    plan = experiments.plan_grid(**GRID)
    name = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    epochs = {("ta_chain", 1): 3, ("progressive", 1): 5, ("finetune", 1): 4, ("direct_kd", 1): 2}
    ordered = unblocking_first(dependency_schedule(plan, tmp_path),
                               lambda cfg: epochs.get(name[cfg.run_id()], 1), longest_first=True)
    assert [name[cfg.run_id()] for cfg, _ in ordered] == [
        ("teacher", 32), ("progressive", 4), ("ta_chain", 4),  # as under a budget
        ("progressive", 1), ("finetune", 1), ("ta_chain", 1), ("direct_kd", 1),  # 5, 4, 3, 2
        ("finetune", 4), ("direct_kd", 4),  # aliases: nothing to train
    ]


def test_the_run_holding_back_the_heaviest_line_starts_first_not_the_most_training():
    """x is the init of two 3-epoch runs (6 epochs behind it, no line longer than 3), y of one
    5-epoch run: y holds back the heavier line, so it starts first."""
    x, y = student("finetune", epochs=1, seed=1), student("finetune", epochs=1, seed=2)
    x1 = student("finetune", epochs=3, seed=3, init_id=x.run_id())
    x2 = student("finetune", epochs=3, seed=4, init_id=x.run_id())
    y1 = student("finetune", epochs=5, seed=5, init_id=y.run_id())
    schedule = [(x, []), (y, []), (x1, [x.run_id()]), (x2, [x.run_id()]), (y1, [y.run_id()])]
    ordered = [cfg for cfg, _ in unblocking_first(schedule, lambda cfg: cfg.epochs)]
    assert ordered == [y, x, x1, x2, y1]


@pytest.mark.parametrize("kd_rate", [None, 1e6, 1e3])
def test_the_processes_executor_starts_the_longest_first_unless_under_a_budget(
        kd_rate, tmp_path, monkeypatch):
    """The order runs are handed to the workers (one worker thread here, so the order they
    train in): the 2-epoch `individual` at 1 bit before the 1-epoch students without a budget
    (``kd_rate`` None: by epochs); under one, the shortest by estimated time first: after them
    where every step runs at one rate, before them where the KD step is a thousand times
    slower than the CE step."""
    from concurrent import futures

    from kdlib import executors
    from kdlib.config import RunConfig
    from kdlib.results import save_record

    trained = []

    def train(config, data_dir, results_dir, *after, **options):
        cfg = RunConfig.from_dict(config)
        trained.append((cfg.method, cfg.w_bits, cfg.epochs))
        save_record(results_dir, {**record_of(cfg, [1.0] * cfg.epochs, 1.0 + cfg.epochs),
                                  "metrics": {}})
        return cfg.run_id()

    monkeypatch.setattr(executors, "_train_task", train)
    monkeypatch.setattr(executors.futures, "ProcessPoolExecutor",
                        lambda max_workers, **_: futures.ThreadPoolExecutor(1))
    plan = experiments.plan_grid(**{**GRID, "chain_methods": ["ta_chain"],
                                    "methods": ["individual", "direct_kd"]})
    budget = None
    if kd_rate is not None:  # generous: every run fits
        (tmp_path / "bench").mkdir()
        (tmp_path / "bench" / "cpu.json").write_text(json.dumps(bench_file(
            {"fp32": 1e6, "kd_w4": kd_rate, "w4a4": 1e6}, cpu=cpu_model())))
        here = device_kind("cpu")
        budget = Budget(1e6, RunTimer(here, bench=load_bench(tmp_path / "bench", here)))
    lines = []
    execute_processes(plan, jobs=2, results_dir=tmp_path / "b", tensorboard=False,
                      budget=budget, log=lines.append)
    assert lines[0].endswith("then the " + ("longest" if budget is None else "shortest"))
    assert trained[0] == ("teacher", 32, 2) and len(trained) == 7
    position = {(method, bits): i for i, (method, bits, _) in enumerate(trained)}
    one_epoch = [position["ta_chain", 1], position["direct_kd", 1]]
    if kd_rate == 1e6:
        assert position["individual", 1] > max(one_epoch)
    else:
        assert position["individual", 1] < min(one_epoch)


def test_under_a_budget_one_run_at_a_time_weighs_runs_by_their_estimated_seconds(tmp_path):
    """start_order, as the serial loop takes it under a budget (work_left_in): a KD epoch,
    twice a CE epoch's time here, weighs twice as much, so 3 CE epochs start before 2 KD ones
    (by epochs they come after), and a run without an estimate (no benchmark of its model)
    comes last whatever its epochs."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cpu.json").write_text(json.dumps(bench_file(
        {"kd_w4": 100.0, "w4a4": 200.0}, cpu=cpu_model())))
    here = device_kind("cpu")
    budget = Budget(1e6, RunTimer(here, bench=load_bench(tmp_path / "bench", here)))
    kd, ce = student("direct_kd", epochs=2), student("finetune", epochs=3)
    unknown = build_config("smoke", "resnet20", overrides={**TINY, "w_bits": 4, "a_bits": 4,
                                                           "epochs": 1, "init_id": None})
    plan = [unknown, kd, ce]
    by_epochs = start_order(plan, tmp_path / "runs", epochs_left_in(tmp_path / "runs"))
    assert [cfg.run_id() for cfg in by_epochs] == [unknown.run_id(), kd.run_id(), ce.run_id()]
    by_seconds = start_order(plan, tmp_path / "runs", work_left_in(tmp_path / "runs", budget))
    assert [cfg.run_id() for cfg in by_seconds] == [ce.run_id(), kd.run_id(), unknown.run_id()]
    assert work_left_in(tmp_path / "runs", None)(ce) == 3  # without a budget: epochs


def test_the_serial_loop_under_a_budget_starts_the_shortest_by_estimated_time(tmp_path,
                                                                              monkeypatch):
    """experiments.execute takes work_left_in's order: 3 CE epochs (at twice the KD step's
    rate) before 2 KD epochs, which the plan lists first."""
    from kdlib.results import save_record

    started = []

    def train_run(cfg, split, results_dir, **options):
        started.append(cfg.method)
        record = {**record_of(cfg, [1.0] * cfg.epochs, 1.0 + cfg.epochs), "metrics": {}}
        save_record(results_dir, record)
        return record

    monkeypatch.setattr(experiments, "train_run", train_run)
    monkeypatch.setattr(experiments._DataCache, "get", lambda self, cfg: None)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cpu.json").write_text(json.dumps(bench_file(
        {"kd_w4": 100.0, "w4a4": 200.0}, cpu=cpu_model())))
    here = device_kind("cpu")
    teacher = build_config("smoke", "resnet8", teacher=True, overrides=TINY)
    save_record(tmp_path / "r", {**record_of(teacher, [1.0], 2.0), "metrics": {}})  # KD's teacher
    budget = Budget(1e6, RunTimer(here, bench=load_bench(tmp_path / "bench", here)))
    experiments.execute([student("direct_kd", epochs=2), student("finetune", epochs=3)],
                        results_dir=tmp_path / "r", progress=False, budget=budget)
    assert started == ["finetune", "direct_kd"]


def test_one_run_at_a_time_starts_in_that_order_but_never_before_what_it_waits_for(tmp_path):
    """start_order, the serial loop's order under a budget: unblocking_first's, except that a
    run waits for its teacher, init and the run it is recorded as. Here progressive@1 has no
    epochs left, so progressive@4 holds nothing back and its alias finetune@4 (nothing to
    train) would sort before it."""
    plan = experiments.plan_grid(**GRID)
    name = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    epochs = {("ta_chain", 1): 3, ("progressive", 1): 0, ("finetune", 1): 4, ("direct_kd", 1): 2}

    def left(cfg):
        return epochs.get(name[cfg.run_id()], 1)

    ranked = [name[cfg.run_id()] for cfg, _ in unblocking_first(
        dependency_schedule(plan, tmp_path), left)]
    assert ranked.index(("finetune", 4)) < ranked.index(("progressive", 4))
    ordered = [name[cfg.run_id()] for cfg in start_order(plan, tmp_path, left)]
    assert ordered == [
        ("teacher", 32),  # holds back ta_chain 4 then ta_chain 1: 1 + 3
        ("ta_chain", 4),  # holds back ta_chain 1's 3
        # progressive 1 (0 epochs) and finetune 4 (an alias) rank next, but wait for:
        ("direct_kd", 4),  # ta_chain 4's alias: nothing to train, and ready
        ("progressive", 4),  # 1 epoch; then what waited for it, in their rank
        ("progressive", 1), ("finetune", 4),
        ("direct_kd", 1), ("ta_chain", 1), ("finetune", 1),  # 2, 3, 4 epochs
    ]


def test_a_paused_run_weighs_the_epochs_its_checkpoint_has_left(tmp_path):
    plan = experiments.plan_grid(**GRID)
    paused, fresh = plan[0], plan[1]
    path = checkpoint_path(tmp_path, paused.run_id())
    path.parent.mkdir(exist_ok=True)
    torch.save({"epoch": 1}, path)
    left = epochs_left_in(tmp_path)
    assert (left(paused), left(fresh)) == (paused.epochs - 1, fresh.epochs)


class RefusesMethod(Budget):
    """A budget that refuses every run of ``method`` and admits the others (with ``deadline``),
    whatever the machine's speed."""

    def __init__(self, method, deadline=None):
        super().__init__(3600.0, RunTimer("cpu"))
        self.method, self.deadline = method, deadline

    def admit(self, cfg, epochs_done=0):
        if cfg.method == self.method:
            return Admission(False, "longer than the time left")
        return Admission(True, "fits", deadline=self.deadline)


class PausesTheTeacher(Budget):
    """A budget whose teacher pauses before its last epoch and whose other runs fit (whatever
    the machine's speed): what a lease that ends in the teacher's training does."""

    def __init__(self):
        super().__init__(3600.0, RunTimer("cpu"))

    def admit(self, cfg, epochs_done=0):
        if cfg.method == "teacher":
            return Admission(True, "longer than the budget", spans=True,
                             deadline=Deadline(time.time() + 3600, epoch_s=0.01, tail_s=1e6))
        return Admission(True, "fits")


@pytest.mark.realdata
@pytest.mark.parametrize("executor", ["serial", "processes"])
@pytest.mark.slow
def test_a_paused_run_holds_back_its_students_and_the_next_call_resumes_it(
        executor, real_data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDLIB_TENSORBOARD", "0")
    plan = experiments.plan_grid(**{**GRID, "chain": [32, 4], "chain_methods": ["ta_chain"],
                                    "methods": ["direct_kd"]})
    teacher = plan[0]
    assert teacher.method == "teacher" and teacher.epochs == 2

    def run(budget):
        if executor == "serial":
            return experiments.execute(plan, data_dir=real_data_root, results_dir=tmp_path / "b",
                                       progress=False, budget=budget)
        return execute_processes(plan, jobs=2, data_dir=real_data_root, results_dir=tmp_path / "b",
                                 tensorboard=False, budget=budget)

    assert run(PausesTheTeacher()) == []
    out = capsys.readouterr().out
    assert f"paused {teacher.run_id()} after epoch 1/2" in out
    assert torch.load(checkpoint_path(tmp_path / "b", teacher.run_id()),
                      weights_only=True)["epoch"] == 1
    resumed = run(None)
    assert f"resuming from {checkpoint_path(tmp_path / 'b', teacher.run_id())} after epoch 1/2" \
        in capsys.readouterr().out or executor == "processes"  # a worker's output is its own
    serial = experiments.execute(plan, data_dir=real_data_root, results_dir=tmp_path / "s",
                                 progress=False)
    assert sorted(map(comparable, resumed), key=lambda r: r["run_id"]) == \
        sorted(map(comparable, serial), key=lambda r: r["run_id"])
    assert len(resumed) == 3


def test_device_kinds_name_the_gpu_and_the_processor(tmp_path):
    assert record_device_kind({"device": "cuda:0", "gpu": "NVIDIA H100"}) == "cuda:NVIDIA H100"
    assert record_device_kind({"device": "cpu"}) == "cpu"
    assert record_device_kind({"device": "cpu", "cpu_model": "AMD EPYC (family 26, model 2)"}) \
        == "cpu:AMD EPYC (family 26, model 2)"
    # a run on one processor is not timed by another's records or benchmark
    slow = {**record_of(student(), [100.0], 100.0), "cpu_model": "AMD EPYC (family 25, model 1)"}
    fast = {**record_of(student(), [10.0], 10.0), "cpu_model": "AMD EPYC (family 26, model 2)"}
    timer = RunTimer("cpu:AMD EPYC (family 26, model 2)")
    timer.add(slow)
    assert timer.estimate(student()).seconds is None
    timer.add(fast)
    assert timer.estimate(student()).seconds == pytest.approx(1.2 * student().epochs * 10.0)
    (tmp_path / "old.json").write_text(json.dumps(bench_file({"kd_w4": 1.0}, cpu="AMD EPYC")))
    assert load_bench(tmp_path, "cpu:AMD EPYC (family 26, model 2)") is None
    assert device_kind("cpu") == (f"cpu:{cpu_model()}" if cpu_model() else "cpu")


@pytest.mark.realdata
@pytest.mark.slow
def test_budgeted_grid_trains_what_fits_and_the_next_call_finishes(real_data_root, tmp_path,
                                                                   capsys):
    """A benchmark that makes every KD run too long for the budget: the teacher and the
    plain-CE runs (timed by the teacher's record once it exists) train, the KD runs wait; a
    second call with a generous budget trains them, and the records equal an unbudgeted grid's."""
    plan = experiments.plan_grid(**GRID)
    (tmp_path / "bench").mkdir()
    # the 2-epoch teacher of 200 images is estimated at 25 s of the 30 (its start allowance
    # included); a KD epoch at 300 s
    (tmp_path / "bench" / "cpu.json").write_text(json.dumps(bench_file(
        {"fp32": 200 * 2 * 1.25 / (25.0 / 1.2 - START_ALLOWANCE_S), "kd_w4": 1.0, "w4a4": 1.0},
        cpu=cpu_model())))
    here = device_kind("cpu")  # this processor: the records these runs write are timed as its
    timer = RunTimer(here, bench=load_bench(tmp_path / "bench", here))
    order = [cfg.run_id() for cfg in start_order(plan, tmp_path / "b", work_left_in(
        tmp_path / "b", Budget(30.0, timer)))]
    assert order != [cfg.run_id() for cfg in plan]  # under a budget, not the plan's order:
    capsys.readouterr()
    first = experiments.execute(plan, data_dir=real_data_root, results_dir=tmp_path / "b",
                                progress=False, budget=Budget(30.0, timer))
    out = capsys.readouterr().out.splitlines()
    tried = [line.split("] ", 1)[1] for line in out if line.startswith("[")]
    assert tried == order  # the processes executor's, one run at a time
    started = [line for line in out if line.startswith("start ")]
    assert started[0].startswith(f"start {order[0]}: needs ~25 s (benchmark, ")
    assert len(started) == 4 and all(" s left" in line for line in started)  # trained, not aliases
    assert {r["config"]["method"] for r in first} == {"teacher", "progressive", "finetune"}
    done = [line for line in out if line.startswith("done ")]  # the serial loop's, as processes'
    assert sorted(done) == sorted(experiments.done_line(r["run_id"], r) for r in first)
    assert sum(line.endswith(" s)") for line in done) == 4  # the trained ones carry seconds
    assert all(r["config"]["teacher_id"] is None for r in first)
    code = cli.main(["grid", "--preset", "smoke", "--model", "resnet8", "--chain", "32", "4", "1",
                     "--chain-methods", "ta_chain", "progressive", "--methods", "finetune",
                     "direct_kd", *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")],
                     "--data-dir", str(real_data_root), "--results-dir", str(tmp_path / "b"),
                     "--no-progress", "--no-tensorboard", "--budget-min", "30",
                     "--bench-dir", str(tmp_path / "bench")])
    assert code == 0
    budgeted = sorted(map(comparable, load_records(tmp_path / "b")), key=lambda r: r["run_id"])
    serial = experiments.execute(plan, data_dir=real_data_root, results_dir=tmp_path / "s",
                                 progress=False)
    assert budgeted == sorted(map(comparable, serial), key=lambda r: r["run_id"])
    assert len(budgeted) == 9


@pytest.mark.realdata
@pytest.mark.slow
def test_processes_executor_equals_the_serial_grid(real_data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_TENSORBOARD", "0")
    plan = experiments.plan_grid(**GRID)
    serial = experiments.execute(plan, data_dir=real_data_root, results_dir=tmp_path / "s",
                                 progress=False)
    parallel = execute_processes(plan, jobs=2, data_dir=real_data_root,
                                 results_dir=tmp_path / "p", tensorboard=False)
    assert sorted(map(comparable, parallel), key=lambda r: r["run_id"]) == \
        sorted(map(comparable, serial), key=lambda r: r["run_id"])
    aliases = {r["config"]["method"] for r in parallel if r.get("same_run_as")}
    assert aliases == {"finetune", "direct_kd"} and len(parallel) == 9
    # each record says how many runs the grid allowed at once and, epoch by epoch, how many
    # were in flight (itself included): the teacher's alone, as the others wait for it
    assert {r["side_by_side"] for r in parallel} == {2} \
        and {r["side_by_side"] for r in serial} == {1}
    trained = [r for r in parallel if not r.get("same_run_as")]
    in_flight = {r["config"]["method"]: [row["runs_in_flight"] for row in r["history"]]
                 for r in trained}
    assert in_flight["teacher"] == [1.0] * len(in_flight["teacher"])
    assert all(1.0 <= n <= 2.0 for counts in in_flight.values() for n in counts)
    assert not any("runs_in_flight" in row for r in serial for row in r["history"])


def test_processes_executor_refuses_a_bad_job_count(tmp_path):
    with pytest.raises(ValueError, match="jobs=0"):
        execute_processes([], jobs=0, results_dir=tmp_path)


CHAIN4 = {**GRID, "chain": [32, 4], "chain_methods": ["ta_chain"], "methods": ["direct_kd"]}


def run_in_threads(monkeypatch, train, workers=2):
    """execute_processes with ``train`` as each run's task, in a pool of threads."""
    from concurrent import futures

    from kdlib import executors
    from kdlib.config import RunConfig

    def task(config, data_dir, results_dir, *after, **options):
        return train(RunConfig.from_dict(config), results_dir)

    monkeypatch.setattr(executors, "_train_task", task)
    monkeypatch.setattr(executors.futures, "ProcessPoolExecutor",
                        lambda max_workers, **_: futures.ThreadPoolExecutor(workers))


def write_record(cfg, results_dir):
    from kdlib.results import save_record

    save_record(results_dir, {**record_of(cfg, [1.0] * cfg.epochs, 1.0 + cfg.epochs),
                              "cpu_model": cpu_model(), "metrics": {}})
    return cfg.run_id()


def test_the_processes_executor_starts_a_run_only_once_what_it_waits_for_is_recorded(
        tmp_path, monkeypatch):
    from kdlib.results import find_record

    plan = experiments.plan_grid(**GRID)
    waits = {cfg.run_id(): after for cfg, after in dependency_schedule(plan, tmp_path / "b")}
    early = []

    def train(cfg, results_dir):
        early.extend((cfg.run_id(), d) for d in waits[cfg.run_id()]
                     if find_record(results_dir, d) is None)
        time.sleep(0.02)  # the other workers are free meanwhile
        return write_record(cfg, results_dir)

    run_in_threads(monkeypatch, train, workers=3)
    records = execute_processes(plan, jobs=3, results_dir=tmp_path / "b", tensorboard=False,
                                log=lambda _: None)
    assert early == [] and len(records) == 9


def test_the_processes_executor_reports_a_failed_run_and_starts_nothing_that_needs_it(
        tmp_path, monkeypatch):
    from kdlib.executors import GridRunError

    plan = experiments.plan_grid(**{**GRID, "chain_methods": ["ta_chain"],
                                    "methods": ["direct_kd"]})
    name = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    broken = next(run_id for run_id, n in name.items() if n == ("ta_chain", 4))
    trained = []

    def train(cfg, results_dir):
        if cfg.run_id() == broken:
            raise RuntimeError("loss is nan\n(the traceback's other lines)")
        trained.append(name[cfg.run_id()])
        return write_record(cfg, results_dir)

    run_in_threads(monkeypatch, train)
    lines = []
    with pytest.raises(GridRunError) as failed:
        execute_processes(plan, jobs=2, results_dir=tmp_path / "b", tensorboard=False,
                          log=lines.append)
    assert str(failed.value) == f"1 runs failed: {broken}: RuntimeError: loss is nan"
    assert f"FAILED {broken}: RuntimeError: loss is nan" in lines
    # ta_chain@1 starts from it and direct_kd@4 is its training under another name
    assert sorted(trained) == [("direct_kd", 1), ("teacher", 32)]
    held = sorted(name[line.split()[2].rstrip(":")] for line in lines
                  if line.startswith("not started ") and "a run it needs did not finish" in line)
    assert held == [("direct_kd", 4), ("ta_chain", 1)]


@pytest.mark.timeout(30)  # a scheduler still waiting for the paused run would spin until then
def test_a_run_paused_in_a_worker_holds_back_its_students_and_fails_nothing(tmp_path,
                                                                           monkeypatch):
    from kdlib.train import RunSuspended

    plan = experiments.plan_grid(**CHAIN4)
    teacher = plan[0]
    started = []

    def train(cfg, results_dir):
        started.append(cfg.method)
        if cfg.method == "teacher":
            raise RunSuspended(cfg.run_id(), 1, cfg.epochs)
        return write_record(cfg, results_dir)

    run_in_threads(monkeypatch, train)
    lines = []
    assert execute_processes(plan, jobs=2, results_dir=tmp_path / "b", tensorboard=False,
                             log=lines.append) == []
    assert started == ["teacher"]
    assert f"paused {teacher.run_id()} after epoch 1/2 (its checkpoint is kept): the next " \
        "epoch would end past the time budget; the next call resumes it" in lines
    assert sum(line.startswith("not started ") for line in lines) == len(plan) - 1
    assert lines[-1].startswith(f"budget: {len(plan)} run(s) left for the next call")


def test_under_a_budget_the_processes_executor_times_later_runs_by_the_ones_it_finished(
        tmp_path, monkeypatch):
    """The benchmark times only the teacher's 32-bit step; `progressive` at 4 bits (plain CE,
    the teacher's kind) is timed by the teacher's record once it exists, as in the serial loop."""
    plan = experiments.plan_grid(**{**CHAIN4, "chain_methods": ["progressive"],
                                    "methods": ["finetune"]})
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cpu.json").write_text(json.dumps(bench_file({"fp32": 1e6},
                                                                       cpu=cpu_model())))
    here = device_kind("cpu")
    budget = Budget(1e6, RunTimer(here, bench=load_bench(tmp_path / "bench", here)))
    assert budget.timer.estimate(plan[1]).seconds is None  # before the teacher's record
    run_in_threads(monkeypatch, write_record)
    lines = []
    records = execute_processes(plan, jobs=2, results_dir=tmp_path / "b", tensorboard=False,
                                budget=budget, log=lines.append)
    assert not [line for line in lines if line.startswith("not started ")]
    assert [r["config"]["method"] for r in records] == ["teacher", "progressive", "finetune"]


def test_under_a_budget_a_run_recorded_as_another_run_of_the_call_is_never_refused(
        tmp_path, monkeypatch):
    """finetune@4 is progressive@4's training: once that is done, recording it costs nothing,
    whatever the budget would say of training it."""
    plan = experiments.plan_grid(**{**CHAIN4, "chain_methods": ["progressive"],
                                    "methods": ["finetune"]})
    run_in_threads(monkeypatch, write_record)
    lines = []
    records = execute_processes(plan, jobs=2, results_dir=tmp_path / "b", tensorboard=False,
                                budget=RefusesMethod("finetune"), log=lines.append)
    assert not [line for line in lines if line.startswith("not started ")]
    assert [r["config"]["method"] for r in records] == ["teacher", "progressive", "finetune"]


@pytest.mark.timeout(30)  # a scheduler still waiting for the refused run would spin until then
def test_under_a_budget_a_run_that_does_not_fit_is_left_with_what_needs_it_and_the_rest_train(
        tmp_path, monkeypatch):
    """A run the budget refuses is not started, nor what starts from it or is its training
    under another name; the others train, each worker handed the call's threads, how many
    runs train side by side, the deadline its admission set and TensorBoard (on unless
    asked off, as in the serial loop); the call ends, saying what is left for the next one."""
    from concurrent import futures

    from kdlib import executors
    from kdlib.config import RunConfig

    deadline = Deadline(time.time() + 3600, epoch_s=1.0)

    handed = {}

    def task(config, data_dir, results_dir, device, threads, tensorboard, *after, **options):
        cfg = RunConfig.from_dict(config)
        handed[cfg.method, cfg.w_bits] = (threads, tensorboard, options)
        return write_record(cfg, results_dir)

    monkeypatch.setattr(executors, "_train_task", task)
    monkeypatch.setattr(executors.futures, "ProcessPoolExecutor",
                        lambda max_workers, **_: futures.ThreadPoolExecutor(max_workers))
    plan = experiments.plan_grid(**{**GRID, "chain_methods": ["ta_chain"],
                                    "methods": ["direct_kd"]})
    name = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    lines = []
    records = execute_processes(plan, jobs=2, threads=3, results_dir=tmp_path / "b",
                                budget=RefusesMethod("ta_chain", deadline), log=lines.append)
    assert sorted(handed) == [("direct_kd", 1), ("teacher", 32)]
    # TensorBoard not asked: the workers' environment decides, as in the serial loop
    assert list(handed.values()) == [(3, None, {"deadline": deadline, "side_by_side": 2})] * 2
    assert [name[r["run_id"]] for r in records] == [("teacher", 32), ("direct_kd", 1)]
    refused = {name[line.split()[2].rstrip(":")]: line.split(": ", 1)[1] for line in lines
               if line.startswith("not started ")}
    assert refused == {("ta_chain", 4): "longer than the time left",
                       ("ta_chain", 1): "a run it needs did not finish",
                       ("direct_kd", 4): "a run it needs did not finish"}
    assert lines[-1].startswith("budget: 3 run(s) left for the next call")


def test_a_run_recorded_as_another_waits_for_that_run_not_only_for_its_teacher(tmp_path,
                                                                               monkeypatch):
    """direct_kd@4 is ta_chain@4's training: with a worker free, it starts only once
    ta_chain@4's record exists, not as soon as the teacher they share is done."""
    from kdlib.results import find_record

    plan = experiments.plan_grid(**CHAIN4)
    started = []

    def train(cfg, results_dir):
        started.append((cfg.method, [find_record(results_dir, c.run_id()) is not None
                                     for c in plan]))
        if cfg.method == "ta_chain":
            time.sleep(0.2)  # the other worker is free meanwhile
        return write_record(cfg, results_dir)

    run_in_threads(monkeypatch, train)
    execute_processes(plan, jobs=2, results_dir=tmp_path / "b", tensorboard=False,
                      log=lambda _: None)
    assert started == [("teacher", [False, False, False]), ("ta_chain", [True, False, False]),
                       ("direct_kd", [True, True, False])]


def test_the_processes_executor_resumes_a_paused_run_before_it_starts_a_new_one(tmp_path,
                                                                                monkeypatch):
    """Two runs with as many epochs left: the one paused by the last call's budget goes on
    first (what was started before ends before anything new starts, as in the serial loop)."""
    fresh, paused = student("finetune", epochs=1, seed=1), student("finetune", epochs=2, seed=2)
    path = checkpoint_path(tmp_path / "b", paused.run_id())
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 1}, path)
    started = []
    run_in_threads(monkeypatch, lambda cfg, results_dir: started.append(cfg.run_id())
                   or write_record(cfg, results_dir), workers=1)
    execute_processes([fresh, paused], jobs=1, results_dir=tmp_path / "b", tensorboard=False,
                      log=lambda _: None)
    assert started == [paused.run_id(), fresh.run_id()]


def test_a_worker_trains_its_run_with_what_the_executor_hands_it(monkeypatch):
    """The run's own data split (its split seed and sizes, not its training seed), the device,
    the thread count, TensorBoard off when asked (else as the environment says: the lease's
    workers ignored KDLIB_TENSORBOARD=0), the deadline and how many runs train side by side
    all reach the training in the worker."""
    import dataclasses
    import os

    from kdlib import executors
    from kdlib.tblog import TENSORBOARD_ENV

    cfg = dataclasses.replace(student(), seed=5, split_seed=2)
    loaded, trained = [], []
    monkeypatch.setattr(executors, "load_splits",
                        lambda root, **kw: loaded.append((root, kw)) or "splits")
    monkeypatch.setattr(executors, "train_run", lambda run, data, results_dir, **kw: trained.append(
        (run, data, results_dir, kw, torch.get_num_threads(), os.environ[TENSORBOARD_ENV]))
        or {"run_id": run.run_id()})
    monkeypatch.setattr(executors, "_in_flight", None)
    monkeypatch.setenv(TENSORBOARD_ENV, "1")
    deadline = Deadline(time.time() + 60, epoch_s=1.0)
    threads = torch.get_num_threads()
    executors._splits.cache_clear()
    try:
        assert executors._train_task(cfg.to_dict(), "data", "res", "cpu", threads + 1, False,
                                     deadline=deadline, side_by_side=2) == cfg.run_id()
    finally:
        torch.set_num_threads(threads)
        executors._splits.cache_clear()
    assert loaded == [("data", {"val_size": 100, "train_size": 200, "test_size": 100,
                                "seed": 2})]
    assert trained == [(cfg, "splits", "res", {"device": "cpu", "progress": False,
                                               "deadline": deadline, "side_by_side": 2,
                                               "runs_in_flight": None}, threads + 1, "0")]
    for asked, environment, seen in [(None, "0", "0"), (None, "1", "1"), (True, "0", "1")]:
        monkeypatch.setenv(TENSORBOARD_ENV, environment)
        executors._train_task(cfg.to_dict(), "data", "res", "cpu", threads, asked)
        assert trained[-1][-1] == seen
    executors._splits.cache_clear()


def test_the_processes_executor_refuses_a_results_folder_it_cannot_write_before_any_run(
        tmp_path, monkeypatch):
    """Else each run would train for nothing and fail only when it writes its record."""
    (tmp_path / "file").write_text("")
    started = []
    run_in_threads(monkeypatch, lambda cfg, results_dir: started.append(cfg.run_id())
                   or write_record(cfg, results_dir))
    with pytest.raises(PermissionError, match="is not writable"):
        execute_processes(experiments.plan_grid(**CHAIN4), jobs=2,
                          results_dir=tmp_path / "file" / "b", tensorboard=False,
                          log=lambda _: None)
    assert started == []


def test_a_worker_that_dies_fails_its_run_and_the_others_train_in_a_new_pool(tmp_path,
                                                                             monkeypatch):
    """A worker killed mid-run (out of memory, a crash in the driver) breaks its process pool:
    that run is reported failed (exit code 1 at the command line) and the other runs of the
    grid still train, where the broken pool ended the call in a traceback, training nothing
    more."""
    from concurrent import futures
    from concurrent.futures.process import BrokenProcessPool

    from kdlib import executors
    from kdlib.config import RunConfig
    from kdlib.executors import GridRunError
    from kdlib.results import find_record

    class WorkerDied(Exception):
        pass

    pools = []

    class DyingWorkerPool:
        """ProcessPoolExecutor's way once a worker died: its run fails with BrokenProcessPool,
        and the pool takes no more."""

        def __init__(self, max_workers, initargs, **_):
            self.threads, self.broken = futures.ThreadPoolExecutor(max_workers), False
            self.in_flight, = initargs  # the runs in flight, which a worker's run counts in
            self.counted_at_start = self.in_flight.value
            pools.append(self)

        def submit(self, fn, *args, **kwargs):
            if self.broken:
                raise BrokenProcessPool("the process pool is not usable anymore")

            def run():
                self.in_flight.value += 1
                try:
                    result = fn(*args, **kwargs)
                except WorkerDied:  # gone, and its count with it
                    self.broken = True
                    raise BrokenProcessPool("a process terminated abruptly") from None
                self.in_flight.value -= 1
                return result
            return self.threads.submit(run)

        def shutdown(self, wait=True):
            self.threads.shutdown(wait)
            self.closed = True

    def task(config, data_dir, results_dir, *after, **options):
        cfg = RunConfig.from_dict(config)
        if cfg.seed == 1:
            raise WorkerDied
        return write_record(cfg, results_dir)

    monkeypatch.setattr(executors, "_train_task", task)
    monkeypatch.setattr(executors.futures, "ProcessPoolExecutor", DyingWorkerPool)
    dies, *others = [student("finetune", epochs=1, seed=seed) for seed in (1, 2, 3)]
    lines = []
    with pytest.raises(GridRunError) as failed:
        execute_processes([dies, *others], jobs=1, results_dir=tmp_path / "b",
                          tensorboard=False, log=lines.append)
    assert str(failed.value) == \
        f"1 runs failed: {dies.run_id()}: BrokenProcessPool: a process terminated abruptly"
    assert f"FAILED {dies.run_id()}: BrokenProcessPool: a process terminated abruptly" in lines
    assert [find_record(tmp_path / "b", cfg.run_id()) is not None for cfg in others] == [True] * 2
    assert [getattr(pool, "closed", False) for pool in pools] == [True, True]  # no worker left
    assert [pool.counted_at_start for pool in pools] == [0, 0]  # not the dead run's count
