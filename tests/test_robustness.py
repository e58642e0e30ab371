"""Robustness battery: bad input, hostile files, killed and concurrent runs.

Every failure must be one clear line on stderr, a non-zero exit, no partial file, and existing
records left byte-for-byte as they were.
"""
import contextlib
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlib.fake_data import write_fake_cifar100
from kdlib.results import load_results

ROOT = Path(__file__).resolve().parent.parent
TINY = {"train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 50}
TINY_ARGS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
EXISTING = '{"run_id": "old", "config": {"model": "resnet8"}, "metrics": {}, "history": []}\n'


def smoke_by_default(args):
    """The CLI defaults to the quick preset; these tests train the smoke one unless told."""
    if args and args[0] in ("train", "run") and "--preset" not in args:
        return (args[0], "--preset", "smoke", *args[1:])
    return args


def kdlib(*args, env=None, timeout=300):
    args = smoke_by_default(args)
    return subprocess.run([sys.executable, "-m", "kdlib", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def results(tmp_path):
    """A results folder that already holds one record, which no failure may touch."""
    folder = tmp_path / "results"
    (folder / "runs").mkdir(parents=True)
    (folder / "runs" / "old.json").write_text(EXISTING)
    return folder


def assert_clean_failure(proc, results, *needles, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]
    files = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert [f for f in files if not f.endswith(".lock")] == ["runs/old.json"]
    assert (results / "runs" / "old.json").read_text() == EXISTING


# --------------------------------------------------------------------------- invalid configuration
@pytest.mark.parametrize("args, needle", [
    (["--w-bits", "0"], "w_bits=0"), (["--w-bits", "33"], "w_bits=33"),
    (["--set", "w_bits=four"], "w_bits='four'"), (["--set", "a_bits=2.5"], "a_bits=2.5"),
    (["--model", "resnet21"], "model='resnet21'"), (["--method", "distill"], "method='distill'"),
    (["--set", "quantizer=xnor"], "quantizer='xnor'"), (["--preset", "huge"], "preset='huge'"),
    (["--set", "lr=-0.1"], "lr=-0.1"), (["--set", "epochs=-2"], "epochs=-2"),
    (["--set", "kd_alpha=1.2"], "kd_alpha=1.2"), (["--set", "kd_alpha=-0.5"], "kd_alpha=-0.5"),
    (["--set", "kd_temperature=0"], "kd_temperature=0"),
    (["--set", "no_such_field=1"], "no_such_field"),
])
@pytest.mark.slow
def test_cli_rejects_invalid_config(results, tmp_path, args, needle):
    proc = kdlib("train", *args, "--results-dir", str(results),
                 "--data-dir", str(tmp_path / "none"))
    assert_clean_failure(proc, results, needle)


@pytest.mark.parametrize("name, parameters, needle", [
    ("01_baseline", {"seeds": []}, "seeds=[] is empty"),
    ("01_baseline", {"preset": "huge"}, "preset='huge' is unknown"),
    ("01_baseline", {"overrides": {"kd_temperature": -1.0}}, "kd_temperature=-1.0"),
    ("01_baseline", {"overrides": {"lr": -1.0}}, "lr=-1.0"),
    ("01_baseline", {"overrides": {"quantizer": "xnor"}}, "quantizer='xnor'"),
    ("02_ta_chain", {"seeds": []}, "seeds=[] is empty"),
    ("03_individual", {"seeds": [1, 1]}, "seeds=[1, 1] has duplicates"),
    ("02_ta_chain", {"chain": [32, 16, 16, 8]}, "is not descending"),
    ("02_ta_chain", {"chain": [32, "four"]}, "'four'"),
    ("03_individual", {"bits": [0]}, "w_bits=0"),
    ("03_individual", {"bits": [33]}, "w_bits=33"),
    ("03_individual", {"overrides": {"kd_alpha": 1.5}}, "kd_alpha=1.5"),
])
@pytest.mark.slow
def test_notebooks_reject_invalid_parameters(results, tmp_path, name, parameters, needle):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as info:
        papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"),
                                   str(tmp_path / "out.ipynb"),
                                   parameters={"results_dir": str(results), **parameters},
                                   cwd=str(ROOT / "notebooks"), progress_bar=False,
                                   kernel_name="python3")
    assert needle in info.value.evalue
    assert sorted(p.name for p in results.rglob("*") if p.is_file()) == ["old.json"]


# --------------------------------------------------------------------------- bad data
def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _wrong_shape(path):
    with open(path, "rb") as handle:
        d = pickle.load(handle, encoding="bytes")
    d[b"data"] = d[b"data"][:, :1000]
    from kdlib.fake_data import write_pickle
    write_pickle(d, path)


def _bad_labels(path):
    with open(path, "rb") as handle:
        d = pickle.load(handle, encoding="bytes")
    d[b"fine_labels"] = [lab + 100 for lab in d[b"fine_labels"]]
    from kdlib.fake_data import write_pickle
    write_pickle(d, path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# needles are words of the error message, never part of the file path (".../cifar-100-python/train")
@pytest.mark.parametrize("damage, needle", [
    ("missing", "not found"), ("truncated", "truncated or corrupt"),
    ("shape", "'data' must have shape (N, 3072)"), ("labels", "is outside 0..99"),
    ("exploit", "refused to load global"),
])
@pytest.mark.slow
def test_cli_reports_bad_data_in_one_line(results, tmp_path, damage, needle):
    data = write_fake_cifar100(tmp_path / "data", n_train_per_class=3, n_test_per_class=1)
    train_file = data / "cifar-100-python" / "train"
    marker = tmp_path / "pwned"
    if damage == "missing":
        shutil.rmtree(data / "cifar-100-python")
    elif damage == "truncated":
        _truncate(train_file)
    elif damage == "shape":
        _wrong_shape(train_file)
    elif damage == "labels":
        _bad_labels(train_file)
    elif damage == "exploit":
        train_file.write_bytes(pickle.dumps({"data": _Exploit(marker)}, protocol=2))
    proc = kdlib("train", "--model", "resnet8", "--data-dir", str(data),
                 "--results-dir", str(results),
                 "--set", "train_size=100", "--set", "val_size=100", "--set", "test_size=100")
    named_file = str(data / "cifar-100-python") if damage == "missing" else str(train_file)
    assert_clean_failure(proc, results, needle, named_file)
    assert not marker.exists(), "the hostile pickle was executed"


# ------------------------------------------------------------------------- checkpoints and folders
@pytest.mark.realdata
@pytest.mark.slow
def test_corrupted_checkpoint_is_named_and_kept(real_data_root, results):
    from kdlib.presets import build_config
    from kdlib.results import checkpoint_path

    cfg = build_config("smoke", "resnet8", teacher=True,  # individual: the teacher's schedule
                       overrides={**TINY, "method": "individual"})
    ckpt = checkpoint_path(results, cfg.run_id())
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    proc = kdlib("train", "--model", "resnet8", "--data-dir", str(real_data_root),
                 "--results-dir", str(results), *TINY_ARGS)
    assert proc.returncode == 2 and "corrupted" in proc.stderr and str(ckpt) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert ckpt.read_bytes() == b"PK\x03\x04 not really a checkpoint"
    assert sorted(p.name for p in (results / "runs").iterdir()) == ["old.json"]


@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` unwritable, also for root (whose permission bits are not checked)."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p in [folder, *folder.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        return
    if subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without chattr +i: "
                    "cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)


@pytest.mark.slow
def test_read_only_results_folder(results, fake_data_root):
    with read_only(results):
        proc = kdlib("train", "--model", "resnet8", "--data-dir", str(fake_data_root),
                     "--results-dir", str(results), "--set", "train_size=100",
                     "--set", "val_size=100", "--set", "test_size=100")
    assert_clean_failure(proc, results, "is not writable", str(results))


# ---------------------------------------------------------------------- killed and concurrent runs
CHAIN_SCRIPT = """
import sys
from kdlib import experiments
experiments.run_ta_chain(preset="smoke", model="resnet8", chain={chain}, methods=["ta_chain"],
                         seeds=[{seed}], data_dir=sys.argv[1], results_dir=sys.argv[2],
                         overrides={overrides!r}, progress=False)
"""


def _chain_script(tmp_path, name, chain=(32, 8, 1), seed=0, epochs=3):
    script = tmp_path / f"{name}.py"
    script.write_text(CHAIN_SCRIPT.format(chain=list(chain), seed=seed,
                                          overrides={**TINY, "epochs": epochs}))
    return script


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _runs_with_checkpoint_but_no_record(folder):
    """Runs whose training was interrupted after at least one epoch."""
    run_ids = [p.name[: -len(".pt")] for p in (folder / "checkpoints").glob("*.pt")
               if not p.name.endswith(".weights.pt")]
    return sorted(r for r in run_ids if not (folder / "runs" / f"{r}.json").exists())


def _wait_for_mid_run_checkpoints(proc, folder, count, since_ns, timeout=180.0):
    """Block until ``proc`` has written ``count`` checkpoints after non-final epochs (each run then
    has epochs to go); return the last such epoch's duration in seconds."""
    import torch

    seen = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for path in (folder / "checkpoints").glob("*.pt"):
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if path.name.endswith(".weights.pt") or mtime < since_ns or seen.get(path) == mtime:
                continue
            seen[path] = mtime
            ckpt = torch.load(path, weights_only=True)
            if ckpt["epoch"] < ckpt["config"]["epochs"]:
                count -= 1
                if count == 0:
                    return ckpt["history"][-1]["seconds"]
        time.sleep(0.01)
    pytest.fail(f"the chain process {'exited' if proc.poll() is not None else 'hung'} before "
                f"writing {count} more mid-run checkpoint(s)")


@pytest.mark.realdata
@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(real_data_root, tmp_path):
    script = _chain_script(tmp_path, "chain")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    rng = random.Random(9)  # kills in the teacher's 3rd, link 1's 3rd and link 2's 2nd epoch
    for kill in range(3):
        since_ns = time.time_ns()
        proc = subprocess.Popen([sys.executable, str(script), str(real_data_root), str(killed)],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # random points in training, not in the torch import: after 1 or 2 non-final epochs of
        # this process, early in the next epoch (3 kills x 2 <= the chain's 6 non-final epochs)
        epoch_s = _wait_for_mid_run_checkpoints(proc, killed, rng.randint(1, 2), since_ns)
        time.sleep(rng.uniform(0.0, 0.4) * epoch_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _runs_with_checkpoint_but_no_record(killed), \
            f"kill {kill + 1} did not land mid-training"
    subprocess.run([sys.executable, str(script), str(real_data_root), str(killed)], env=_env(),
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(script), str(real_data_root), str(clean)], env=_env(),
                   check=True, capture_output=True)
    cols = ["run_id", "best_epoch", "best_val_top1", "test_top1", "test_top5", "final_test_top1"]
    a = load_results(killed)[cols].sort_values("run_id")
    b = load_results(clean)[cols].sort_values("run_id")
    assert len(a) == 3 and a.values.tolist() == b.values.tolist()
    import torch

    for run_id in a["run_id"]:
        wa = torch.load(killed / "checkpoints" / f"{run_id}.weights.pt", weights_only=True)
        wb = torch.load(clean / "checkpoints" / f"{run_id}.weights.pt", weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wb)
    assert not list(killed.rglob("*.tmp"))


@pytest.mark.realdata
@pytest.mark.slow
def test_two_pipelines_on_one_results_folder(real_data_root, tmp_path):
    shared = tmp_path / "shared"
    scripts = [_chain_script(tmp_path, "a", chain=(32, 8), epochs=1),
               _chain_script(tmp_path, "b", chain=(32, 4), epochs=1),
               _chain_script(tmp_path, "c", chain=(32, 2), seed=1, epochs=1)]
    procs = [subprocess.Popen([sys.executable, str(s), str(real_data_root), str(shared)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in scripts]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-1500:] for o in outputs]
    frame = load_results(shared)  # every record parses
    assert sorted(zip(frame["method"], frame["w_bits"], frame["seed"])) == [
        ("ta_chain", 2, 1), ("ta_chain", 4, 0), ("ta_chain", 8, 0), ("teacher", 32, 0),
        ("teacher", 32, 1)]
    # the seed-0 teacher, wanted by two pipelines, was trained once: the other waited and skipped it
    teacher0 = frame.loc[(frame["method"] == "teacher") & (frame["seed"] == 0), "run_id"].item()
    assert sum(f"skip {teacher0}" in out for out, _ in outputs[:2]) == 1
    assert not list(shared.rglob("*.tmp"))
