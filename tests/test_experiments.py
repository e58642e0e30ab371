"""Pipelines on the smoke preset with real data: planning errors, records, skipping, resuming."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import committed_records

from kdlib import experiments
from kdlib.results import TIMING_FIELDS, load_results, record_path

# The smallest real-data grid that still exercises everything: ResNet-8, 100 images per split.
TINY = {"train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 50}
RECORD_FIELDS = {"run_id", "config", "metrics", "history", "wall_time_s", "images_per_s", "device",
                 "versions", "git_commit", "host", "model_size", "created_at",
                 "cpu_model", "packed_bytes"}
CONFIG_FIELDS = {"preset", "seed", "method", "w_bits", "a_bits", "teacher_id", "init_id",
                 "epochs", "lr", "kd_temperature", "kd_alpha", "quantizer", "model"}
METRICS = {"best_epoch", "best_val_top1", "best_val_top5", "test_top1", "test_top5",
           "final_test_top1", "final_test_top5"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(chain=[32, 8, 16]), "is not descending"),
    (dict(chain=[32, 32, 8]), "is not descending"),
    (dict(chain=[16, 8, 4]), "does not start at 32"),
    (dict(chain=[32]), "at least two links"),
    (dict(chain=[32, 0]), "w_bits=0 is not supported"),
    (dict(seeds=[]), r"seeds=\[\] is empty"),
    (dict(methods=["individual", "distill"]), "method='distill' is unknown"),
    (dict(model="resnet21"), "model='resnet21' is unknown"),
    (dict(overrides={"kd_alpha": 2.0}), "kd_alpha=2.0 is invalid"),
    (dict(preset="fast"), "preset='fast' is unknown"),
    (dict(chain=[32, 8, "4/16"]), "is not descending"),
    (dict(chain=["32/8", 4]), "does not start at 32"),
    (dict(seeds=[-1]), "seed -1 is invalid"),
    (dict(seeds=[True]), "seed True is invalid"),
    (dict(seeds=[0, 0]), r"seeds=\[0, 0\] has duplicates"),
    (dict(methods=["finetune", "finetune"]), "has duplicates"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        experiments.run_grid(results_dir=tmp_path / "res", data_dir=tmp_path / "nodata", **kwargs)
    assert not (tmp_path / "res").exists()


def test_missing_data_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nodata")):
        experiments.run_teacher(results_dir=tmp_path / "res", data_dir=tmp_path / "nodata",
                                overrides={"epochs": 1})
    assert not (tmp_path / "res").exists()


def test_plans_wire_teachers_and_inits():
    chain = experiments.plan_ta_chain("smoke", "resnet8", 0, [32, 8, 2, 1])
    assert [(c.method, c.w_bits) for c in chain] == [("teacher", 32), ("ta_chain", 8),
                                                     ("ta_chain", 2), ("ta_chain", 1)]
    for prev, link in zip(chain, chain[1:]):
        assert link.teacher_id == link.init_id == prev.run_id()
    students = experiments.plan_students("smoke", "resnet8", 3,
                                         ["individual", "finetune", "direct_kd"], [4, "2/8"])
    teacher = students[0]
    by = {(c.method, c.w_bits, c.a_bits): c for c in students[1:]}
    assert by[("individual", 4, 4)].init_id is None and by[("individual", 4, 4)].teacher_id is None
    assert by[("finetune", 2, 8)].init_id == teacher.run_id() \
        and by[("finetune", 2, 8)].teacher_id is None
    assert by[("direct_kd", 4, 4)].init_id == by[("direct_kd", 4, 4)].teacher_id == teacher.run_id()
    assert all(c.seed == 3 for c in students)
    # individual trains on the teacher's schedule (the fair trained-alone baseline), every other
    # student on a link's: in `quick` 8 epochs at lr 0.2 with a warm-up epoch against 1 at 0.05
    quick = experiments.plan_students("quick", "resnet20", 0, ["individual", "direct_kd"], [4])
    schedule = lambda c: (c.epochs, c.lr, c.warmup_epochs)  # noqa: E731
    assert schedule(quick[1]) == schedule(quick[0]) == (8, 0.2, 1)
    assert schedule(quick[2]) == (1, 0.05, 0)
    # the seed-s chain hangs off the seed-s teacher
    other = experiments.plan_ta_chain("smoke", "resnet8", 1, [32, 8])
    assert other[1].teacher_id == other[0].run_id() != chain[0].run_id()


def test_a_run_started_from_an_alias_is_the_same_training_as_one_started_from_its_original():
    """ta_chain's and direct_kd's 8-bit runs are one training (alias); two 4-bit runs that
    differ only in which of the two names they start from are then one training too."""
    from kdlib.presets import build_config
    from kdlib.trained import TrainedIndex

    teacher = experiments.plan_teacher("smoke", "resnet8", 0)

    def link(method, start):
        bits = 8 if start is teacher else 4
        return build_config("smoke", "resnet8", overrides={
            "method": method, "w_bits": bits, "a_bits": bits, "seed": 0,
            "teacher_id": teacher.run_id(), "init_id": start.run_id()})

    index = TrainedIndex()
    chain8, direct8 = link("ta_chain", teacher), link("direct_kd", teacher)
    assert index.claim(chain8) == chain8.run_id() and index.claim(direct8) == chain8.run_id()
    from_chain, from_direct = link("progressive_kd32", chain8), link("direct_kd", direct8)
    assert from_chain.init_id != from_direct.init_id
    assert index.claim(from_chain) == from_chain.run_id()
    assert index.claim(from_direct) == from_chain.run_id()


def test_the_index_of_a_results_folder_knows_its_trainings_and_aliases(tmp_path):
    """A results folder's records say which run trained each key (the first record of a key:
    records are read in run-id order) and which runs are aliases; a student of an alias teacher
    is then the same training as one of its original. Records older than training keys are
    left out."""
    from kdlib.presets import build_config
    from kdlib.results import runs_dir
    from kdlib.trained import TrainedIndex

    teacher = experiments.plan_teacher("smoke", "resnet8", 0)

    def link(method, teacher_id):
        return build_config("smoke", "resnet8", overrides={
            "method": method, "w_bits": 8, "a_bits": 8, "seed": 0,
            "teacher_id": teacher_id, "init_id": teacher.run_id()})

    chain8, direct8 = link("ta_chain", teacher.run_id()), link("direct_kd", teacher.run_id())
    key = TrainedIndex().key(chain8)
    assert chain8.run_id() < "zz-later"
    folder = runs_dir(tmp_path)
    folder.mkdir(parents=True)
    for record in ({"run_id": chain8.run_id(), "training_key": key},
                   {"run_id": "zz-later", "training_key": key},
                   {"run_id": "teacher-copy", "same_run_as": teacher.run_id()},
                   {"run_id": "untracked"}):
        (folder / f"{record['run_id']}.json").write_text(json.dumps({**record, "config": {}}))
    index = TrainedIndex(tmp_path)
    assert index.claim(direct8) == chain8.run_id()
    assert index.key(link("direct_kd", "teacher-copy")) == index.key(direct8)
    assert index.key(link("direct_kd", "another-teacher")) != index.key(direct8)


@pytest.mark.realdata
@pytest.mark.slow
def test_whole_grid_records_and_rerun_skips(real_data_root, tmp_path, monkeypatch):
    records = experiments.run_grid(preset="smoke", model="resnet8", chain=[32, 8, 1], seeds=[0],
                                   data_dir=real_data_root, results_dir=tmp_path, overrides=TINY,
                                   progress=False)
    # teacher + 3 chain methods x 2 links + 4 student methods x 2 bit widths
    assert len(records) == 15
    # At the first link (8 bits) ta_chain, direct_kd, progressive_kd32 and direct_kd_matched
    # are one training (teacher init, teacher distils, one link's epochs), and progressive is
    # finetune (planned first, so finetune points to it): trained once, recorded under every
    # name, marked as the same run.
    same = {(r["config"]["method"], r["config"]["w_bits"]): r.get("same_run_as") for r in records}
    trained = {r["run_id"]: r for r in records if not r.get("same_run_as")}
    assert len(trained) == 11
    chain8 = next(r for r in records
                  if r["config"]["method"] == "ta_chain" and r["config"]["w_bits"] == 8)
    for method in ("direct_kd", "progressive_kd32", "direct_kd_matched"):
        assert same[(method, 8)] == chain8["run_id"]
    assert trained[same[("finetune", 8)]]["config"]["method"] == "progressive"
    assert all(v is None for (m, b), v in same.items() if b == 1)
    by_name = {(r["config"]["method"], r["config"]["w_bits"]): r for r in records}
    assert by_name[("direct_kd_matched", 1)]["config"]["epochs"] \
        == 2 * by_name[("direct_kd", 1)]["config"]["epochs"]
    for rec in records:
        stored = json.loads(record_path(tmp_path, rec["run_id"]).read_text())
        assert RECORD_FIELDS <= set(stored), RECORD_FIELDS - set(stored)
        assert CONFIG_FIELDS <= set(stored["config"]) and METRICS <= set(stored["metrics"])
        assert len(stored["history"]) == stored["config"]["epochs"]
        assert 0 <= stored["metrics"]["test_top1"] <= 100
        packed = tmp_path / "models" / f"{stored.get('same_run_as') or stored['run_id']}.packed"
        assert stored["packed_bytes"] == packed.stat().st_size
    frame = load_results(tmp_path)
    assert set(frame["method"]) == {"teacher", "ta_chain", "progressive", "progressive_kd32",
                                    "individual", "finetune", "direct_kd", "direct_kd_matched"}
    assert sorted(frame.loc[frame["method"] == "ta_chain", "w_bits"]) == [1, 8]
    # a re-run trains nothing, and needs no data (a clone shows its committed results without)
    monkeypatch.setattr(experiments, "fit", lambda *a, **k: pytest.fail("re-run trained a model"))
    monkeypatch.setattr(experiments, "load_splits",
                        lambda *a, **k: pytest.fail("re-run loaded the data"))
    again = experiments.run_grid(preset="smoke", model="resnet8", chain=[32, 8, 1],
                                 data_dir=real_data_root, results_dir=tmp_path, overrides=TINY,
                                 progress=False)
    assert [r["run_id"] for r in again] == [r["run_id"] for r in records]


def without_timing(history):
    """History rows without their wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS}
            for row in history]


