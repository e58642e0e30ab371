"""k training processes side by side (the GPU benchmark's question "do runs at once pay?"),
run here on the CPU with tiny steps; and the choice of how many to run at once."""
import pytest
import torch

from kdlib.bench.concurrent import best_jobs, concurrent_throughput


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
    assert result["best_jobs"] in (1, 2)


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
])
def test_best_jobs_adds_a_process_only_for_ten_percent_more(rates, expected):
    assert best_jobs({k: {"images_per_s": v} for k, v in rates.items()}) == expected
