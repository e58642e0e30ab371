"""The README's cost table: trainings counted like the grid trains them, rates from records."""
from __future__ import annotations

import pandas as pd
import pytest

from kdlib.costs import (SQUEEZENET_TIME_RATIO, UNRECORDED_CPU, grid_cost, machine_for, machines,
                         measured_rates, plan_trainings, processor, render_costs,
                         render_device_costs, trainings)
from kdlib.experiments import plan_grid


def test_runs_that_are_one_training_count_once():
    runs, trainings = plan_trainings("quick", seeds=[0])
    assert runs == len(plan_grid(preset="quick", seeds=[0])) == 36
    # The 16-bit links of ta_chain, progressive_kd32, direct_kd and direct_kd_matched are one
    # training; so are progressive's and finetune's 16-bit links: 36 - 3 - 1 = 32.
    assert len(trainings) == 32
    assert {c.model for c in plan_trainings("quick_squeezenet")[1]} == {"squeezenet"}


def _frame(rows):
    base = {"same_run_as": None, "val_size": 5000, "teacher_id": None}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_rates_are_image_epochs_over_wall_time_per_kind():
    frame = _frame([
        {"model": "resnet20", "train_size": None, "epochs": 2, "wall_time_s": 900.0},   # 90k
        {"model": "resnet20", "train_size": 1000, "epochs": 1, "wall_time_s": 100.0},   # 1k
        {"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 450.0,
         "teacher_id": "t"},
        {"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 1.0,
         "teacher_id": "t", "same_run_as": "x"},  # an alias trained nothing
    ])
    rates = measured_rates(frame)
    assert rates[("resnet20", False)] == pytest.approx(91_000 / 1000.0)
    assert rates[("resnet20", True)] == pytest.approx(45_000 / 450.0)


def test_squeezenet_borrows_resnets_rate_until_it_has_its_own():
    rates = {("resnet20", False): 150.0, ("resnet20", True): 75.0}
    scaled = grid_cost("quick_squeezenet", rates)
    _, trainings = plan_trainings("quick_squeezenet")
    expected = sum(8000 * c.epochs / ((75.0 if c.teacher_id else 150.0) / SQUEEZENET_TIME_RATIO)
                   for c in trainings) / 3600
    assert scaled["run_hours"] == pytest.approx(expected) and scaled["basis"] == {"scaled"}
    own = grid_cost("quick_squeezenet",
                    {**rates, ("squeezenet", False): 50.0, ("squeezenet", True): 25.0})
    assert own["basis"] == {"measured"} and own["run_hours"] < scaled["run_hours"]
    assert grid_cost("quick", {})["run_hours"] is None
    assert "no measured rate" in render_costs(["quick"], pd.DataFrame())


def test_readme_states_how_much_of_a_seed_the_contrasts_need():
    """The README's "36 of the 84 epochs" follows the grid, not a hand count."""
    from pathlib import Path

    epochs = [sum(c.epochs for c in trainings(plan_grid(preset="quick", seeds=[1], methods=m)))
              for m in (["direct_kd_matched"], None)]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert (f"`direct_kd_matched`: {epochs[0]} of the {epochs[1]}\nepochs a seed trains") in readme


def test_rates_of_two_processors_never_pool_and_the_newest_machine_is_estimated():
    frame = _frame([
        {"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 450.0,
         "cpu_model": None, "created_at": "2026-12-01T10:00:00+00:00"},        # 100 img-epochs/s
        {"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 90.0,
         "cpu_model": "AMD EPYC", "created_at": "2026-12-03T10:00:00+00:00"},  # 500
    ])
    assert machines(frame) == ["AMD EPYC", UNRECORDED_CPU]
    assert measured_rates(frame) == {("resnet20", False): pytest.approx(500.0)}
    assert measured_rates(frame, UNRECORDED_CPU) == {("resnet20", False): pytest.approx(100.0)}
    text = render_costs(["quick"], frame)
    assert "| AMD EPYC " in text  # the row's processor
    assert "newest processor first" in text and "on AMD EPYC: resnet20 CE 500" in text
    assert f"on {UNRECORDED_CPU}: resnet20 CE 100" in text