@pytest.mark.realdata
@pytest.mark.slow
def test_two_seeds_give_two_chains(real_data_root, tmp_path):
    records = experiments.run_ta_chain(preset="smoke", model="resnet8", chain=[32, 4], seeds=[0, 1],
                                       methods=["ta_chain"],
                                       data_dir=real_data_root, results_dir=tmp_path,
                                       overrides=TINY, progress=False)
    assert [(r["config"]["method"], r["config"]["seed"]) for r in records] == [
        ("teacher", 0), ("ta_chain", 0), ("teacher", 1), ("ta_chain", 1)]
    assert records[1]["config"]["teacher_id"] == records[0]["run_id"]
    assert records[3]["config"]["teacher_id"] == records[2]["run_id"]
    # the seed changes the training itself, not only the wall-clock fields of the history
    assert without_timing(records[0]["history"]) != without_timing(records[2]["history"])


CHAIN_SCRIPT = """
import sys
from kdlib import experiments
experiments.run_ta_chain(preset="smoke", model="resnet8", chain=[32, 8, 1], methods=["ta_chain"],
                         data_dir=sys.argv[1], results_dir=sys.argv[2], overrides={overrides!r},
                         progress=False)
"""


@pytest.mark.realdata
@pytest.mark.slow
def test_killed_chain_resumes_to_the_same_records(real_data_root, tmp_path):
    overrides = {**TINY, "epochs": 2}
    script = tmp_path / "chain.py"
    script.write_text(CHAIN_SCRIPT.format(overrides=overrides))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, str(script), str(real_data_root), str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "runs").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the teacher is done, the first link is under way
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (killed / "runs").glob("*.json")}
    assert 1 <= len(done_before) < 3
    subprocess.run([sys.executable, str(script), str(real_data_root), str(killed)], env=env,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(script), str(real_data_root), str(clean)], env=env,
                   check=True, capture_output=True)
    for name, mtime in done_before.items():
        assert (killed / "runs" / name).stat().st_mtime_ns == mtime, "finished run was retrained"
    a, b = load_results(killed), load_results(clean)
    cols = ["run_id", "test_top1", "test_top5", "final_test_top1", "best_val_top1", "best_epoch"]
    assert len(a) == 3
    assert a[cols].sort_values("run_id").values.tolist() \
        == b[cols].sort_values("run_id").values.tolist()


