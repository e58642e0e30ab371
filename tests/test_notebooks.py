"""The numbered notebooks headless: papermill with injected parameters, bad values, nbval."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import papermill
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TINY = {"train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 50}


def _execute(name, out_dir, **parameters):
    return papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"),
                                      str(out_dir / f"{name}.ipynb"),
                                      parameters=parameters, cwd=str(NOTEBOOKS), progress_bar=False,
                                      kernel_name="python3")


@pytest.mark.realdata
@pytest.mark.slow
def test_notebooks_01_to_04_with_injected_parameters(real_data_root, tmp_path):
    results = tmp_path / "results"
    common = dict(preset="smoke", model="resnet8", seeds=[0], data_dir=str(real_data_root),
                  results_dir=str(results), overrides=TINY)
    _execute("01_baseline", tmp_path, **common)
    _execute("02_ta_chain", tmp_path, chain=[32, 4, 1], methods=["ta_chain", "progressive_kd32"],
             **common)
    _execute("03_individual", tmp_path, bits=[4, 1], methods=["individual", "direct_kd"], **common)
    executed = _execute("04_results", tmp_path, preset="smoke", results_dir=str(results))
    shown = [o.get("data", {}).get("text/markdown", "") for c in executed["cells"]
             for o in c.get("outputs", [])]
    assert any("**The answer so far** (resnet8, preset `smoke`" in "".join(text) for text in shown)
    records = [json.loads(p.read_text()) for p in (results / "runs").glob("*.json")]
    assert len(records) == 1 + 2 * 2 + 2 * 2
    # the 4-bit links of both chain methods and direct_kd at 4 bits are one training
    assert sum(bool(r.get("same_run_as")) for r in records) == 2
    for figure in ("accuracy_vs_bits", "gain_over_individual", "chain_curves", "accuracy_vs_size",
                   "chain_contrasts"):
        assert (results / "figures" / f"{figure}.png").stat().st_size > 10_000
    header, *rows = (results / "summary.csv").read_text().splitlines()
    assert header.startswith("model,method,w_bits,a_bits,setting,mean,std,n")
    # teacher, 2 chain methods x 2 bits, 2 methods x 2 bits, then the one contrast both chains
    # allow (ta_chain − progressive_kd32) at 2 bit widths
    assert len(rows) == 1 + 4 + 4 + 2
    assert [r.split(",")[1] for r in rows[-2:]] == ["ta_chain − progressive_kd32"] * 2


@pytest.mark.parametrize("name, parameters, error", [
    ("02_ta_chain", {"chain": [32, 8, 16]}, "is not descending"),
    ("01_baseline", {"model": "resnet21"}, "model='resnet21' is unknown"),
    ("03_individual", {"methods": ["individual", "magic"]}, "method='magic' is unknown"),
    ("01_baseline", {"overrides": {"epochs": -1}}, "epochs=-1 is invalid"),
    ("01_baseline", {"data_dir": "/nonexistent/cifar"}, "/nonexistent/cifar"),
])
@pytest.mark.slow
def test_bad_injected_value_fails_with_message_and_writes_nothing(tmp_path, name,
                                                                  parameters, error):
    results = tmp_path / "results"
    with pytest.raises(papermill.PapermillExecutionError) as info:
        _execute(name, tmp_path, results_dir=str(results), **parameters)
    assert error in str(info.value.evalue)
    assert not (results / "runs").exists()


@pytest.mark.parametrize("name", ["01_baseline", "02_ta_chain", "03_individual"])
def test_a_notebook_opened_by_hand_trains_the_presets_model_and_names_every_preset(name):
    import ast

    from kdlib.presets import PRESETS, preset_model

    parameters = papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
    # "Run All" with preset = "quick_squeezenet" set by hand must not train a ResNet under it
    model = ast.literal_eval(parameters["model"]["default"]) or None
    assert all(preset_model(p, model) == PRESETS[p].model for p in PRESETS)
    assert all(p in parameters["preset"]["help"].split() for p in PRESETS)


@pytest.mark.realdata
@pytest.mark.slow
def test_nbval_regression_checks(real_data_root, tmp_path):
    """The committed notebooks, run as they are (smoke defaults), reproduce their checked
    outputs."""
    shutil.copytree(NOTEBOOKS, tmp_path / "notebooks",
                    ignore=shutil.ignore_patterns("*.py", ".ipynb*"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q",
                           "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "notebooks")],
                          capture_output=True, text=True, cwd=tmp_path)
    rerecord = ("\n(a notebook changed on purpose? re-record its checked outputs: "
                "jupyter nbconvert --to notebook --execute --inplace notebooks/NN_name.ipynb, "
                "as the README's 'Notebooks by hand' says)")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + rerecord
    assert " passed" in proc.stdout and "failed" not in proc.stdout