def test_each_row_is_estimated_on_the_newest_processor_that_trained_its_model():
    """A new machine that trained only SqueezeNet leaves ResNet-20's rows at the rates of the
    machine before it, instead of without an estimate."""
    frame = _frame([  # 500 image-epochs/s for ResNet-20, 80 for SqueezeNet, CE and KD alike
        *({"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 90.0,
           "cpu_model": "AMD EPYC", "created_at": "2026-12-03T10:00:00+00:00", "teacher_id": t}
          for t in (None, "t")),
        *({"model": "squeezenet", "train_size": 8000, "epochs": 1, "wall_time_s": 100.0,
           "cpu_model": "Intel Xeon", "created_at": "2026-12-05T10:00:00+00:00", "teacher_id": t}
          for t in (None, "t")),
    ])
    assert machines(frame) == ["Intel Xeon", "AMD EPYC"]
    assert machine_for(frame, "resnet20") == "AMD EPYC"
    assert machine_for(frame, "squeezenet") == "Intel Xeon"
    assert machine_for(frame[frame["model"] == "resnet20"], "squeezenet") == "AMD EPYC"  # borrows
    assert machine_for(frame.iloc[:0], "resnet20") is None
    text = render_costs(["quick", "quick_squeezenet"], frame)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| `")}
    hours = grid_cost("quick", {("resnet20", False): 500.0, ("resnet20", True): 500.0})
    assert "no measured rate" not in text
    assert f"{hours['run_hours']:,.1f} run-hours" in rows["`quick`"] \
        and "AMD EPYC" in rows["`quick`"]
    assert "Intel Xeon" in rows["`quick_squeezenet`"]


def test_a_multi_seed_grid_states_the_wall_time_of_one_seed():
    """The issue's "one seed takes at most 2 hours": the estimate names a seed's share."""
    rates = {("resnet20", False): 300.0, ("resnet20", True): 300.0}
    cost = grid_cost("quick", rates)
    assert cost["seeds"] == 3
    frame = _frame([{"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 150.0,
                     "cpu_model": "AMD EPYC", "created_at": "2026-12-03T10:00:00+00:00",
                     "teacher_id": teacher} for teacher in (None, "t")])  # 300/s each kind
    text = render_costs(["quick"], frame, jobs=2)
    hours = cost["run_hours"]
    assert f"≈ {hours / 2:,.1f} h with `--jobs 2`, {hours / 2 / 3:,.1f} h a seed)" in text
    assert "a seed" not in render_costs(["smoke"], frame)  # one seed


def test_device_costs_count_device_hours_and_leases_a_seed():
    """At 10,000 image-epochs a second per run, 4 runs side by side and 8 training minutes a
    lease, `paper` needs its image-epochs / 10,000 / 3600 run-hours, a quarter of that on the
    device, and that over 3 seeds and 8/60 h for its leases. A run timed 12 at a time shares
    the device with 11 others: its rate per device second is 12 times its own."""
    frame = _frame([{"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 4.5,
                     "cpu_model": "host"},
                    {"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 4.5,
                     "teacher_id": "t", "cpu_model": "host"}])
    run_hours = grid_cost("paper", {("resnet20", False): 1e4, ("resnet20", True): 1e4})["run_hours"]
    assert run_hours == pytest.approx(1134e6 / 1e4 / 3600)
    text = render_device_costs(["paper"], frame, jobs=4, lease_minutes=8.0)
    leases = round(run_hours / 4 * 60 / 8.0 / 3)
    assert f"≈ {run_hours / 4:,.1f} h of the device" in text and "else 4" in text
    assert f"about {leases} leases of 8 training minutes a seed" in text
    assert "No GPU records" in render_device_costs(["paper"], pd.DataFrame(), 4, 8.0)
    # the same runs, recorded as timed 12 at a time and 3 times slower each: the same device rate
    slow = _frame([{"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 13.5,
                    "cpu_model": "host", "side_by_side": 12},
                   {"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 13.5,
                    "teacher_id": "t", "cpu_model": "host", "side_by_side": 12}])
    assert measured_rates(slow, side_by_side=4) \
        == pytest.approx(measured_rates(frame, side_by_side=4))
    assert render_device_costs(["paper"], slow, jobs=4, lease_minutes=8.0) == text
    assert measured_rates(slow) \
        == pytest.approx({k: v / 3 for k, v in measured_rates(frame).items()})
    # a run of the same preset trained on a CPU, the newest record, leaves the device's rates be
    on_gpu = frame.assign(device="cuda:0", created_at="2026-12-04T10:00:00+00:00")
    cpu_run = _frame([{"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 450.0,
                       "cpu_model": "laptop", "device": "cpu",
                       "created_at": "2026-12-05T10:00:00+00:00"}])
    assert render_device_costs(["paper"], pd.concat([on_gpu, cpu_run]), 4, 8.0) == text
    assert "No GPU records" in render_device_costs(["paper"], cpu_run, 4, 8.0)


def test_gpu_runs_are_named_by_their_gpu_so_two_gpus_on_one_host_model_never_pool():
    """An H100 and an H200 lent on hosts of one CPU model: each GPU's rate is its own, and the
    newest GPU's sets the device cost."""
    row = {"model": "resnet20", "train_size": None, "epochs": 1, "cpu_model": "Intel Xeon",
           "device": "cuda:0"}
    frame = _frame([{**row, "gpu": "NVIDIA H200", "wall_time_s": 4.5,
                     "created_at": "2026-12-04T10:00:00+00:00"},     # 10,000 image-epochs/s
                    {**row, "gpu": "NVIDIA H100", "wall_time_s": 9.0,
                     "created_at": "2026-12-05T10:00:00+00:00"},     # 5,000
                    {**row, "device": "cpu", "gpu": None, "wall_time_s": 450.0,
                     "created_at": "2026-12-03T10:00:00+00:00"}])    # 100, on the host CPU
    assert list(processor(frame)) == ["an NVIDIA H200", "an NVIDIA H100", "Intel Xeon"]
    assert machines(frame) == ["an NVIDIA H100", "an NVIDIA H200", "Intel Xeon"]
    assert measured_rates(frame) == {("resnet20", False): pytest.approx(5_000.0)}
    assert measured_rates(frame, "an NVIDIA H200") == {("resnet20", False): pytest.approx(1e4)}
    assert measured_rates(frame, "Intel Xeon") == {("resnet20", False): pytest.approx(100.0)}
    assert "resnet20 CE 5000 " in render_device_costs(["paper"], frame, jobs=1, lease_minutes=8.0)


def test_a_resumed_run_shares_the_device_epoch_by_epoch():
    """Paused beside 12 runs, finished beside 4: each epoch over the runs beside it then."""
    from kdlib.results import device_seconds

    record = {"wall_time_s": 25.0, "side_by_side": 4,
              "history": [{"seconds": 10.0, "side_by_side": 12}, {"seconds": 10.0}]}
    assert device_seconds(record) == pytest.approx(10 / 12 + 10 / 4 + 5 / 4)
    assert device_seconds({**record, "side_by_side": None}) is None  # counts not recorded
    assert device_seconds({"wall_time_s": 8.0, "side_by_side": 4, "history": [{"seconds": 6.0}]}) \
        == pytest.approx(8.0 / 4)  # one session: the wall time over its count, as before
    row = {"model": "resnet20", "train_size": None, "epochs": 2, "wall_time_s": 25.0,
           "cpu_model": "host", "side_by_side": 4}
    frame = _frame([{**row, "device_time_s": device_seconds(record)}])
    expected = 2 * 45000 / device_seconds(record)
    assert measured_rates(frame, side_by_side=4)[("resnet20", False)] == pytest.approx(expected)
    assert measured_rates(_frame([row]), side_by_side=4)[("resnet20", False)] == pytest.approx(
        2 * 45000 / (25.0 / 4))  # without it: the record's count for the whole wall time


def test_a_grid_shorter_than_a_lease_still_takes_one():
    frame = _frame([{"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 0.01,
                     "cpu_model": "host", "teacher_id": teacher} for teacher in (None, "t")])
    text = render_device_costs(["smoke"], frame, jobs=4, lease_minutes=8.0)
    assert "about 1 lease of 8 training minutes" in text


def test_a_wall_time_shorter_than_the_epochs_adds_no_negative_remainder():
    """A resumed run's wall time can be its last session's alone, shorter than all its epochs."""
    from kdlib.results import device_seconds

    epochs_only = {"wall_time_s": 20.0, "side_by_side": 2,
                   "history": [{"seconds": 10.0}, {"seconds": 10.0}]}
    assert device_seconds({**epochs_only, "wall_time_s": 5.0}) == pytest.approx(
        device_seconds(epochs_only))


def test_a_gpu_run_without_a_recorded_gpu_is_named_by_its_cpu():
    """``device`` cuda but no ``gpu`` name: the record's processor is its host CPU, not
    "an None"."""
    frame = _frame([{"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 4.5,
                     "cpu_model": "Intel Xeon", "device": "cuda:0", "gpu": None}])
    assert list(processor(frame)) == ["Intel Xeon"]


def test_records_without_a_wall_time_are_not_rated_nor_named():
    """A record that took no measured time (0 or missing) has no rate: it neither adds its
    image-epochs for free nor makes its processor the newest."""
    row = {"model": "resnet20", "train_size": None, "epochs": 1}
    timed = {**row, "wall_time_s": 450.0, "cpu_model": "AMD EPYC",
             "created_at": "2026-12-01T10:00:00+00:00"}
    frame = _frame([timed, *({**row, "wall_time_s": w, "cpu_model": "laptop",
                              "created_at": "2026-12-05T10:00:00+00:00"} for w in (0.0, None))])
    assert machines(frame) == ["AMD EPYC"]
    assert measured_rates(frame) == measured_rates(_frame([timed])) \
        == {("resnet20", False): pytest.approx(45_000 / 450.0)}


def test_a_record_without_a_date_counts_as_the_oldest():
    """Records from before ``created_at`` existed are older than any dated one."""
    row = {"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 450.0}
    frame = _frame([{**row, "cpu_model": "AMD EPYC", "created_at": "2026-12-01T10:00:00+00:00"},
                    {**row, "cpu_model": "old box", "created_at": None}])
    assert machines(frame) == ["AMD EPYC", "old box"]


def test_a_grid_without_a_rate_still_counts_its_runs_and_image_epochs():
    rates = {("resnet20", False): 1e4, ("resnet20", True): 1e4}
    priced, unpriced = grid_cost("quick", rates), grid_cost("quick", {})
    assert unpriced["run_hours"] is None and priced["run_hours"] is not None
    assert {k: v for k, v in unpriced.items() if k not in ("run_hours", "basis")} \
        == {k: v for k, v in priced.items() if k not in ("run_hours", "basis")}


def _rows(text: str) -> dict[str, list[str]]:
    return {cells[1].strip(): [c.strip() for c in cells[1:-1]]
            for cells in (line.split("|") for line in text.splitlines() if line.startswith("| `"))}