def test_a_record_without_its_weights_says_why_and_what_to_do(tmp_path):
    from kdlib.results import save_record

    cfg = experiments.plan_teacher("smoke", "resnet8", 0)
    save_record(tmp_path, {"run_id": cfg.run_id(), "config": cfg.to_dict(), "metrics": {},
                           "history": []})
    with pytest.raises(FileNotFoundError,
                       match="has a record but no weights file .*delete the record"):
        experiments.load_trained_model(tmp_path, cfg.run_id())
    with pytest.raises(FileNotFoundError, match="no finished record"):
        experiments.load_trained_model(tmp_path, "resnet8-teacher-w32a32-s9-0000000000")


@pytest.mark.realdata
@pytest.mark.slow
def test_a_new_machine_distils_from_the_committed_packed_teacher(real_data_root, tmp_path):
    """Checkpoints are not committed; a 32-bit parent's packed file (all tensors raw) stands in
    for them bit for bit, so a student trained on a fresh clone is the student trained here."""
    import shutil

    import torch

    from kdlib.results import weights_path

    kept, fresh = tmp_path / "kept", tmp_path / "fresh"
    chain = experiments.run_ta_chain(preset="smoke", model="resnet8", chain=[32, 8],
                                     methods=["ta_chain"],
                                     data_dir=real_data_root, results_dir=kept, overrides=TINY,
                                     progress=False)
    teacher_id, link_id = chain[0]["run_id"], chain[1]["run_id"]
    shutil.copytree(kept, fresh, ignore=shutil.ignore_patterns("checkpoints"))
    trained = torch.load(weights_path(kept, teacher_id), weights_only=True)
    rebuilt = experiments.load_trained_model(fresh, teacher_id).state_dict()
    assert trained.keys() == rebuilt.keys()
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    # an 8-bit link's packed file has codes, not the latent weights a next link starts from
    with pytest.raises(FileNotFoundError, match="keeps only the quantized weights"):
        experiments.load_trained_model(fresh, link_id)
    students = {}
    for folder in (kept, fresh):
        records = experiments.run_students(preset="smoke", model="resnet8", methods=["direct_kd"],
                                           bits=[4], data_dir=real_data_root, results_dir=folder,
                                           overrides=TINY, progress=False)
        students[folder] = [without_timing(r["history"]) for r in records
                            if r["config"]["w_bits"] == 4]
    assert students[kept] == students[fresh] and students[kept]


