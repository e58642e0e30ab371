"""The grid on a real local Ray cluster (2 CPUs): same run ids and, on CPU, the same records as
the serial executor; a run whose worker is killed mid-training is retried by Ray and resumes
from its checkpoint to the uninterrupted run's record. Without Ray, --executor ray fails at once.

Smoke preset on real data: ResNet-8, 200 training images, one thread per run.
"""
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from kdlib import cli, experiments
from kdlib.executors import check_resources, execute_ray
from kdlib.run_order import dependency_schedule
from kdlib.results import (TIMING_FIELDS, checkpoint_path, find_record, load_records,
                           save_record)

TINY = {"train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 50}
# teacher, ta_chain and progressive along 32 -> 4 -> 1, finetune and direct_kd at 4 and 1 bits:
# direct_kd@4 is ta_chain@4's training and finetune@4 is progressive@4's (recorded as aliases)
GRID = dict(preset="smoke", model="resnet8", seeds=[0], chain=[32, 4, 1],
            chain_methods=["ta_chain", "progressive"], methods=["finetune", "direct_kd"],
            overrides=TINY)
GRID_ARGS = ["--preset", "smoke", "--model", "resnet8", "--seeds", "0", "--chain", "32", "4", "1",
             "--chain-methods", "ta_chain", "progressive", "--methods", "finetune", "direct_kd",
             *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance (head + 2 CPUs) for the module; shut down at its end."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def comparable(record: dict) -> dict:
    """A record without what differs between any two trainings: times, host, dates."""
    return {"run_id": record["run_id"], "config": record["config"], "metrics": record["metrics"],
            "same_run_as": record.get("same_run_as"), "training_key": record.get("training_key"),
            "history": [{k: v for k, v in row.items() if k not in TIMING_FIELDS}
                        for row in record["history"]]}


def test_schedule_waits_for_teacher_init_and_the_run_that_trains_an_alias(tmp_path):
    plan = experiments.plan_grid(**GRID)
    schedule = dependency_schedule(plan, tmp_path)
    name = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    waits = {name[cfg.run_id()]: sorted(name[d] for d in after) for cfg, after in schedule}
    assert waits == {
        ("teacher", 32): [],
        ("ta_chain", 4): [("teacher", 32)],
        ("ta_chain", 1): [("ta_chain", 4)],
        ("progressive", 4): [("teacher", 32)],
        ("progressive", 1): [("progressive", 4)],
        ("finetune", 4): [("progressive", 4), ("teacher", 32)],
        ("finetune", 1): [("teacher", 32)],
        ("direct_kd", 4): [("ta_chain", 4), ("teacher", 32)],
        ("direct_kd", 1): [("teacher", 32)],
    }


def test_ray_is_handed_what_other_runs_wait_for_first(tmp_path, monkeypatch):
    """The tasks go to Ray in submission_order's order without a budget (each after what it
    waits for, then the longest first): the chains' links before finetune and direct_kd at 1
    bit, which nothing waits for; `individual` (the teacher's 2 epochs) before those 1-epoch
    runs."""
    from kdlib import executors
    from kdlib.run_order import submission_order

    submitted = []

    class FakeRemote:
        def options(self, name, **_):
            submitted.append(name.removeprefix("train "))
            return self

        def remote(self, *args):
            return submitted[-1]

    class FakeRay:
        is_initialized = staticmethod(lambda: True)  # an instance of the caller's: not started
        remote = staticmethod(lambda fn: FakeRemote())

    monkeypatch.setattr(executors, "import_ray", lambda: FakeRay)
    monkeypatch.setattr(executors, "_wait_for_all", lambda ray, refs, log, results_dir: None)
    plan = experiments.plan_grid(**{**GRID, "methods": ["finetune", "direct_kd", "individual"]})
    execute_ray(plan, results_dir=tmp_path, log=lambda _: None)
    assert submitted == [cfg.run_id() for cfg, _ in submission_order(plan, tmp_path,
                                                                      longest_first=True)]
    by_id = {cfg.run_id(): (cfg.method, cfg.w_bits) for cfg in plan}
    name = [by_id[run_id] for run_id in submitted]
    assert name.index(("ta_chain", 1)) < name.index(("finetune", 1))
    assert name.index(("individual", 1)) < name.index(("finetune", 1))
    planned = [cfg.run_id() for cfg, _ in dependency_schedule(plan, tmp_path)]
    assert submitted != planned and sorted(submitted) == sorted(planned)


def test_each_finished_ray_task_is_logged_as_the_other_executors_log_it(tmp_path):
    """`[k/n] done <run> (N s)`, or which run an alias's training is, from the record the
    task wrote (a task returns its run id)."""
    from kdlib import executors

    save_record(tmp_path, {"run_id": "t", "config": {}, "metrics": {}, "history": [{}],
                           "wall_time_s": 12.4})
    save_record(tmp_path, {"run_id": "a", "config": {}, "metrics": {}, "history": [{}],
                           "wall_time_s": 12.4, "same_run_as": "t"})

    class FakeRay:
        wait = staticmethod(lambda refs, num_returns: ([refs[0]], refs[1:]))
        get = staticmethod(lambda ref: ref)  # what _train_task returns: the run id

    lines = []
    executors._wait_for_all(FakeRay, {"t": "t", "a": "a"}, lines.append, str(tmp_path))
    assert lines == ["[1/2] done t (12 s)", "[2/2] done a (same run as t)"]


def test_runs_that_reserve_no_gpu_are_handed_the_cpu_and_the_tasks_they_wait_for(tmp_path,
                                                                                  monkeypatch):
    """gpus_per_run=0: Ray leaves every GPU visible to the task, so the run is told to train on
    the CPU; each task gets the ObjectRefs of the tasks it waits for (Ray starts it after)."""
    from kdlib import executors

    handed = {}

    class FakeRemote:
        def options(self, name, **_):
            self.run_id = name.removeprefix("train ")
            return self

        def remote(self, config, data_dir, results_dir, device, threads, tensorboard, *after):
            handed[self.run_id] = (device, sorted(after))
            return f"ref of {self.run_id}"

    class FakeRay:
        is_initialized = staticmethod(lambda: True)
        remote = staticmethod(lambda fn: FakeRemote())

    monkeypatch.setattr(executors, "import_ray", lambda: FakeRay)
    monkeypatch.setattr(executors, "_wait_for_all", lambda ray, refs, log, results_dir: None)
    plan = experiments.plan_grid(**GRID)
    execute_ray(plan, results_dir=tmp_path, gpus_per_run=0, log=lambda _: None)
    assert handed == {cfg.run_id(): ("cpu", sorted(f"ref of {d}" for d in after))
                      for cfg, after in dependency_schedule(plan, tmp_path)}


def test_each_ray_task_reserves_what_the_call_asks_and_every_planned_record_is_returned(
        tmp_path, monkeypatch):
    """--address is the cluster joined (and left at the end), --cpus-per-run, --gpus-per-run
    and --max-retries reach every task (its CPUs are also its torch threads), a task reserving
    a GPU trains on the device asked for, in folders every node names alike, and a run that an
    earlier call trained is returned with the others, in plan order."""
    from kdlib import executors

    asked, handed = [], []

    class FakeRemote:
        def options(self, name, **options):
            asked.append(options)
            return self

        def remote(self, config, data_dir, results_dir, device, threads, tensorboard, *after):
            handed.append((data_dir, results_dir, device, threads, tensorboard))
            return "ref"

    class FakeRay:
        is_initialized = staticmethod(lambda: False)  # so this call starts (joins) Ray
        init = staticmethod(lambda **options: asked.append(("init", options)))
        shutdown = staticmethod(lambda: asked.append("shutdown"))
        remote = staticmethod(lambda fn: FakeRemote())

    monkeypatch.setattr(executors, "import_ray", lambda: FakeRay)
    monkeypatch.setattr(executors, "_wait_for_all", lambda ray, refs, log, results_dir: None)
    monkeypatch.chdir(tmp_path)  # folders named relative to here reach a task absolute
    plan = experiments.plan_grid(**GRID)
    teacher = plan[0]
    save_record(tmp_path / "r", {"run_id": teacher.run_id(), "config": teacher.to_dict(),
                                 "metrics": {}, "history": [{}]})
    records = execute_ray(plan, data_dir="data", results_dir="r", device="cuda", address="auto",
                          cpus_per_run=2, gpus_per_run=0.5, max_retries=1, tensorboard=False,
                          log=lambda _: None)
    tasks = len(plan) - 1
    assert asked == [("init", {"address": "auto"}),
                     *[{"num_cpus": 2, "num_gpus": 0.5, "max_retries": 1}] * tasks, "shutdown"]
    assert handed == [(str(tmp_path / "data"), str(tmp_path / "r"), "cuda", 2, False)] * tasks
    # the fake tasks wrote no record; the teacher's was there before
    assert [r and r["run_id"] for r in records] == [teacher.run_id()] + [None] * (len(plan) - 1)


def test_ray_is_handed_nothing_when_the_results_folder_cannot_be_written(tmp_path, monkeypatch):
    """Else every task would train for nothing and fail only when it writes its record."""
    from kdlib import executors

    def must_not_run(*args, **kwargs):
        raise AssertionError("a task was handed to Ray")

    class FakeRay:
        is_initialized = staticmethod(lambda: True)
        remote = staticmethod(must_not_run)

    monkeypatch.setattr(executors, "import_ray", lambda: FakeRay)
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="is not writable"):
        execute_ray(experiments.plan_grid(**GRID), results_dir=tmp_path / "file" / "r",
                    log=lambda _: None)


def test_a_failed_ray_task_is_logged_and_the_grid_fails_naming_it(tmp_path):
    """A task that raised (or whose teacher's task did) is a `[k/n] FAILED` line with the
    first line of its error; the others are reported; then GridRunError names every failure."""
    from types import SimpleNamespace

    from kdlib import executors

    save_record(tmp_path, {"run_id": "t", "config": {}, "metrics": {}, "history": [{}],
                           "wall_time_s": 12.4})

    class TaskError(Exception):  # a RayTaskError: the task's own exception as its cause
        def __init__(self, cause):
            super().__init__(f"ray task failed: {cause}")
            self.cause = cause

    def get(ref):
        if ref == "s":
            raise TaskError(FileNotFoundError("run t has no finished record\n(traceback)"))
        return ref

    fake_ray = SimpleNamespace(exceptions=SimpleNamespace(RayError=TaskError), get=get,
                               wait=lambda refs, num_returns: ([refs[0]], refs[1:]))
    lines = []
    with pytest.raises(executors.GridRunError) as failed:
        executors._wait_for_all(fake_ray, {"s": "s", "t": "t"}, lines.append, str(tmp_path))
    assert lines == ["[1/2] FAILED s: FileNotFoundError: run t has no finished record",
                     "[2/2] done t (12 s)"]
    assert str(failed.value) == \
        "1 of 2 runs failed on Ray: s: FileNotFoundError: run t has no finished record"


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_grid_on_ray_equals_the_serial_grid(ray_cluster, real_data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("KDLIB_TENSORBOARD", raising=False)
    serial = experiments.execute(experiments.plan_grid(**GRID), data_dir=real_data_root,
                                 results_dir=tmp_path / "serial", progress=False)
    # Ray is initialised in this process, so the command line's executor joins that cluster
    code = cli.main(["grid", *GRID_ARGS, "--executor", "ray", "--data-dir", str(real_data_root),
                     "--results-dir", str(tmp_path / "ray")])
    assert code == 0
    on_ray = sorted(load_records(tmp_path / "ray"), key=lambda r: r["run_id"])
    assert [comparable(r) for r in on_ray] == \
        sorted(map(comparable, serial), key=lambda r: r["run_id"])
    aliases = {r["config"]["method"]: r["same_run_as"] for r in on_ray if r.get("same_run_as")}
    assert set(aliases) == {"finetune", "direct_kd"} and len(on_ray) == 9
    # each trained run wrote its TensorBoard scalars; an alias trained nothing
    trained = {r["run_id"] for r in on_ray if not r.get("same_run_as")}
    assert {p.name for p in (tmp_path / "ray" / "tb").iterdir()} == trained


def _worker_pid(run_id: str) -> int | None:
    """The Ray worker running ``run_id``'s task: Ray titles it ``ray::<task name>``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(f"ray::train {run_id}"):
            return int(cmdline.parent.name)
    return None


@pytest.mark.realdata
@pytest.mark.slow
def test_killed_worker_is_retried_and_resumes_to_the_uninterrupted_record(ray_cluster,
                                                                          real_data_root, tmp_path):
    plan = [experiments.plan_teacher("smoke", "resnet8", 0, {**TINY, "epochs": 4})]
    run_id = plan[0].run_id()
    folder, ckpt = tmp_path / "killed", checkpoint_path(tmp_path / "killed", run_id)
    outcome = {}

    def drive():
        try:
            outcome["records"] = execute_ray(plan, data_dir=real_data_root, results_dir=folder,
                                             tensorboard=False, log=lambda m: None)
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and driver.is_alive():
        time.sleep(0.01)
    pid = _worker_pid(run_id)
    assert ckpt.exists() and pid is not None, "the run never reached its first checkpoint"
    os.kill(pid, 9)
    at_kill = torch.load(ckpt, weights_only=True)
    assert find_record(folder, run_id) is None and at_kill["epoch"] < 4, "the kill came too late"
    driver.join(timeout=180)
    assert not driver.is_alive() and "records" in outcome, outcome.get("error")
    record = outcome["records"][0]
    # resumed, not restarted: the epochs before the kill keep that session's wall-clock times
    done = at_kill["epoch"]
    assert [row["seconds"] for row in record["history"][:done]] == \
        [row["seconds"] for row in at_kill["history"]]
    clean = experiments.execute(plan, data_dir=real_data_root, results_dir=tmp_path / "clean",
                                progress=False)[0]
    assert comparable(record) == comparable(clean)
    assert not (folder / "tb").exists()  # tensorboard=False reached the worker


def test_executor_ray_without_ray_fails_at_once_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` now fails
    code = cli.main(["grid", *GRID_ARGS, "--executor", "ray", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "pip install -e '.[ray]'" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(cpus_per_run=0), "cpus_per_run=0"),
    (dict(gpus_per_run=-1.0), "gpus_per_run=-1.0"),
    (dict(gpus_per_run=1.5), "gpus_per_run=1.5"),
    (dict(max_retries=-1), "max_retries=-1"),
    (dict(device="cuda"), "--gpus-per-run"),
])
def test_resource_requests_ray_cannot_honour_are_refused(kwargs, needle):
    request = {"cpus_per_run": 1, "gpus_per_run": 0.0, "max_retries": 3, "device": None, **kwargs}
    with pytest.raises(ValueError, match=re.escape(needle)):
        check_resources(**request)
    check_resources(1, 0.5, 0, "cuda")  # half a GPU per run, no retries: fine
    check_resources(1, 2.0, 3, "cuda")  # two whole GPUs per run: fine
    check_resources(1, 0.0, 3, "cpu")  # training on the CPU reserves no GPU: fine
