"""The guard every compiled run passes before it trains: its quantizers' compiled levels must be
exact on its device (kdlib.compile_check). The compiler is replaced here by the function itself
or by one whose output is an ulp off (the real check compiles for seconds a width: the slow test
in test_bench_compiled.py)."""
import logging
import subprocess
import sys

import pytest
import torch

import kdlib.compile_check as compile_check
from kdlib.compile_check import require_exact_levels, widths_to_check
from kdlib.models import create_model
from kdlib.presets import build_config


def one_ulp_up(fn):
    def run(x, w):
        return tuple(torch.nextafter(t, torch.full_like(t, 2.0)) for t in fn(x, w))
    return run


@pytest.fixture
def compiler(monkeypatch):
    """The compiler the check uses (identity: exact), its calls, and a fresh cache."""
    calls = []
    state = {"compile": lambda fn: fn}

    def compile_for_check(fn):
        calls.append(fn)
        return state["compile"](fn)

    monkeypatch.setattr(compile_check, "_checked", {})
    monkeypatch.setattr(compile_check, "compile_for_check", compile_for_check)
    state["calls"] = calls
    return state


def _model(w_bits, a_bits=None, quantizer="dorefa"):
    return create_model("resnet20", w_bits=w_bits, a_bits=w_bits if a_bits is None else a_bits,
                       quantizer=quantizer)


def test_the_widths_checked_are_those_of_every_quantized_layer_of_student_and_teacher():
    assert widths_to_check([_model(4), _model(32)]) == [4]
    assert widths_to_check([_model(2), _model(8, 4)]) == [2, 4, 8]
    assert widths_to_check([_model(1), _model(32)]) == []  # a sign and a division by 1
    with pytest.raises(ValueError, match="quantizer='lsq'.*set compile=False"):
        widths_to_check([_model(4, quantizer="lsq")])


def test_an_inexact_compiled_level_refuses_the_run_naming_the_fix(compiler):
    compiler["compile"] = one_ulp_up
    with pytest.raises(RuntimeError, match="4-bit quantizer levels exact on cpu.*compile=False"):
        require_exact_levels([_model(4)], "cpu")


def test_each_width_is_checked_once_a_process_and_device(compiler):
    require_exact_levels([_model(4), _model(32)], "cpu")
    require_exact_levels([_model(2), _model(4)], "cpu")
    assert len(compiler["calls"]) == 2  # 4 bits, then 2 bits
    compiler["compile"] = one_ulp_up  # a width found exact stays exact; a new one is checked
    require_exact_levels([_model(4)], "cpu")
    with pytest.raises(RuntimeError, match="8-bit"):
        require_exact_levels([_model(8)], "cpu")
    # a width found inexact stays refused, also behind an exact one in the same run
    with pytest.raises(RuntimeError, match="8-bit"):
        require_exact_levels([_model(4), _model(8)], "cpu")
    assert len(compiler["calls"]) == 3  # 4, 2 and 8 bits, each once


@pytest.mark.parametrize("exact", [True, False])
def test_a_compiled_trainer_is_built_only_where_the_levels_are_exact(compiler, monkeypatch, exact):
    from kdlib.step import make_trainer

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **_: compiled.append(module) or module)
    if not exact:
        compiler["compile"] = one_ulp_up
    cfg = build_config("smoke").replace(method="individual", w_bits=4, a_bits=4, compile=True)
    model = create_model("resnet20", w_bits=4, a_bits=4)
    if exact:
        trainer = make_trainer(model, cfg, device="cpu")
        assert compiled == [model] and trainer.forward is model
    else:
        with pytest.raises(RuntimeError, match="compile=False"):
            make_trainer(model, cfg, device="cpu")
        assert compiled == []
    uncompiled = make_trainer(create_model("resnet20", w_bits=4, a_bits=4),
                              cfg.replace(compile=False), device="cpu")
    assert uncompiled.forward is uncompiled.model  # no check, no compile
    assert len(compiler["calls"]) == 1


def _one_ulp_up_only(which):
    """A compiler whose activations or weights alone come out an ulp above the level."""
    def compile_fn(fn):
        def run(x, w):
            a, q = fn(x, w)
            if which == "activation":
                a = torch.nextafter(a, torch.full_like(a, 2.0))
            else:
                q = torch.nextafter(q, torch.full_like(q, 2.0))
            return a, q
        return run
    return compile_fn


@pytest.mark.parametrize("which", ["activation", "weight"])
def test_either_quantizer_inexact_alone_refuses_the_run(compiler, which):
    """A run trains both quantizers compiled: one inexact is enough to refuse it. The compiler
    given to the guard is the one checked (the default's, identity here, would pass)."""
    with pytest.raises(RuntimeError, match=f"'{which}_exact': False"):
        require_exact_levels([_model(4)], "cpu", compile_fn=_one_ulp_up_only(which))
    assert compiler["calls"] == []