def test_progressive_kd32_links_learn_from_the_chain_head_and_start_from_the_link_above():
    from kdlib.experiments import plan_chain

    plan = plan_chain("smoke", "resnet8", 0, [32, 8, 4, 1], method="progressive_kd32")
    head, links = plan[0], plan[1:]
    assert head.method == "teacher" and len(links) == 3
    assert all(link.teacher_id == head.run_id() for link in links)
    assert [link.init_id for link in links] == [cfg.run_id() for cfg in plan[:-1]]


@pytest.mark.parametrize("field", ["seed", "method", "w_bits", "a_bits", "teacher_id", "init_id"])
def test_an_override_of_what_the_plan_sets_is_refused_not_ignored(field):
    from kdlib.experiments import plan_grid

    with pytest.raises(ValueError, match=f"overrides name \\['{field}'\\], which this run's own"):
        plan_grid(preset="smoke", model="resnet8", overrides={field: 3})
    assert {cfg.epochs for cfg in plan_grid(preset="smoke", model="resnet8", chain=[32, 8],
                                            overrides={"epochs": 3})} == {3}


def test_progressive_links_learn_from_nobody_and_start_from_the_link_above():
    """progressive is the chain's init path with cross-entropy alone: no link has a teacher."""
    plan = experiments.plan_chain("smoke", "resnet8", 0, [32, 8, 4, 1], method="progressive")
    head, links = plan[0], plan[1:]
    assert head.method == "teacher" and [link.method for link in links] == ["progressive"] * 3
    assert all(link.teacher_id is None for link in links)
    assert [link.init_id for link in links] == [cfg.run_id() for cfg in plan[:-1]]