def test_the_table_states_amounts_in_millions_from_one_million_and_short_grids_in_minutes():
    """SqueezeNet's quick grid (1 to 10 million image-epochs) is in millions, the smoke grid
    (under a million) in full; a grid of under an hour is in run-minutes, and SqueezeNet without
    records of its own says that it borrowed ResNet-20's rate."""
    frame = _frame([{"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 4.5,
                     "cpu_model": "host", "created_at": "2026-12-03T10:00:00+00:00",
                     "teacher_id": teacher} for teacher in (None, "t")])  # 10,000 a second
    rates = {("resnet20", False): 1e4, ("resnet20", True): 1e4}
    squeeze, smoke = grid_cost("quick_squeezenet", rates), grid_cost("smoke", rates)
    assert 1e6 <= squeeze["image_epochs"] < 1e7 and smoke["image_epochs"] < 1e6
    assert smoke["run_hours"] < 1
    rows = _rows(render_costs(["quick_squeezenet", "smoke"], frame))
    assert f"{squeeze['image_epochs'] / 1e6:,.2f} M" in rows["`quick_squeezenet`"]
    assert f"{smoke['image_epochs']:,}" in rows["`smoke`"]
    assert f"{smoke['run_hours'] * 60:.1f} run-minutes" in rows["`smoke`"][4]
    assert f"ResNet-20's rate / {SQUEEZENET_TIME_RATIO}" in rows["`quick_squeezenet`"][4]
    assert "ResNet-20's rate" not in rows["`smoke`"][4]


def test_without_records_the_rates_are_none_yet():
    assert render_costs(["quick"], pd.DataFrame()).endswith(
        "measured by the committed records: none yet.")


def test_a_one_seed_grid_states_no_share_of_a_seed_on_the_device():
    frame = _frame([{"model": "resnet20", "train_size": None, "epochs": 1, "wall_time_s": 0.01,
                     "cpu_model": "host", "teacher_id": teacher} for teacher in (None, "t")])
    text = render_device_costs(["smoke"], frame, jobs=4, lease_minutes=8.0)
    assert "a seed" not in text and "h of the device, about 1 lease" in text