def test_each_device_is_checked_on_its_own(monkeypatch):
    """A width found exact on one GPU says nothing of another's: the second is checked too."""
    checked = []

    def check_levels(device, bits, compile_fn=None):
        checked.append(str(device))
        exact = str(device) == "cuda:0"
        return {"by_bits": {str(b): {"activation_exact": exact, "weight_exact": exact}
                            for b in bits}}

    monkeypatch.setattr(compile_check, "_checked", {})
    monkeypatch.setattr(compile_check, "check_levels", check_levels)
    require_exact_levels([_model(4)], "cuda:0")
    with pytest.raises(RuntimeError, match="4-bit quantizer levels exact on cuda:1"):
        require_exact_levels([_model(4)], "cuda:1")
    assert checked == ["cuda:0", "cuda:1"]


def _one_ulp_up_at_weight_level(bits, level):
    """A compiler whose weights at one level alone come out an ulp above it."""
    from kdlib.export.codes import dequantize

    value = dequantize("dorefa", bits, torch.tensor([float(level)]), None)

    def compile_fn(fn):
        def run(x, w):
            a, q = fn(x, w)
            return a, torch.where(q == value, torch.nextafter(q, torch.full_like(q, 2.0)), q)
        return run
    return compile_fn


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_compiler_wrong_at_any_one_weight_level_is_caught(bits):
    """An approximate division errs at some k/n and not others: the check's weights must reach
    each level, both extremes included, or a run whose compiled weights are off at one level
    would train unrefused."""
    n = (1 << bits) - 1
    for level in range(n + 1):
        result = compile_check.check_levels("cpu", bits=(bits,),
                                            compile_fn=_one_ulp_up_at_weight_level(bits, level))
        assert not result["exact"] and not result["by_bits"][str(bits)]["weight_exact"], level


@pytest.mark.parametrize("bits", compile_check.CHECK_BITS)
def test_the_checks_weights_reach_every_level_of_each_width(bits):
    """Each level of each checked width, both extremes included, comes out of the eager
    quantizer on the check's weights: a compiled division off at any one of them is seen."""
    from kdlib.export.codes import levels_of
    from kdlib.quant import dorefa_weight

    weights = compile_check.check_weights(bits)
    levels = levels_of("dorefa", bits, dorefa_weight(weights, bits), None)
    assert torch.equal(torch.unique(levels), torch.arange(2 ** bits, dtype=levels.dtype))


def test_the_check_quantizes_the_same_weights_every_time():
    """Two checks of a width (two processes, two leases' benchmarks) test the same values, so
    their verdicts and counts compare."""
    seen = []

    def recording(fn):
        def run(x, w):
            seen.append(w.detach().clone())
            return fn(x, w)
        return run

    for _ in range(2):
        compile_check.check_levels("cpu", bits=(4,), compile_fn=recording)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


@pytest.mark.slow
def test_a_compiled_kd_grid_trains_end_to_end_here(fake_data_root, tmp_path):
    """`paper` compiles: a compiled teacher and a compiled 4-bit student distilled from it train,
    evaluate, save and record here as they do eager (the CPU's C++ backend; on a GPU, Triton),
    after the real level check. Numbers differ from eager's (other kernels): only that it runs
    and records what it ran."""
    from kdlib import experiments
    from kdlib.results import load_records

    plan = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[0], chain=[32, 4],
                                 chain_methods=["ta_chain"], methods=["direct_kd"],
                                 overrides={"compile": True, "epochs": 1})
    experiments.execute(plan, data_dir=fake_data_root, results_dir=tmp_path, progress=False)
    records = {r["run_id"]: r for r in load_records(tmp_path)}
    assert {cfg.run_id() for cfg in plan} <= set(records)
    trained = [r for r in records.values() if not r.get("same_run_as")]
    assert len(trained) == 2 and all(r["config"]["compile"] for r in trained)
    assert all(0.0 <= r["metrics"]["test_top1"] <= 100.0 for r in trained)
    checked = compile_check._checked.get(("cpu", 4)) or {}
    assert checked.get("activation_exact") and checked.get("weight_exact")  # the real check ran


def test_only_torchs_no_cuda_runtime_notice_is_dropped(caplog):
    """The cpp_extension logger's "No CUDA runtime is found" line is dropped (a compiled CPU
    run needs no CUDA); anything else that logger says still shows."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for %s", "c++")
    assert [r.getMessage() for r in caplog.records] == ["Error checking compiler version for c++"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="torch logs the notice only without CUDA")
def test_a_compile_on_a_machine_without_cuda_prints_no_cuda_notice():
    """End to end, in fresh processes: plain torch prints the notice at its first compile here
    (the control); once kdlib.compile_check is imported, as every compiled run does, it does
    not."""
    def first_compile(preamble: str) -> str:
        code = (f"{preamble}import torch\n"
                "torch.compile(lambda x: x * 2, dynamic=False)(torch.ones(2))\n")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, check=True).stderr

    if "No CUDA runtime is found" not in first_compile(""):
        pytest.skip("this torch build prints no CUDA-runtime notice here")
    assert "No CUDA runtime is found" not in first_compile("import kdlib.compile_check\n")