def test_a_chain_under_a_trained_head_plans_only_its_links(tmp_path):
    """With a trained run at the chain's head no teacher is planned (it would train one that
    nothing uses); the head must have the first link's bits; it fixes one seed."""
    from kdlib.results import save_record

    head = experiments.plan_teacher("smoke", "resnet8", 0, {"epochs": 2})
    plan = experiments.plan_chain("smoke", "resnet8", 0, [32, 8, 4], head=head)
    assert [(c.method, c.w_bits) for c in plan] == [("ta_chain", 8), ("ta_chain", 4)]
    assert plan[0].teacher_id == plan[0].init_id == head.run_id()
    with pytest.raises(ValueError, match="has w32/a32 bits but the chain starts at 16/16"):
        experiments.plan_chain("smoke", "resnet8", 0, [16, 8], head=head)
    save_record(tmp_path, {"run_id": head.run_id(), "config": head.to_dict(), "metrics": {},
                           "history": []})
    with pytest.raises(ValueError, match="give a single seed"):
        experiments.run_ta_chain(preset="smoke", model="resnet8", seeds=[0, 1], chain=[32, 8],
                                 methods=["ta_chain"], teacher_run_id=head.run_id(),
                                 results_dir=tmp_path, data_dir=tmp_path / "nodata")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"{head.run_id()}.json"]


def test_students_are_planned_at_every_width_but_the_teachers_own():
    """Only 32/32 is the teacher; a 32-bit-weight, 8-bit-activation student is a student."""
    plan = experiments.plan_students("smoke", "resnet8", 0, ["finetune"], [32, "32/8", 4])
    assert [(c.method, c.w_bits, c.a_bits) for c in plan] == [
        ("teacher", 32, 32), ("finetune", 32, 8), ("finetune", 4, 4)]
    with pytest.raises(ValueError, match="has no student width"):
        experiments.plan_students("smoke", "resnet8", 0, ["finetune"], [32])


def test_a_grid_plans_each_run_once_and_its_dependencies_first():
    plan = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[0, 1], chain=[32, 8, 1])
    ids = [cfg.run_id() for cfg in plan]
    assert len(ids) == len(set(ids))
    # per seed: teacher + 3 chain methods x 2 links + 4 student methods x 2 widths
    assert len(plan) == 2 * 15
    assert [cfg.seed for cfg in plan if cfg.method == "teacher"] == [0, 1]
    for i, cfg in enumerate(plan):
        for dep in (cfg.teacher_id, cfg.init_id):
            assert dep is None or dep in ids[:i], (cfg.method, cfg.w_bits)


