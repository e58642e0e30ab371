"""torch.compile's part of a GPU benchmark: do the compiled quantizers keep every level exact,
and how fast do compiled processes run side by side. The check compiles for real here (the
CPU's C++ backend, seconds); on a GPU the lease runs it with Triton."""
import torch

from kdlib.bench import render
from kdlib.bench.compiled import check_levels, measure_compiled


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

    def side_by_side(images, labels, *, jobs, variant, **_):
        assert variant == "kd_w4_compile" and tuple(jobs) == (4,)
        return {"variant": variant, "seconds": 1.0, "best_jobs": 4,
                "by_jobs": {"4": {"images_per_s": 30000.0, "per_process": [7500.0] * 4}}}

    monkeypatch.setattr(concurrent, "concurrent_throughput", side_by_side)
    ctx = SimpleNamespace(device=torch.device("cpu"), images=torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                          labels=torch.zeros(2, dtype=torch.int64))
    part = measure_compiled(ctx, 4, seconds=1.0, preset="gpu", model="resnet20", log=print,
                            compile_fn=lambda fn: fn)
    part["levels"]["by_bits"] = dict(sorted(part["levels"]["by_bits"].items()))  # as JSON stores it
    line = render._compiled_line(part)
    assert "every quantizer level exact yes at 2, 4, 8, 16 bits" in line  # the default widths
    assert "4 at once: 30000 img/s" in line
    broken = measure_compiled(ctx, 4, seconds=1.0, preset="gpu", model="resnet20", log=print,
                              compile_fn=one_ulp_up)
    assert "exact **no**" in render._compiled_line(broken)
    failing = {"levels": {"error": "BackendCompilerFailed: no C compiler"},
               "concurrency": {"error": "RuntimeError: 4 concurrent processes failed"}}
    assert "not checked (BackendCompilerFailed" in render._compiled_line(failing)
    assert "not measured (RuntimeError" in render._compiled_line(failing)