def test_a_run_whose_training_is_recorded_under_another_name_copies_it(tmp_path, monkeypatch):
    """direct_kd at the first link is ta_chain's training: no training, a record of its own
    under its own id and config that names the run that trained it."""
    from kdlib.presets import build_config
    from kdlib.results import find_record, save_record
    from kdlib.trained import TrainedIndex

    teacher = experiments.plan_teacher("smoke", "resnet8", 0)

    def link(method):
        return build_config("smoke", "resnet8", overrides={
            "method": method, "w_bits": 8, "a_bits": 8, "seed": 0,
            "teacher_id": teacher.run_id(), "init_id": teacher.run_id()})

    chain8, direct8 = link("ta_chain"), link("direct_kd")
    save_record(tmp_path, {"run_id": chain8.run_id(), "config": chain8.to_dict(),
                           "training_key": TrainedIndex().key(chain8),
                           "metrics": {"test_top1": 12.5}, "history": []})
    monkeypatch.setattr(experiments, "fit", lambda *a, **k: pytest.fail("trained an alias"))
    record = experiments.train_run(direct8, None, tmp_path, progress=False)
    assert record == find_record(tmp_path, direct8.run_id())
    assert record["run_id"] == direct8.run_id() and record["config"]["method"] == "direct_kd"
    assert record["same_run_as"] == chain8.run_id() and record["metrics"] == {"test_top1": 12.5}
    assert experiments.done_line(direct8.run_id(), record).endswith(
        f"(same run as {chain8.run_id()})")


def test_under_a_budget_an_alias_costs_nothing_and_its_original_is_admitted(tmp_path):
    from kdlib.presets import build_config
    from kdlib.trained import TrainedIndex

    teacher = experiments.plan_teacher("smoke", "resnet8", 0)

    def link(method):
        return build_config("smoke", "resnet8", overrides={
            "method": method, "w_bits": 8, "a_bits": 8, "seed": 0,
            "teacher_id": teacher.run_id(), "init_id": teacher.run_id()})

    class Admits:
        def admit(self, cfg, epochs_done=0):
            return ("admitted", cfg.run_id(), epochs_done)

    chain8, direct8 = link("ta_chain"), link("direct_kd")
    index = TrainedIndex()
    index.claim(chain8)
    assert experiments.budget_admission(direct8, Admits(), index, tmp_path) is None
    assert experiments.budget_admission(chain8, Admits(), index, tmp_path) \
        == ("admitted", chain8.run_id(), 0)


def test_a_run_another_process_trains_says_that_it_waits(tmp_path, capsys):
    """A second pipeline reaching a run in training waits as long as that training lasts: it
    says so (with the lock's path) instead of looking hung; an uncontended lock says nothing."""
    from kdlib.results import checkpoint_path

    path = checkpoint_path(tmp_path, "r").with_suffix(".lock")
    path.parent.mkdir(parents=True)
    with subprocess.Popen(  # another process, training "r" for half a second
            [sys.executable, "-c", "import sys, time; from filelock import FileLock\n"
             "with FileLock(sys.argv[1]):\n print('held', flush=True); time.sleep(0.5)",
             str(path)], stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline().strip() == "held"
        with experiments._run_lock(tmp_path, "r"):
            assert holder.wait(timeout=10) == 0  # entered only once the other let go
    err = capsys.readouterr().err
    assert "r: another process is training it; waiting" in err and str(path) in err
    with experiments._run_lock(tmp_path, "r"):
        pass
    assert capsys.readouterr().err == ""


def test_every_committed_record_of_another_runs_training_copies_that_run_as_committed():
    """A `same_run_as` record is its run's results under a second name: everything but its id
    and config is that run's record. Two SqueezeNet aliases had copied a second, identical
    training of their run (same metrics, another commit and wall time), which the run-hours and
    "trained once" under the tables did not count."""
    checked = 0
    for path in committed_records():
        record = json.loads(path.read_text())
        if not record.get("same_run_as"):
            continue
        trained = json.loads(record_path(path.parent.parent, record["same_run_as"]).read_text())
        own = {"run_id", "config", "same_run_as"}
        assert {k: v for k, v in record.items() if k not in own} \
            == {k: v for k, v in trained.items() if k not in own}, path.name
        checked += 1
    assert checked >= 50
