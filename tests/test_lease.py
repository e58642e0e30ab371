"""A lent GPU's calls, rehearsed on the CPU: data packed in checked parts and reassembled,
the frontier weights carried, the device step (benchmark, budgeted grid, packed outputs) and
the unpacking here; and the very commands `lease prepare` prints, run in a shell, so that no
device minute goes to a typo.

Smoke preset, ResNet-8, on the generated stand-in of CIFAR-100 (no real data needed).
"""
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdlib import experiments, lease
from kdlib.lease import commands as lease_commands
from kdlib.results import (TIMING_FIELDS, checkpoint_path, load_records, note_paused,
                           packed_path, save_record, weights_path)

REPO = Path(__file__).resolve().parent.parent
TINY_BENCH = dict(variants=["fp32", "w4a4", "kd_w4"], windows=1, steps=1, warmup=1,
                  matmul_size=64, flops_probe_batch=2, concurrency=(1, 2),
                  concurrency_seconds=0.2)
GRID = dict(preset="smoke", model="resnet8", seeds=[0])


def fast(raw: bytes) -> bytes:
    import lzma
    return lzma.compress(raw, preset=0)


def comparable(record):
    return {"run_id": record["run_id"], "metrics": record["metrics"],
            "same_run_as": record.get("same_run_as"),
            "history": [{k: v for k, v in row.items() if k not in TIMING_FIELDS}
                        for row in record["history"]]}


def test_a_lease_with_nothing_to_train_is_refused_before_anything_is_packed(tmp_path):
    plan = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[0], chain=[32, 4],
                                 chain_methods=["ta_chain"], methods=["direct_kd"])
    results = tmp_path / "results" / "gpu"
    for cfg in plan[:-1]:
        save_record(results, {"run_id": cfg.run_id(), "config": cfg.to_dict(), "metrics": {},
                              "history": [{}]})
    lease.check_something_to_train(plan, results, "gpu")  # one run left: a lease has work
    last = plan[-1]
    save_record(results, {"run_id": last.run_id(), "config": last.to_dict(), "metrics": {},
                          "history": [{}]})
    with pytest.raises(ValueError, match=r"nothing for a lease to train: all 3 planned runs of "
                                         r"preset 'gpu' have records .* lease prepare --preset "
                                         r"paper"):
        lease.prepare(plan, data_root=tmp_path / "no-data", results_dir=results,
                      repo_root=tmp_path, minutes=9, jobs=1, preset="gpu")
    assert not (tmp_path / lease.LEASE_DIR).exists()  # refused before packing anything
    with pytest.raises(ValueError, match="add seeds"):
        lease.check_something_to_train(plan, results, "paper")


@pytest.mark.parametrize("step", ["prepare", "go"])
def test_the_steps_that_plan_a_grid_name_its_preset(step, capsys):
    """No default grid: gpu's is complete, and a default that pointed at it packed nothing."""
    from kdlib import cli

    with pytest.raises(SystemExit) as exit:
        cli.main(["lease", step, "--minutes", "9"])
    assert exit.value.code == 2
    assert "the following arguments are required: --preset" in capsys.readouterr().err


def test_store_takes_no_preset_it_would_not_use(tmp_path, capsys, monkeypatch):
    from kdlib import cli

    stored = []
    monkeypatch.setattr(lease, "store", lambda paths, call: stored.append((paths, call)))
    assert cli.main(["lease", "store", str(tmp_path / "part-1"), "--call", "1"]) == 0
    assert stored == [([tmp_path / "part-1"], 1)]
    with pytest.raises(SystemExit):
        cli.main(["lease", "store", str(tmp_path / "part-1"), "--preset", "gpu"])
    assert "unrecognized arguments: --preset gpu" in capsys.readouterr().err


def test_a_lease_longer_than_its_last_call_is_refused_before_anything_is_packed(tmp_path):
    plan = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[0], chain=[32, 4],
                                 chain_methods=["ta_chain"], methods=["direct_kd"])
    kwargs = dict(data_root=tmp_path / "no-data", results_dir=tmp_path / "results" / "smoke",
                  repo_root=tmp_path, jobs=1, preset="smoke")
    with pytest.raises(ValueError, match=r"--minutes 9.1: the last call's work would end past "
                                         r"its 600 s timeout; at most 9.00"):
        lease.prepare(plan, minutes=9.1, **kwargs)
    with pytest.raises(ValueError, match="at most 8.67"):  # a longer grace leaves less
        lease.prepare(plan, minutes=9.0, grace_s=40, **kwargs)
    assert not (tmp_path / lease.LEASE_DIR).exists()
    from kdlib.lease.prepare import device_commands

    finish, _ = device_commands(preset="smoke", model="resnet8", jobs=1, grid=None,
                                rel_results="results/smoke", bench_args=None, minutes=9.0)
    # 9 min + 20 s: interrupted at 560 s, killed at 575 s if it ignores that, pack ends by 600 s
    assert finish.startswith("{ timeout -s INT -k 15 560 ")
    # a hard limit one second later would end past the call's 600 s: refused, not started
    with pytest.raises(ValueError, match="past its 600 s timeout"):
        device_commands(preset="smoke", model="resnet8", jobs=1, grid=None,
                        rel_results="results/smoke", bench_args=None, minutes=9.0, grace_s=21)
    # a fraction of a second is never rounded up past the call's end: 540.54 s + 20 s, 560 s
    finish, _ = device_commands(preset="smoke", model="resnet8", jobs=1, grid=None,
                                rel_results="results/smoke", bench_args=None, minutes=9.009)
    assert finish.startswith("{ timeout -s INT -k 15 560 ")


def test_data_parts_reassemble_to_the_same_files(fake_data_root, tmp_path, monkeypatch):
    """The pixels travel as residuals (kdlib.lease.pixels): the device decodes them back, and
    refuses files its decoding did not bring back to the ones packed here (a grid on them
    would train a whole lease on wrong pixels)."""
    from kdlib.lease import device as lease_device
    from kdlib.lease.pixels import PIXEL_CODING

    manifest = lease.pack_data(fake_data_root, tmp_path / "lease", part_mib=0.2, compress=fast)
    assert manifest["coding"] == PIXEL_CODING and set(manifest["pixels"]) == {"train", "test"}
    assert len(manifest["parts"]) >= 2
    assert all(p["bytes"] <= 0.2 * lease.MIB for p in manifest["parts"])
    for part in manifest["parts"]:
        lease.store_part(tmp_path / "lease" / part["name"], tmp_path / "stash")
    root = lease.assemble_data(tmp_path / "stash")
    for name in lease.DATA_FILES:
        assert (root / "cifar-100-python" / name).read_bytes() == \
            (fake_data_root / "cifar-100-python" / name).read_bytes()
    with monkeypatch.context() as warm:  # a follow-up's `go`: assembled already, not again
        warm.setattr(lease_device, "join_parts", lambda *a: pytest.fail("decompressed again"))
        assert lease.assemble_data(tmp_path / "stash") == root
    for part in manifest["parts"]:
        lease.store_part(tmp_path / "lease" / part["name"], tmp_path / "other")
    monkeypatch.setattr(lease_device, "recode_file", lambda raw, span, encode: raw)
    with pytest.raises(ValueError, match="cifar-100-python/train differs from the file packed"):
        lease.assemble_data(tmp_path / "other")


def test_pack_data_reuses_its_parts_for_the_same_source(fake_data_root, tmp_path):
    first = lease.pack_data(fake_data_root, tmp_path, part_mib=0.2, compress=fast)
    stamp = (tmp_path / first["parts"][0]["name"]).stat().st_mtime_ns
    assert lease.pack_data(fake_data_root, tmp_path, part_mib=0.2, compress=fast) == first
    assert (tmp_path / first["parts"][0]["name"]).stat().st_mtime_ns == stamp
    part = tmp_path / first["parts"][-1]["name"]  # cut short (an interrupted prepare): packed
    part.write_bytes(part.read_bytes()[:-1])        # again, not carried to fail on the device
    assert lease.pack_data(fake_data_root, tmp_path, part_mib=0.2, compress=fast) == first
    assert part.stat().st_size == first["parts"][-1]["bytes"]
    # a manifest of the archive before the pixels were coded is rebuilt, not reused
    old = {k: v for k, v in first.items() if k not in ("coding", "pixels")}
    (tmp_path / lease.DATA_MANIFEST).write_text(json.dumps(old))
    assert lease.pack_data(fake_data_root, tmp_path, part_mib=0.2, compress=fast) == first


def test_a_broken_or_missing_part_is_refused_by_name(fake_data_root, tmp_path):
    manifest = lease.pack_data(fake_data_root, tmp_path / "lease", part_mib=0.2, compress=fast)
    first, second = (tmp_path / "lease" / p["name"] for p in manifest["parts"][:2])
    lease.store_part(first, tmp_path / "stash")
    stray = tmp_path / "lease" / "data.xz.99"  # a part of another `prepare`'s archive
    stray.write_bytes(first.read_bytes())
    with pytest.raises(ValueError, match=f"data.xz.99 is not in {stray.parent}"):
        lease.store_part(stray, tmp_path / "stash")
    assert not (tmp_path / "stash" / stray.name).exists()
    with pytest.raises(FileNotFoundError, match=second.name):
        lease.assemble_data(tmp_path / "stash")
    broken = bytearray(second.read_bytes())
    broken[10] ^= 1
    second.write_bytes(bytes(broken))
    with pytest.raises(ValueError, match="sha256"):
        lease.store_part(second, tmp_path / "stash")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        lease.pack_data(tmp_path / "nowhere", tmp_path / "x", part_mib=1)


def _split(blob: bytes, folder: Path, part_bytes: int, stem: str = "blob") -> dict:
    """A manifest as `pack_data` writes one: the parts and the whole's sha256."""
    import hashlib
    from kdlib.lease.transfer import split_into_parts

    folder.mkdir(parents=True, exist_ok=True)
    return {"sha256": hashlib.sha256(blob).hexdigest(),
            "parts": split_into_parts(blob, folder, stem, part_bytes)}


def test_sha256_of_hashes_all_of_a_file_longer_than_one_read(tmp_path):
    import hashlib

    head = bytes(2 * lease.MIB)  # reads go 1 MiB at a time: the files differ after two
    (tmp_path / "a").write_bytes(head + b"tail a")
    (tmp_path / "b").write_bytes(head + b"tail b")
    assert lease.sha256_of(tmp_path / "a") == hashlib.sha256(head + b"tail a").hexdigest()
    assert lease.sha256_of(tmp_path / "a") != lease.sha256_of(tmp_path / "b")


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 9])
def test_parts_join_back_to_the_blob_whatever_its_last_part_holds(size, tmp_path):
    from kdlib.lease.transfer import join_parts

    blob = bytes(range(size))
    manifest = _split(blob, tmp_path, part_bytes=4)
    assert [p["bytes"] for p in manifest["parts"]] == [min(4, size - s) for s in range(0, size, 4)]
    assert join_parts(tmp_path, manifest) == blob


def test_join_parts_names_the_part_that_broke_in_transfer(tmp_path):
    from kdlib.lease.transfer import join_parts

    manifest = _split(bytes(range(10)), tmp_path, part_bytes=4)
    second = tmp_path / manifest["parts"][1]["name"]
    second.write_bytes(b"XXXX")
    with pytest.raises(ValueError, match=f"{second.name} does not match its sha256 in the "
                                         "manifest: carry it again"):
        join_parts(tmp_path, manifest)


def test_join_parts_says_how_to_bring_a_missing_part(tmp_path):
    from kdlib.lease.transfer import join_parts

    manifest = _split(bytes(range(10)), tmp_path, part_bytes=4)
    (tmp_path / manifest["parts"][1]["name"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"blob\.01 is missing: carry \.lease/blob\.01 "
                                                r"in a call and run .*lease store"):
        join_parts(tmp_path, manifest)


def test_join_parts_refuses_intact_parts_of_two_archives(tmp_path):
    """Each part matches its own sha256, but they come from two `lease prepare` runs."""
    from kdlib.lease.transfer import join_parts

    first = _split(bytes(range(10)), tmp_path, part_bytes=4, stem="one")
    second = _split(bytes(range(10, 20)), tmp_path, part_bytes=4, stem="two")
    mixed = {"sha256": first["sha256"], "parts": [first["parts"][0], *second["parts"][1:]]}
    with pytest.raises(ValueError, match="reassembled archive does not match its sha256"):
        join_parts(tmp_path, mixed)


def test_outputs_split_into_at_most_eight_files_and_come_back_whole(tmp_path):
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "checkpoints").mkdir()
    (results / "runs" / "a.json").write_text('{"run_id": "a"}')
    (results / "checkpoints" / "a.weights.pt").write_bytes(os.urandom(300_000))
    (results / "checkpoints" / "a.pt").write_bytes(b"a finished run's state stays behind")
    (results / "checkpoints" / "b.pt").write_bytes(b"a paused run's state comes back")
    (results / "models").mkdir()
    (results / "models" / "a.packed").write_bytes(b"a's weights at their bit width")
    (results / "logs").mkdir()
    (results / "logs" / "lease-1.log").write_text("what the lease did, its timeline")
    bench = tmp_path / "NVIDIA_H200.json"
    bench.write_text("{}")
    files = lease.pack_outputs(results, tmp_path / "out", [bench], file_mib=0.1)
    assert 3 < len(files) <= lease.OUT_MAX_FILES
    assert all(path.stat().st_size <= 0.1 * lease.MIB for path in files)
    back = tmp_path / "back"
    (back / "checkpoints").mkdir(parents=True)  # here, b paused a lease earlier, a finished now
    (back / "checkpoints" / "a.pt").write_bytes(b"paused here before, finished there")
    counts = lease.receive(tmp_path / "out", back, tmp_path / "bench")
    assert counts == {"records": 1, "files": 5, "bench": 1, "finished_paused": 1}
    for name in ("checkpoints/a.weights.pt", "models/a.packed", "logs/lease-1.log"):
        assert (back / name).read_bytes() == (results / name).read_bytes()
    assert not (back / "checkpoints" / "a.pt").exists()
    assert (back / "checkpoints" / "b.pt").read_bytes() == b"a paused run's state comes back"
    assert json.loads((back / "paused.json").read_text()) == {"b": 0}  # for a clone's README
    assert (tmp_path / "bench" / "NVIDIA_H200.json").exists()
    with pytest.raises(ValueError, match="more than 2"):
        lease.pack_outputs(results, tmp_path / "out2", file_mib=0.1, max_files=2)


def test_only_what_the_lease_added_or_changed_comes_back(tmp_path):
    """The files there before the grid came from here: returning them again would fill the
    eight returned files with weights already here."""
    results, stash = tmp_path / "results", tmp_path / "stash"
    (results / "runs").mkdir(parents=True)
    (results / "checkpoints").mkdir()
    (results / "runs" / "old.json").write_text('{"run_id": "old"}')
    (results / "checkpoints" / "old.weights.pt").write_bytes(os.urandom(200_000))
    (results / "checkpoints" / "p.pt").write_bytes(b"paused at the last lease, carried here")
    lease.snapshot_results(results, stash)
    (results / "runs" / "new.json").write_text('{"run_id": "new"}')  # the grid's work
    (results / "checkpoints" / "new.weights.pt").write_bytes(b"new weights")
    (results / "checkpoints" / "p.pt").write_bytes(b"paused again, some epochs later")
    lease.pack(results, tmp_path / "out", tmp_path / "bench", device="cpu", stash=stash)
    counts = lease.receive(tmp_path / "out", tmp_path / "back", tmp_path / "back-bench")
    assert counts["records"] == 1 and counts["files"] == 3
    assert sorted(str(p.relative_to(tmp_path / "back")) for p in (tmp_path / "back").rglob("*/*")) \
        == ["checkpoints/new.weights.pt", "checkpoints/p.pt", "runs/new.json"]
    (stash / lease.SNAPSHOT).unlink()  # `go` died before its snapshot: everything comes back
    lease.pack(results, tmp_path / "out2", tmp_path / "bench", device="cpu", stash=stash)
    assert lease.receive(tmp_path / "out2", tmp_path / "back2", tmp_path / "b2")["files"] == 5


def test_receive_takes_one_machines_returns_each_once_in_order(tmp_path, monkeypatch):
    """A folder the tool reused for the follow-up (the last call's files lost), folders out of
    order, a follow-up without the return it builds on, or a call that returned nothing: each
    refused by receive with what to do, before anything is unpacked."""
    results, stash = tmp_path / "results", tmp_path / "stash"
    (results / "runs").mkdir(parents=True)
    outs = [tmp_path / "out0", tmp_path / "out1"]
    for i, out in enumerate(outs):  # the last call, then the follow-up on the same machine
        (results / "runs" / f"r{i}.json").write_text(f'{{"run_id": "r{i}"}}')
        lease.pack(results, out, tmp_path / "bench", device="cpu", stash=stash)
        lease.snapshot_results(results, stash)
    assert [json.loads((o / "manifest.json").read_text())["returned"] for o in outs] == [0, 1]
    lease.check_returns(outs)
    reused = tmp_path / "reused"
    shutil.copytree(outs[1], reused)
    for folders, message in [([reused, outs[1]], "same return"),
                             ([outs[1], outs[0]], "calls' order"),
                             ([outs[1]], r"return\(s\) \[0\] are missing"),
                             ([tmp_path / "bench"], "holds no manifest.json")]:
        with pytest.raises(ValueError, match=message):
            lease.check_returns(folders)
    lease.check_returns([outs[1]], partial=True)
    with pytest.raises(ValueError, match="do not name their preset .*: give --preset"):
        lease.returned_preset(outs, None)  # packed without one (as before manifests named it)
    assert lease.returned_preset(outs, "smoke") == "smoke"
    from kdlib import cli

    monkeypatch.setattr(lease_commands, "REPO_ROOT", tmp_path)  # nothing of this checkout
    here = tmp_path / "here"
    assert cli.main(["lease", "receive", str(outs[1]), "--preset", "smoke",
                     "--results-dir", str(here), "--bench-dir", str(tmp_path / "b")]) == 2
    assert not here.exists()
    assert cli.main(["lease", "receive", str(outs[1]), "--partial", "--preset", "smoke",
                     "--results-dir", str(here), "--bench-dir", str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (here / "runs").iterdir()) == ["r1.json"]


def test_carried_files_ride_in_the_room_data_parts_leave_then_in_calls_of_their_own(tmp_path):
    def file(name, kib):
        path = tmp_path / name
        path.write_bytes(b"w" * (kib * 1024))
        return path

    a, b, c, d = file("a.pt", 300), file("b.pt", 600), file("c.pt", 700), file("d.pt", 100)
    room = 1024 * 1024
    by_part, extra = lease.plan_carry([1024 * 1024, 400 * 1024], [a, b, c, d], room)
    # largest first: c (700) fits no part's room; b (600) fits the 624 KiB the last part
    # leaves; a (300) joins c; d (100) fits neither: a third call
    assert by_part == [[], [b]]
    assert extra == [[c, a], [d]]
    assert lease.plan_carry([10], [], room) == ([[]], [])
    with pytest.raises(ValueError, match="larger than what a call can carry"):
        lease.plan_carry([10], [file("huge.pt", 1100)], room)


def test_frontier_is_the_weights_unfinished_runs_need(fake_data_root, tmp_path):
    plan = experiments.plan_grid(**GRID, chain=[32, 4], chain_methods=["ta_chain"],
                                 methods=["direct_kd"])
    teacher = plan[0]
    experiments.execute(plan[:1], data_dir=fake_data_root, results_dir=tmp_path, progress=False)
    # the 32-bit teacher's packed file holds it bit for bit (and is committed): nothing to carry
    assert lease.frontier_weights(plan, tmp_path) == []
    packed = packed_path(tmp_path, teacher.run_id())
    kept = packed.read_bytes()
    packed.unlink()
    assert lease.frontier_weights(plan, tmp_path) == [weights_path(tmp_path, teacher.run_id())]
    packed.write_bytes(kept)
    weights_path(tmp_path, teacher.run_id()).unlink()  # a fresh clone: checkpoints/ is ignored
    assert lease.frontier_weights(plan, tmp_path) == []
    link = experiments.execute(plan[:2], data_dir=fake_data_root, results_dir=tmp_path,
                               progress=False)[1]  # the chain's 4-bit link: direct_kd starts
    assert link["config"]["w_bits"] == 4              # from nothing, ta_chain@1 would from it
    plan = experiments.plan_grid(**GRID, chain=[32, 4, 1], chain_methods=["ta_chain"],
                                 methods=["direct_kd"])
    assert lease.frontier_weights(plan, tmp_path) == [weights_path(tmp_path, link["run_id"])]
    weights_path(tmp_path, link["run_id"]).unlink()  # a low-bit packed file is not the fp32 one
    with pytest.raises(FileNotFoundError, match="git add -f"):
        lease.frontier_weights(plan, tmp_path)


@pytest.mark.slow
def test_committed_weights_no_unfinished_run_needs_are_named_for_removal(fake_data_root,
                                                                         tmp_path):
    """A committed fp32 weight file rides in every call of every lease: once the runs that
    start from it have records, `receive` and `prepare` name it for `git rm`."""
    here = tmp_path / "here"
    results = here / "results" / "smoke"
    plan = experiments.plan_grid(**GRID, chain=[32, 4, 1], chain_methods=["ta_chain"],
                                 methods=["direct_kd"])
    results.mkdir(parents=True)
    assert lease.unneeded_committed_weights(plan, results, here) == []  # not a git checkout
    link = experiments.execute(plan[:2], data_dir=fake_data_root, results_dir=results,
                               progress=False)[1]
    weights = weights_path(results, link["run_id"])
    git = dict(cwd=here, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q"], **git)
    subprocess.run(["git", "add", "-f", str(weights)], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "w"],
                   **git)
    assert lease.frontier_weights(plan, results) == [weights]
    assert lease.unneeded_committed_weights(plan, results, here) == []  # ta_chain@1 needs it
    experiments.execute(plan, data_dir=fake_data_root, results_dir=results, progress=False)
    assert lease.frontier_weights(plan, results) == []
    assert lease.unneeded_committed_weights(plan, results, here) == [weights.resolve()]
    weights.unlink()  # removed (`git rm`): nothing left to name
    assert lease.unneeded_committed_weights(plan, results, here) == []


def test_the_weights_an_unfinished_run_learns_from_and_starts_from_are_both_carried(tmp_path):
    """progressive_kd32 learns from the teacher and starts from the previous width: a lease
    lacking either could not train it; a run recorded as the same run as another needs that
    one's weights. A paused run's committed checkpoint is never named for `git rm`."""
    plan = experiments.plan_grid(**GRID, chain=[32, 16, 8], chain_methods=["progressive_kd32"],
                                 methods=["direct_kd"])
    teacher, first, second = (next(c for c in plan if c.run_id().startswith(p)) for p in (
        "resnet8-teacher", "resnet8-progressive_kd32-w16", "resnet8-progressive_kd32-w8"))
    plan = [teacher, first, second]
    here = tmp_path / "here"
    results = here / "results" / "smoke"
    trained = {teacher.run_id(): teacher.run_id(), first.run_id(): "resnet8-other-w16"}
    for run_id, same in trained.items():  # no packed file: the fp32 weights are needed
        record = {"run_id": run_id, "config": {}}
        (results / "runs").mkdir(parents=True, exist_ok=True)
        (results / "runs" / f"{run_id}.json").write_text(json.dumps(
            record if same == run_id else {**record, "same_run_as": same}))
        weights_path(results, same).parent.mkdir(parents=True, exist_ok=True)
        weights_path(results, same).write_bytes(b"w")
    assert sorted(lease.frontier_weights(plan, results)) == \
        sorted(weights_path(results, t) for t in trained.values())
    paused = checkpoint_path(results, second.run_id())
    paused.write_bytes(b"paused")
    git = _committed_checkout(here, {"README.md": ""})
    subprocess.run(["git", "add", "-f", str(paused)], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"],
                   **git)
    assert lease.unneeded_committed_weights(plan, results, here) == []


def test_the_tree_every_call_sends_is_counted_and_its_largest_folders_named(tmp_path):
    from kdlib.lease.tracked import largest_folders, travelling_bytes, travelling_files
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    sizes = {"results/a/m.bin": 5000, "results/a/deep/n.bin": 400, "results/b/m.bin": 3000,
             "kdlib/x.py": 100, "README.md": 50, "results/a/ignored.pt": 9000, "notes.txt": 70}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    (tmp_path / ".gitignore").write_text("*.pt\n")
    subprocess.run(["git", "add", "results", "kdlib", "README.md", ".gitignore"], cwd=tmp_path,
                   check=True)
    sent = travelling_files(tmp_path)
    assert "results/a/ignored.pt" not in sent  # ignored: stays here
    assert sent["notes.txt"] == 70  # untracked but not ignored: travels too
    assert travelling_bytes(tmp_path) == 5000 + 400 + 3000 + 100 + 50 + 70 + 5
    assert largest_folders(sent, top=2) == [("results/a", 5400), ("results/b", 3000),
                                            ("the rest", 100 + 50 + 70 + 5)]
    assert largest_folders(sent, depth=1, top=1) == [("results", 8400), ("the rest", 225)]


def _committed_checkout(here: Path, files: dict[str, str]) -> dict:
    """A git checkout under ``here`` with this repository's .gitignore and ``files`` committed
    (those its rules ignore are written, not committed); the keyword arguments of its git."""
    git = dict(cwd=here, check=True, capture_output=True, text=True)
    here.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], **git)
    shutil.copy(REPO / ".gitignore", here / ".gitignore")
    for name, text in files.items():
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        (here / name).write_text(text)
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
                   **git)
    return git


def test_the_other_presets_results_stay_here_during_a_lease(fake_data_root, tmp_path,
                                                           monkeypatch, capsys):
    """The device reads its preset's results and the benchmarks, nothing else of results/:
    `prepare` takes the other presets' folders out of git's index and ignores them in
    .git/info/exclude (against .gitignore's negations, which keep their models tracked), so
    that no call sends them; a second `prepare` keeps them out; `restore` (a lease that never
    ran) leaves git's index and the exclude file as they were."""
    from kdlib import cli
    from kdlib.lease.tracked import travelling_files

    here = tmp_path / "here"
    teacher = "results/quick/models/resnet20-teacher-w32a32-s1-a.packed"  # a negated rule's
    git = _committed_checkout(here, {
        teacher: "t" * 3000, "results/quick/runs/a.json": "{}", "results/quick_x/runs/b.json": "{}",
        "results/quick/models/resnet20-individual-w4a4-s1-b.packed": "ignored",
        "results/bench/dev.json": "{}", "kdlib/x.py": "", "README.md": ""})
    exclude = here / ".git" / "info" / "exclude"
    exclude.write_text("# mine\n/scratch/\n")
    (here / "results/quick/new.json").write_text("{}")  # untracked, not ignored: would travel
    quick = {teacher, "results/quick/runs/a.json", "results/quick/new.json"}
    assert quick | {"results/quick_x/runs/b.json"} <= set(travelling_files(here))

    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain"], **git).stdout

    results = here / "results" / "smoke"
    plan = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[0])
    (here / "results/quick/runs/a.json").write_text('{"a": 1}')  # staged: would be unstaged
    subprocess.run(["git", "add", "results/quick/runs/a.json"], **git)
    with pytest.raises(ValueError, match=r"changes staged .* as committed "
                                         r"\(results/quick/runs/a.json\): commit them first"):
        lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                      minutes=1, jobs=1, preset="smoke", model="resnet8")
    assert status() == "M  results/quick/runs/a.json\n?? results/quick/new.json\n"
    subprocess.run(["git", "checkout", "HEAD", "--", "results/quick/runs/a.json"], **git)
    whole = sum(travelling_files(here).values())  # the tree, before prepare hides folders
    for _ in range(2):  # a second prepare, say with other minutes, finds them hidden
        logs = []
        lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                      minutes=1, jobs=1, preset="smoke", model="resnet8", log=logs.append)
        sent = set(travelling_files(here))
        assert not {n for n in sent if n.startswith("results/quick")}
        assert {"results/bench/dev.json", "kdlib/x.py", "README.md"} <= sent
        assert all((here / name).exists() for name in quick)  # on disk all along
        assert status() == ("D  results/quick/models/resnet20-teacher-w32a32-s1-a.packed\n"
                            "D  results/quick/runs/a.json\nD  results/quick_x/runs/b.json\n")
        assert exclude.read_text().count("# kdlib lease") == 2  # one block
        hidden = next(line for line in logs if line.startswith("out of git's index and ignored"))
        assert "results/quick (0.0 MiB), results/quick_x (0.0 MiB)" in hidden
        assert "python -m kdlib lease restore --preset smoke --results-dir results/smoke" in hidden
    assert logs[0].startswith("every call also sends the tree, 0.0 MiB")
    assert "results/quick" not in logs[0]  # the hidden folders size no data part
    from kdlib.lease.transfer import CALL_MARGIN_MIB, CALL_MIB

    data = json.loads((here / lease.LEASE_DIR / lease.DATA_MANIFEST).read_text())["bytes"]
    room = int(CALL_MIB - CALL_MARGIN_MIB - whole / lease.MIB)  # beside it, hidden folders too
    assert (f"should the tool refuse call 1 as over 64 MiB (sending the hidden folders too: "
            f"0.0 MiB of tree), prepare again with --part-mib {room}: "
            f"{-(-data // (room * lease.MIB))} data calls") in logs
    largest = next(line for line in logs if line.startswith("the largest call sends"))
    carried = sum((here / path).stat().st_size for path in
                  json.loads((here / lease.LEASE_DIR / lease.CALLS_FILE).read_text())[0]["carry"])
    tree = sum(travelling_files(here).values())
    assert largest == (f"the largest call sends {(tree + carried) / lease.MIB:.1f} MiB of the "
                       f"tool's 64")
    monkeypatch.setattr(lease_commands, "REPO_ROOT", here)
    capsys.readouterr()
    assert cli.main(["lease", "restore", "--preset", "smoke", "--results-dir", str(results)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "back in git's index: results/quick, results/quick_x (hidden from the lease's calls, on "
        "disk all along)", "results/smoke/checkpoints: in git's index as committed"]
    assert status() == "?? results/quick/new.json\n"
    assert exclude.read_text() == "# mine\n/scratch/\n"
    assert quick <= set(travelling_files(here))
    checkpoint = here / "results/smoke/checkpoints/r.pt"  # the leased preset's, committed
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("c")
    subprocess.run(["git", "add", "-f", str(checkpoint)], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
                   **git)
    lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                  minutes=1, jobs=1, preset="smoke", model="resnet8", log=logs.append)
    subprocess.run(["git", "rm", "-q", "--cached", str(checkpoint)], **git)  # as if carried
    capsys.readouterr()
    assert cli.main(["lease", "restore"]) == 0  # no preset: every results folder's checkpoints
    assert capsys.readouterr().out.splitlines()[-1] == \
        "results/smoke/checkpoints: in git's index as committed"
    assert status() == "?? results/quick/new.json\n"
    assert exclude.read_text() == "# mine\n/scratch/\n"


def test_results_hidden_for_a_lease_come_back_though_a_commit_dropped_them(tmp_path):
    """A commit made during the lease (`git commit -a`) removes the hidden folders' files and
    the carried checkpoints from the branch; putting them back (`lease restore`) takes them
    from the commit `prepare` saw."""
    from kdlib.lease.tracked import (hidden_folders, hide_for_lease, unhide_after_lease,
                                     untrack_for_lease)

    here = tmp_path / "here"
    git = _committed_checkout(here, {"results/quick/runs/a.json": "{}", "kdlib/x.py": ""})
    checkpoint = here / "results" / "gpu" / "checkpoints" / "r.pt"  # ignored: added by force
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("c")
    subprocess.run(["git", "add", "-f", str(checkpoint)], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
                   **git)
    untrack_for_lease(here, [checkpoint])  # what prepare does to a carried checkpoint
    hide_for_lease(here, [here / "results" / "quick"])
    assert hidden_folders(here) == ["results/quick"]
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "d"],
                   **git)
    assert subprocess.run(["git", "ls-files", "results"], **git).stdout == ""
    assert unhide_after_lease(here, also=[checkpoint.parent]) == ["results/quick"]
    assert hidden_folders(here) == []
    assert subprocess.run(["git", "status", "--porcelain"], **git).stdout == \
        "A  results/gpu/checkpoints/r.pt\nA  results/quick/runs/a.json\n"  # back next commit
    assert unhide_after_lease(here) == []  # nothing hidden: nothing to do


def test_a_git_that_cannot_change_its_index_stops_the_lease_steps(tmp_path):
    """Another git holding the index: a checkpoint left in it would ride in every call, and a
    removal not staged would be missing from the commit; said, not passed over."""
    from kdlib.lease.tracked import stage_for_later, untrack_for_lease

    here = tmp_path / "here"
    git = _committed_checkout(here, {"README.md": ""})
    checkpoint = here / "results" / "smoke" / "checkpoints" / "r.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("c")
    subprocess.run(["git", "add", "-f", str(checkpoint)], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
                   **git)
    lock = here / ".git" / "index.lock"
    lock.touch()
    with pytest.raises(RuntimeError, match="git rm --cached failed"):
        untrack_for_lease(here, [checkpoint])
    checkpoint.unlink()  # its run finished: the removal is staged
    with pytest.raises(RuntimeError, match="git rm --cached failed"):
        stage_for_later(here, [], checkpoint.parent)
    lock.unlink()
    assert stage_for_later(here, [], checkpoint.parent)["removed"] == [checkpoint.resolve()]


def test_a_command_longer_than_the_tool_takes_is_refused_the_follow_up_included(
        fake_data_root, tmp_path, monkeypatch):
    """A call the tool refuses for its length costs a device call: refused here instead."""
    lease_prepare = sys.modules["kdlib.lease.prepare"]  # kdlib.lease.prepare: the function

    here = tmp_path / "here"
    kwargs = dict(data_root=fake_data_root, results_dir=here / "results" / "smoke",
                  repo_root=here, minutes=1, jobs=1, preset="smoke", model="resnet8",
                  part_mib=0.5, log=lambda m: None)
    plan = experiments.plan_grid(**GRID)
    calls = lease.prepare(plan, **kwargs)
    again = json.loads((here / lease.LEASE_DIR / lease.AGAIN_FILE).read_text())["command"]
    longest = max(len(call["command"]) for call in calls)
    assert len(again) > longest  # the follow-up's shell is the longest
    monkeypatch.setattr(lease_prepare, "COMMAND_MAX_CHARS", len(again))
    lease.prepare(plan, **kwargs)
    for limit in (len(again) - 1, longest):
        monkeypatch.setattr(lease_prepare, "COMMAND_MAX_CHARS", limit)
        with pytest.raises(ValueError, match=f"{len(again)} characters, more than the tool's"):
            lease.prepare(plan, **kwargs)


def test_a_carried_file_no_part_has_room_for_goes_first_in_a_call_of_its_own(
        fake_data_root, tmp_path, monkeypatch):
    """Calls of their own for carried files come before the data's, each call carrying only
    what its stash entry names: so no call carries a part and a whole call's room of weights
    (over the tool's 64 MiB), and each `store` finds what it was planned to."""
    here = tmp_path / "here"
    results = here / "results" / "smoke"
    plan = experiments.plan_grid(**GRID)
    teacher = plan[0].run_id()
    (results / "runs").mkdir(parents=True)
    (results / "runs" / f"{teacher}.json").write_text(json.dumps({"run_id": teacher,
                                                                 "config": {}}))
    weights = weights_path(results, teacher)
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w")
    room = int(0.5 * lease.MIB)  # compressed, the file takes a whole call's room
    monkeypatch.setattr(sys.modules["kdlib.lease.prepare"], "compress_carried",
                        lambda paths: {p: b"x" * room for p in paths})
    calls = lease.prepare(plan[1:], data_root=fake_data_root, results_dir=results,
                          repo_root=here, minutes=1, jobs=1, preset="smoke", model="resnet8",
                          part_mib=0.5, log=lambda m: None)
    parts = json.loads((here / lease.LEASE_DIR / lease.DATA_MANIFEST).read_text())["parts"]
    stash = json.loads((here / lease.LEASE_DIR / lease.STASH_PLAN).read_text())
    assert len(calls) == len(parts) + 1 == len(stash)
    assert stash[0] == {"parts": {}, "weights": {weights.name: lease.sha256_of(weights)}}
    assert [next(iter(entry["parts"])) for entry in stash[1:]] == [p["name"] for p in parts]
    for call, entry in zip(calls, stash):
        carried = [here / path for path in call["carry"]
                   if Path(path).name not in (lease.DATA_MANIFEST, lease.STASH_PLAN)]
        assert sum(p.stat().st_size if p.is_file() else sum(
            f.stat().st_size for f in p.iterdir() if f.suffix == lease.CARRIED_SUFFIX)
                   for p in carried) <= room
        assert {p.name for p in carried} == set(entry["parts"]) | (
            {carried[-1].name} if entry["weights"] else set())


def test_putting_hidden_folders_back_keeps_the_lines_written_after_the_block(tmp_path):
    """A line added to .git/info/exclude during the lease is the user's, not a hidden folder."""
    from kdlib.lease.tracked import hide_for_lease, unhide_after_lease, untravelled_results

    here = tmp_path / "here"
    _committed_checkout(here, {"results/quick/runs/a.json": "{}", "results/smoke/r": "",
                               "results/README.md": ""})
    # a file beside the results folders is no preset's folder: it stays in the tree
    assert untravelled_results(here, here / "results" / "smoke") == [here / "results" / "quick"]
    exclude = here / ".git" / "info" / "exclude"
    exclude.write_text("# mine\n")
    hide_for_lease(here, [here / "results" / "quick"])
    exclude.write_text(exclude.read_text() + "/scratch/\n")
    assert unhide_after_lease(here) == ["results/quick"]
    assert exclude.read_text() == "# mine\n/scratch/\n"
    fresh = tmp_path / "fresh"  # a checkout without a commit yet: its block goes all the same
    subprocess.run(["git", "init", "-q", str(fresh)], check=True)
    (fresh / "results" / "quick").mkdir(parents=True)
    (fresh / "results" / "quick" / "a.json").write_text("{}")
    exclude = fresh / ".git" / "info" / "exclude"
    exclude.parent.mkdir(exist_ok=True)
    exclude.write_text("# mine\n")
    hide_for_lease(fresh, [fresh / "results" / "quick"])
    assert unhide_after_lease(fresh) == ["results/quick"]
    assert exclude.read_text() == "# mine\n"


def test_a_paused_runs_checkpoint_is_carried_and_placed_where_the_grid_resumes_it(
        fake_data_root, tmp_path):
    plan = experiments.plan_grid(**GRID, chain=[32, 4], chain_methods=["ta_chain"],
                                 methods=["direct_kd"])
    here = tmp_path / "here"
    results = here / "results" / "smoke"
    paused = checkpoint_path(results, plan[0].run_id())
    paused.parent.mkdir(parents=True)
    paused.write_bytes(b"the teacher after some epochs")
    checkpoint_path(results, "not-planned").write_bytes(b"another grid's")
    assert lease.planned_paused(plan, results) == [paused]
    logs = []
    calls = lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                          minutes=1, jobs=1, preset="smoke", model="resnet8", part_mib=0.5,
                          log=logs.append)
    carrying = [call for call in calls if any("/weights/" in path for path in call["carry"])]
    assert carrying == calls[-1:]  # a few bytes: in the room the last data part leaves
    (group,) = [path for path in carrying[0]["carry"] if "/weights/" in path]
    carried = here / group / (paused.name + lease.CARRIED_SUFFIX)
    assert lzma.decompress(carried.read_bytes()) == paused.read_bytes()  # carried compressed
    last_part = carrying[0]["carry"][1]
    assert carrying[0]["command"].startswith(
            f"python3 -m kdlib lease store --call {len(calls)} {last_part} {group} && ")
    assert any(line.startswith(f"resumes: {plan[0].run_id()} from epoch 0") for line in logs)
    stash, device = tmp_path / "stash", tmp_path / "device" / "results" / "smoke"
    good = carried.read_bytes()
    carried.write_bytes(b"broken in transfer")
    with pytest.raises(ValueError, match="does not decompress"):
        lease.store([here / group], stash)
    carried.write_bytes(lzma.compress(b"the teacher after other epochs"))
    with pytest.raises(ValueError, match="sha256"):
        lease.store([here / group], stash)
    carried.write_bytes(good)
    lease.store([here / group], stash)
    assert lease.place_carried(device, stash) == [checkpoint_path(device, plan[0].run_id())]
    assert checkpoint_path(device, plan[0].run_id()).read_bytes() == paused.read_bytes()


def test_a_run_a_lease_paused_whose_checkpoint_this_clone_lacks_is_said_to_start_over(
        fake_data_root, tmp_path):
    """paused.json is committed, the checkpoints are not: a fresh clone's prepare says which
    paused runs lost theirs, and names the others as resumed."""
    plan = experiments.plan_grid(**GRID, chain=[32, 4], chain_methods=["ta_chain"],
                                 methods=["direct_kd"])
    here = tmp_path / "here"
    results = here / "results" / "smoke"
    kept, lost = plan[0].run_id(), plan[1].run_id()
    checkpoint = checkpoint_path(results, kept)
    checkpoint.parent.mkdir(parents=True)
    torch.save({"epoch": 2}, checkpoint)
    torch.save({"epoch": 1}, checkpoint_path(results, lost))
    note_paused(results)  # what the receive of the lease that paused both wrote
    checkpoint_path(results, lost).unlink()  # this clone never had it
    assert lease.lost_paused(plan, results) == {lost: 1}
    assert lease.lost_paused(plan[:1], results) == {}  # not planned: not this lease's concern
    logs = []
    lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                  minutes=1, jobs=1, preset="smoke", model="resnet8", part_mib=0.5,
                  log=logs.append)
    assert any(line.startswith(f"resumes: {kept} from epoch 2") for line in logs)
    assert [line for line in logs if line.startswith("starts over:")] == [
        f"starts over: {lost} (a lease paused it after epoch 1, but its checkpoint is not in "
        f"this checkout: it was not committed)"]


@pytest.mark.slow
def test_what_the_next_lease_needs_is_committed_and_travels_once(fake_data_root, tmp_path,
                                                                  monkeypatch, capsys):
    """A later session is a fresh checkout: `receive` stages the weights and paused checkpoints
    the unfinished runs need (checkpoints/ is ignored), and `prepare` takes them out of git's
    index again, so that they ride once in a carry rather than with the tree in every call."""
    from kdlib import cli
    from kdlib.lease.tracked import travelling_files

    here = tmp_path / "here"
    results = here / "results" / "smoke"
    plan = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[0])  # `receive`'s
    link = experiments.execute(plan[:2], data_dir=fake_data_root, results_dir=results,
                               progress=False)[1]  # the teacher and the chain's first link
    weights = weights_path(results, link["run_id"])
    assert lease.frontier_weights(plan, results) == [weights]
    paused = checkpoint_path(results, plan[2].run_id())
    torch.save({"epoch": 1}, paused)  # the chain's next link, as a lease's pause leaves it
    assert lease.stage_for_next_lease(plan, results, here) == {"added": [], "removed": []}
    git = dict(cwd=here, check=True, capture_output=True, text=True)
    subprocess.run(["git", "init", "-q"], **git)
    (here / ".gitignore").write_text("results/*/checkpoints\n")

    def tracked() -> set[str]:
        return set(subprocess.run(["git", "ls-files", "results"], **git).stdout.split())

    rel = {str(p.relative_to(here)) for p in (weights, paused)}
    staged = lease.stage_for_next_lease(plan, results, here)  # what `lease receive` does
    assert sorted(staged["added"]) == sorted([weights.resolve(), paused.resolve()])
    assert rel <= tracked() and staged["removed"] == []
    other = here / "results" / "quick" / "runs" / "a.json"  # another preset's: hidden, put back
    other.parent.mkdir(parents=True)
    other.write_text("{}")
    subprocess.run(["git", "add", str(other)], **git)
    with pytest.raises(ValueError, match="results/smoke/checkpoints/.*: commit them first"):
        lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                      minutes=1, jobs=1, preset="smoke", model="resnet8", part_mib=0.5)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "r"],
                   **git)
    assert rel <= set(travelling_files(here))  # committed: would ride in every call
    with pytest.raises(FileNotFoundError):  # a prepare that fails leaves the index alone
        lease.prepare(plan, data_root=tmp_path / "nowhere", results_dir=results, repo_root=here,
                      minutes=1, jobs=1, preset="smoke", model="resnet8", part_mib=0.5)
    assert rel <= tracked()
    logs = []
    calls = lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                          minutes=1, jobs=1, preset="smoke", model="resnet8", part_mib=0.5,
                          log=logs.append)
    assert not rel & tracked() and not rel & set(travelling_files(here))  # out of the index
    assert weights.exists() and paused.exists()  # kept on disk, carried once instead:
    carried = {p.name for call in calls for path in call["carry"] if "/weights/" in path
               for p in (here / path).glob("*" + lease.CARRIED_SUFFIX)}
    assert carried == {weights.name + lease.CARRIED_SUFFIX, paused.name + lease.CARRIED_SUFFIX}
    assert any(line.startswith("out of git's index for this lease") and "lease restore" in line
               for line in logs)
    assert "results/quick/runs/a.json" not in tracked() | set(travelling_files(here))
    assert any(line.startswith(f"resumes: {plan[2].run_id()} from epoch 1") for line in logs)
    paused.unlink()  # its run finished there: `receive` deletes the checkpoint of such a run
    out = tmp_path / "out"
    lease.pack(results, out, tmp_path / "bench", device="cpu", stash=tmp_path / "stash")
    monkeypatch.setattr(lease_commands, "REPO_ROOT", here)
    monkeypatch.chdir(here)
    capsys.readouterr()
    assert cli.main(["lease", "receive", str(out), "--preset", "smoke", "--model", "resnet8",
                     "--results-dir", str(results), "--bench-dir", str(tmp_path / "b")]) == 0
    said = capsys.readouterr().out
    assert (f"staged in git: 1 weight or checkpoint file(s) ({weights.stat().st_size / 2**20:.1f}"
            f" MiB) that the next lease's unfinished runs need; commit them with the records: "
            f"{weights.relative_to(here)}") in said
    assert (f"staged in git: the removal of 1 weight or checkpoint file(s) no unfinished run "
            f"needs any more: {paused.relative_to(here)}") in said
    assert "back in git's index: results/quick (hidden from the lease's calls" in said
    assert tracked() == {str(weights.relative_to(here)), "results/quick/runs/a.json"}
    status = subprocess.run(["git", "status", "--porcelain", "--", str(paused)], **git).stdout
    assert status == f"D  {paused.relative_to(here)}\n"  # committed with the records


@pytest.mark.slow
def test_the_printed_calls_run_as_written_and_a_second_lease_continues(fake_data_root, tmp_path):
    """`lease prepare`'s calls, run by bash in a fresh 'device' folder holding only what the
    tool sends (the tree, by git's rule, and the carried paths), the returned files received
    here. Lease 1 has no time for the grid: only the benchmark comes back. Then the teacher and
    a first link are trained here; lease 2 carries their weights, trains the rest without
    retraining them and without a second benchmark. The records equal a plain serial grid's.
    Another preset's results stay here throughout, and are tracked again afterwards."""
    from kdlib.lease.tracked import travelling_files, unhide_after_lease

    here = tmp_path / "here"
    (here / "results" / "bench").mkdir(parents=True)
    results = here / "results" / "smoke"
    other = "results/quick/runs/resnet20-teacher-w32a32-s0-a.json"
    git = _committed_checkout(here, {other: "{}", ".gitignore": (
        "results/*/checkpoints\nresults/*/logs/*\n!results/*/logs/lease-*.log\n/.lease/\n")})
    small = dict(chain=[32, 4, 1], chain_methods=["ta_chain"], methods=["direct_kd"])
    plan = experiments.plan_grid(**GRID, **small)  # 5 runs: 4 trained, direct_kd@4 an alias

    def one_lease(minutes: float, n: int) -> list[str]:
        # go's hard limit: minutes + 120 s here, so that a busy CI machine never cuts the
        # benchmark short (on the device it is minutes + 20 s)
        calls = lease.prepare(plan, data_root=fake_data_root, results_dir=results,
                              repo_root=here, minutes=minutes, jobs=1, preset="smoke",
                              model="resnet8", grid=small, part_mib=0.5,
                              bench_args=TINY_BENCH, grace_s=120)
        device = tmp_path / f"device{n}"  # what the tool sends, and this repository's package
        for name in travelling_files(here):
            (device / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(here / name, device / name)
        assert not (device / "results" / "quick").exists()
        shutil.copytree(REPO / "kdlib", device / "kdlib",
                        ignore=shutil.ignore_patterns("__pycache__"))
        out = tmp_path / f"out{n}"
        out.mkdir()
        env = {**os.environ, "KDLIB_LEASE_STASH": str(tmp_path / f"stash{n}"), "OUT": str(out),
               "PATH": f"{_python3_shim(tmp_path)}:{os.environ['PATH']}", "KDLIB_TENSORBOARD": "0",
               "OMP_NUM_THREADS": "1"}  # as this process: same sums, and fast on a busy CPU
        logs = []
        for call in calls:
            for path in call["carry"]:  # what `carry` sends: the named ignored paths
                target = device / path
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (here / path).is_dir() else shutil.copy2)(here / path, target)
            done = subprocess.run(["bash", "-c", call["command"]], cwd=device, env=env,
                                  capture_output=True, text=True, timeout=call["timeout_s"])
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            logs.append(done.stdout + done.stderr)
        assert len(calls) >= 2 and len(list(out.iterdir())) <= lease.OUT_MAX_FILES
        lease.receive(out, results, here / "results" / "bench")
        return logs

    logs = one_lease(minutes=0.01, n=1)
    assert "benchmark written" in logs[-1] and load_records(results) == []
    assert "benchmark completed" in logs[-1]  # its later parts: seconds, in the allowance
    bench = json.loads(next((here / "results" / "bench").glob("*.json")).read_text())
    assert bench["settings"]["model"] == "resnet8" \
        and set(bench["concurrency"]["by_jobs"]) == {"1", "2"}
    assert bench["profile"]["variant"] == "kd_w4" and bench["profile"]["top"]  # came back
    head = experiments.execute(plan[:2], data_dir=fake_data_root, results_dir=results,
                               progress=False)
    logs = one_lease(minutes=5, n=2)
    assert "benchmark " not in logs[-1]  # nothing left to measure
    weights = tmp_path / "device2" / ".lease" / "weights"
    carried = sorted(p.name for p in weights.rglob("*.pt.xz"))
    # the 4-bit link's, compressed; not the teacher's: its committed packed file holds it
    assert carried == [f"{head[1]['run_id']}.weights.pt.xz"]
    received = {r["run_id"]: r for r in load_records(results)}
    # not retrained
    assert all(received[r["run_id"]]["created_at"] == r["created_at"] for r in head)
    from kdlib.results import CODE_COMMIT  # the device's copy has no .git: the call states it

    assert CODE_COMMIT and {r["git_commit"] for r in received.values()} == {CODE_COMMIT}
    serial = experiments.execute(plan, data_dir=fake_data_root, results_dir=tmp_path / "serial",
                                 progress=False)
    assert sorted(map(comparable, received.values()), key=lambda r: r["run_id"]) == \
        sorted(map(comparable, serial), key=lambda r: r["run_id"])
    assert unhide_after_lease(here) == ["results/quick"]  # as `lease receive` does
    assert subprocess.run(["git", "ls-files", "results/quick"], **git).stdout == other + "\n"


@pytest.mark.slow
def test_a_follow_up_call_continues_on_the_warm_machine(fake_data_root, tmp_path, monkeypatch):
    """The follow-up call (`.lease/again.json`, the session's device seconds put in) runs the
    same grid on the machine the last call left warm: the data is in its stash, and what the
    last call returned is put back first, though the tool copied the tree afresh, so nothing
    is trained twice; it runs no benchmark and returns only what it added. Too few seconds
    left: it does nothing."""
    here = tmp_path / "here"
    (here / "results" / "bench").mkdir(parents=True)
    results = here / "results" / "smoke"
    small = dict(chain=[32, 4, 1], chain_methods=["ta_chain"], methods=["direct_kd"])
    plan = experiments.plan_grid(**GRID, **small)
    calls = lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                          minutes=5, jobs=1, preset="smoke", model="resnet8", grid=small,
                          part_mib=0.5, bench_args=TINY_BENCH, grace_s=120)
    again = json.loads((here / lease.LEASE_DIR / lease.AGAIN_FILE).read_text())
    assert again["carry"] == [] and lease.AGAIN_LEFT in again["command"]
    device, outs = tmp_path / "device", [tmp_path / "out1", tmp_path / "out2"]
    _device_copy(here, device)
    env = {**_device_env(tmp_path, outs[0]), "KDLIB_TENSORBOARD": "0", "OMP_NUM_THREADS": "1"}

    def make(command: str, out: Path) -> subprocess.CompletedProcess:
        out.mkdir(exist_ok=True)
        done = subprocess.run(["bash", "-c", command], cwd=device, env={**env, "OUT": str(out)},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    for call in calls:
        make(call["command"], outs[0])
    shutil.rmtree(device / "results")  # the tool copies the tree afresh at each call
    shutil.copytree(here / "results", device / "results")
    assert "too little" in make(again["command"].replace(lease.AGAIN_LEFT, "150"), outs[1]).stdout
    forgot = subprocess.run(["bash", "-c", again["command"]], cwd=device, capture_output=True,
                            text=True, env={**env, "OUT": str(outs[1])}, timeout=60)
    assert forgot.returncode == 2 and "budget_left_s" in forgot.stdout  # not put in: refused
    assert list(outs[1].iterdir()) == []
    fresh = subprocess.run(["bash", "-c", again["command"].replace(lease.AGAIN_LEFT, "400")],
                           cwd=device, capture_output=True, text=True, timeout=120,
                           env={**env, "OUT": str(outs[1]),
                                "KDLIB_LEASE_STASH": str(tmp_path / "fresh-stash")})
    assert fresh.returncode == lease.STASH_INCOMPLETE_EXIT and "fresh machine" in fresh.stdout
    assert list(outs[1].iterdir()) == []  # nothing packed: its tree's results are here already
    follow = make(again["command"].replace(lease.AGAIN_LEFT, "400.7"), outs[1])  # as replied
    lines = follow.stdout.splitlines()
    assert "put back what 1 earlier call(s) on this machine returned" in lines
    timeline = [line for line in lines if line.startswith("on this machine before: ")]
    assert [line.split(": ")[1] for line in timeline] == \
        [f"store {i}" for i in range(1, len(calls) + 1)] + ["go", "pack"]
    assert "s after go ended" in timeline[-1]  # the follow-up's margins, measured there
    assert not any(line.startswith(("bench:", "benchmark ", "done ")) for line in lines)
    lease.receive(outs[0], tmp_path / "first", tmp_path / "bench")
    first = {r["run_id"]: r["created_at"] for r in load_records(tmp_path / "first")}
    assert len(first) == len(plan)
    assert lease.receive(outs[1], tmp_path / "first", tmp_path / "bench")["records"] == 0
    assert {r["run_id"]: r["created_at"] for r in load_records(tmp_path / "first")} == first
    from kdlib import cli  # both calls' folders at once, in order

    monkeypatch.setattr(lease_commands, "REPO_ROOT", tmp_path)  # nothing of this checkout

    assert [lease.read_manifest(o)["preset"] for o in outs] == ["smoke", "smoke"]
    wrong = tmp_path / "wrong"  # a preset other than the returns' own: refused, nothing written
    assert cli.main(["lease", "receive", str(outs[0]), "--preset", "gpu",
                     "--results-dir", str(wrong), "--bench-dir", str(wrong / "bench")]) == 2
    assert not wrong.exists()
    # no --preset: the returns' own (the printed pack names it), as the README's receive says
    assert cli.main(["lease", "receive", str(outs[0]), str(outs[1]),
                     "--model", "resnet8", "--results-dir", str(results),
                     "--bench-dir", str(tmp_path / "bench2")]) == 0
    assert {r["run_id"]: r["created_at"] for r in load_records(results)} == first
    assert list((tmp_path / "bench2").glob("*.json"))


def _python3_shim(tmp_path: Path) -> Path:
    """A folder whose python3 runs this interpreter (the device's python3 holds torch)."""
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    script = shim / "python3"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    script.chmod(0o755)
    return shim


DEVICE_LACKS = ("papermill", "jupytext", "nbformat", "nbclient", "ipykernel", "ray", "nbval")


@pytest.mark.slow
def test_the_device_steps_need_no_notebook_packages(tmp_path):
    """The lent machine has no papermill, jupytext, ipykernel or Ray: the grid, the lease steps
    and the benchmark must import and parse without them."""
    code = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {DEVICE_LACKS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the device)", name=name)
sys.meta_path.insert(0, Absent())
import kdlib.cli, kdlib.lease, kdlib.bench.run, kdlib.executors, kdlib.experiments
for argv in (["grid", "--help"], ["lease", "go", "--help"], ["lease", "store", "--help"]):
    try:
        kdlib.cli.main(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
print("ok", sorted(m for m in sys.modules if m.split('.')[0] in {DEVICE_LACKS!r}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok []"


def test_store_names_a_path_the_call_did_not_carry(tmp_path):
    part = tmp_path / "data.xz.00"
    with pytest.raises(FileNotFoundError, match=f"not found: {part} \\(a call must carry each"):
        lease.store([part], stash=tmp_path / "stash")
    assert not (tmp_path / "stash").exists()


@pytest.mark.slow
def test_the_device_steps_that_only_move_files_start_without_torch(tmp_path):
    """`lease store` and `lease pack` begin and end the device's calls: `python -m kdlib` parses
    them without importing torch, pandas or the rest of the command line (`pack` then imports
    torch to name its device, `store` never)."""
    code = """
import runpy, sys
sys.argv = ["kdlib", *sys.argv[1:]]
try:
    runpy.run_module("kdlib", run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(sorted(m for m in ("torch", "pandas", "kdlib.cli") if m in sys.modules))
"""
    for step in ("store", "pack", "go"):
        done = subprocess.run([sys.executable, "-c", code, "lease", step, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"usage: python -m kdlib lease {step}" in done.stdout
        imported = done.stdout.strip().splitlines()[-1]
        assert imported == ("['kdlib.cli', 'pandas', 'torch']" if step == "go" else "[]"), step


def _device_copy(here: Path, device: Path) -> None:
    shutil.copytree(here, device)
    shutil.copytree(REPO / "kdlib", device / "kdlib", ignore=shutil.ignore_patterns("__pycache__"))


def _device_env(tmp_path: Path, out: Path) -> dict[str, str]:
    return {**os.environ, "KDLIB_LEASE_STASH": str(tmp_path / "stash"), "OUT": str(out),
            "PATH": f"{_python3_shim(tmp_path)}:{os.environ['PATH']}"}


def test_a_call_that_finds_a_fresh_machine_names_the_calls_to_make_again(fake_data_root,
                                                                          tmp_path):
    """The stash lives in the lent machine's memory and the machine goes back 30 s after a
    call: a call that finds a fresh one exits 3 naming the earlier calls to make again, and
    the last call then stores but neither trains nor packs. Made again, the calls go on."""
    here = tmp_path / "here"
    results = here / "results" / "smoke"
    plan = experiments.plan_grid(**GRID, chain=[32, 4], chain_methods=["ta_chain"],
                                 methods=["direct_kd"])
    calls = lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                          minutes=1, jobs=1, preset="smoke", model="resnet8", part_mib=0.5)
    assert len(calls) >= 3 and all(f"lease store --call {i}" in call["command"]
                                   for i, call in enumerate(calls, 1))
    assert all(f"{lease.LEASE_DIR}/{lease.STASH_PLAN}" in call["carry"] for call in calls)
    device, out = tmp_path / "device", tmp_path / "out"
    _device_copy(here, device)
    out.mkdir()
    env = _device_env(tmp_path, out)

    def make(i: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", calls[i - 1]["command"]], cwd=device, env=env,
                              capture_output=True, text=True, timeout=300)

    assert make(1).returncode == 0 and make(2).returncode == 0
    shutil.rmtree(tmp_path / "stash")  # the machine went back: call 3 finds a fresh one
    third = make(3)
    assert third.returncode == lease.STASH_INCOMPLETE_EXIT, third.stdout + third.stderr
    assert "call(s) 1, 2 stored" in third.stderr and "Make call(s) 1, 2 again" in third.stderr
    assert make(1).returncode == 0 and make(2).returncode == 0  # made again: the stash is whole
    assert "holds all 3 file(s)" in make(3).stdout
    assert all(make(i).returncode == 0 for i in range(4, len(calls)))
    part = tmp_path / "stash" / calls[0]["carry"][1].split("/")[-1]
    part.write_bytes(part.read_bytes()[:-1])  # another version of call 1's part is refused too
    last = make(len(calls))
    assert last.returncode == lease.STASH_INCOMPLETE_EXIT and "call(s) 1 stored" in last.stderr
    assert "this call again" in last.stderr and "lease go" not in last.stdout + last.stderr
    assert list(out.iterdir()) == []  # nothing trained, nothing packed


@pytest.mark.slow
def test_a_failing_go_still_returns_what_finished_and_fails_the_call(fake_data_root, tmp_path):
    """The last call packs whatever became of `go` (here: every part stored, but the archive
    they make is not the one the manifest names); its exit status is go's. Minutes that would
    outlast the call are refused."""
    here = tmp_path / "here"
    results = here / "results" / "gpu"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "earlier.json").write_text('{"run_id": "earlier"}')
    plan = experiments.plan_grid(**GRID, chain=[32, 4], chain_methods=["ta_chain"],
                                 methods=["direct_kd"])
    with pytest.raises(ValueError, match="timeout"):
        lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                      minutes=9.5, jobs=1, preset="smoke", part_mib=0.5)
    with pytest.raises(ValueError, match="2000"):  # the device tool's limit
        lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                      minutes=1, jobs=1, preset="smoke", part_mib=0.5,
                      bench_args={"variants": ["fp32"] * 300})
    calls = lease.prepare(plan, data_root=fake_data_root, results_dir=results, repo_root=here,
                          minutes=1, jobs=1, preset="smoke", model="resnet8", part_mib=0.5)
    assert "timeout -s INT" in calls[-1]["command"] and "lease pack" in calls[-1]["command"]
    device, out = tmp_path / "device", tmp_path / "out"
    _device_copy(here, device)
    out.mkdir()
    env = _device_env(tmp_path, out)
    manifest = device / lease.LEASE_DIR / lease.DATA_MANIFEST
    broken = json.loads(manifest.read_text())
    broken["sha256"] = "0" * 64
    manifest.write_text(json.dumps(broken))
    for call in calls:
        done = subprocess.run(["bash", "-c", call["command"]], cwd=device, env=env,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode not in (0, lease.STASH_INCOMPLETE_EXIT), done.stderr[-2000:]
    assert "does not match its sha256" in done.stderr and "packed" in done.stdout
    lease.receive(out, tmp_path / "back", tmp_path / "bench")
    assert (tmp_path / "back" / "runs" / "earlier.json").exists()


def test_the_stated_commit_wins_over_a_copied_trees_own_git(monkeypatch):
    """The device's copy of the tree may carry a .git older than its files: the commit the
    lease states is the code that ran."""
    from kdlib.results import git_commit

    here = git_commit()
    assert here  # this checkout is a git repository
    monkeypatch.setenv("KDLIB_GIT_COMMIT", "5e05d98")
    assert git_commit() == "5e05d98"


def test_the_call_log_times_each_step_and_the_gaps_between_calls(tmp_path, monkeypatch):
    """What each `go` logs of the steps before it on the machine: how long each ran, and the
    gaps (the transfers and starts between calls) that the follow-up's margins must cover."""
    from kdlib.lease import device as lease_device

    clock = iter([102.5, 111.0])  # when each step ended, as note_step reads the clock
    monkeypatch.setattr(lease_device, "time", SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(lease_device, "_uptime_s", lambda: 62.5)
    assert lease.call_timeline(tmp_path) == []
    lease_device.note_step(tmp_path, "store 1", 100.0)  # ran 2.5 s
    lease_device.note_step(tmp_path, "store 2", 110.0)  # began 7.5 s after store 1 ended
    assert lease.call_timeline(tmp_path) == [
        "store 1: 2.5 s, the machine up 60 s before it started",
        "store 2: 1.0 s, 7.5 s after store 1 ended"]


@pytest.mark.slow
def test_a_later_presets_compile_decision_is_measured_in_a_done_grids_spare_time(
        fake_data_root, tmp_path, monkeypatch, capsys):
    """A `gpu` lease whose grid is done, with time left, measures the compiled part that
    `paper` decides on before its first run (else paper's first lease would spend its
    benchmark on it and train nothing); not with too little time, not before the grid is
    done, not once measured with today's division, never on a CPU; `receive` prints the
    decision it leads to. (`paper` as it was before its decision, not compiling: the machinery
    serves any long grid that has not decided.)"""
    from kdlib import presets
    from kdlib.lease import device as lease_device
    from kdlib.quant.ste import COMPILED_DIVISION

    real = presets.build_config
    monkeypatch.setattr(presets, "build_config",
                        lambda *a, **k: real(*a, **k).replace(compile=False))
    old = {"compiled": {"division": "an earlier one"}}
    assert lease.later_compile_parts(old, "cuda", "gpu") == ["paper"]
    assert lease.later_compile_parts(old, "cuda", "paper") == []  # its own: before its grid
    assert lease.later_compile_parts(old, "cpu", "gpu") == []
    assert lease.later_compile_parts({"compiled": {"division": COMPILED_DIVISION}}, "cuda",
                                     "gpu") == []
    assert lease.later_compile_parts(None, "cuda", "gpu") == []

    completed, lines = [], []
    with monkeypatch.context() as patched:
        patched.setattr(lease_device, "complete_bench",
                        lambda bench, *a, preset, **k: completed.append(preset) or Path("b.json"))
        spare = dict(preset="gpu", model="resnet20", data_root=fake_data_root, log=lines.append)
        assert lease_device._measure_in_spare_time(old, tmp_path, "cuda", seconds=290,
                                                   **spare) is None
        assert completed == [] and "too few" in lines[-1]
        assert lease_device._measure_in_spare_time(old, tmp_path, "cuda", seconds=310,
                                                   **spare) == Path("b.json")
        assert completed == ["paper"]

    calls = []  # in `go`: only once every planned run has a record
    monkeypatch.setattr(lease_device, "_measure_in_spare_time",
                        lambda *a, **k: calls.append(k["seconds"]))
    small = dict(chain=[32, 1], chain_methods=["ta_chain"], methods=["direct_kd"])
    results = tmp_path / "results"

    def go(minutes: float) -> dict:
        return lease.go(preset="smoke", minutes=minutes, jobs=1, results_dir=results,
                        repo_root=tmp_path / "repo", model="resnet8", bench="auto",
                        bench_args=TINY_BENCH, stash=tmp_path / "stash",
                        data_root=fake_data_root, grid=small, reserve_s=0.0, log=lambda m: None)

    assert go(0.001)["records"] == 0 and calls == []  # no time: nothing trained, grid not done
    summary = go(5)
    assert summary["records"] == summary["planned"] > 0 and len(calls) == 1 and calls[0] > 0

    measured = {"compiled": {"division": COMPILED_DIVISION, "levels": {"exact": True},
                             "concurrency": {"by_jobs": {"1": {"images_per_s": 8000.0,
                                                               "ready_s": 40.0}}}},
                "concurrency": {"by_jobs": {"1": {"images_per_s": 3000.0}}}}
    received = tmp_path / "NVIDIA_H200.json"
    for exact in (True, False):  # inexact compiled levels: nothing to decide, nothing said
        measured["compiled"]["levels"]["exact"] = exact
        received.write_text(json.dumps(measured))
        capsys.readouterr()
        lease_commands._note_compile_decisions([received])
        out = capsys.readouterr().out
        assert ("set compile=True in its preset" in out) if exact else out == ""
    monkeypatch.undo()  # paper as it is, compiling: only inexact levels are worth a line
    for exact in (True, False):
        measured["compiled"]["levels"]["exact"] = exact
        received.write_text(json.dumps(measured))
        lease_commands._note_compile_decisions([received])
        out = capsys.readouterr().out
        assert out == "" if exact else ("`paper` compiles, but this device's benchmark found "
                                        "them not exact" in out)


def test_go_caps_the_runs_that_pause_at_the_runs_it_trains_at_once(fake_data_root, tmp_path,
                                                                    monkeypatch):
    """`go --jobs auto` takes its count from the benchmark, and its budget lets no more runs
    pause than that: their checkpoints must come back and travel out again."""
    import kdlib.budget
    import kdlib.executors

    budgets = []

    class Recorded(kdlib.budget.Budget):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            budgets.append(self)

    monkeypatch.setattr(kdlib.budget, "Budget", Recorded)
    monkeypatch.setattr(kdlib.executors, "execute_processes", lambda *a, **k: [])  # no training
    monkeypatch.setattr(kdlib.budget, "load_bench", lambda folder, kind: {"concurrency": {
        "by_jobs": {"1": {"images_per_s": 100.0}, "2": {"images_per_s": 200.0},
                    "4": {"images_per_s": 300.0}}}})  # 4 adds 50% over 2: worth it
    summary = lease.go(preset="smoke", minutes=1, jobs="auto", results_dir=tmp_path / "results",
                       repo_root=tmp_path / "repo", model="resnet8", bench="never",
                       stash=tmp_path / "stash", data_root=fake_data_root, log=lambda m: None)
    assert summary["planned"] > 0
    (budget,) = budgets
    assert budget.max_spans == 4  # 4 at a time, so at most 4 pause


@pytest.mark.parametrize("check, grouped", [
    ({"exact": True, "by_bits": {"4": {"values": True, "gradients": True}}}, True),
    ({"exact": False, "by_bits": {"4": {"values": True, "gradients": True},
                                  "8": {"values": True, "gradients": False}}}, False),
    ({"error": "RuntimeError: no kernel image"}, False),
    (None, True),  # a benchmark without the part: the default, cross-checked on the CPU
    ({"by_bits": {"8": {"values": True, "gradients": False}}}, False),  # no verdict stated
], ids=["equal", "differs", "check-failed", "no-check", "no-verdict"])
def test_go_quantizes_weights_per_layer_where_the_device_check_found_grouped_ones_differ(
        fake_data_root, tmp_path, monkeypatch, check, grouped):
    import kdlib.budget
    import kdlib.executors

    plans = []
    monkeypatch.setattr(kdlib.executors, "execute_processes",
                        lambda plan, **k: plans.append(plan) or [])
    bench = {"concurrency": {"by_jobs": {"1": {"images_per_s": 100.0},
                                         "2": {"images_per_s": 200.0}}}}
    if check is not None:
        bench["grouped"] = {"check": check}
    monkeypatch.setattr(kdlib.budget, "load_bench", lambda folder, kind: bench)
    logged = []
    lease.go(preset="smoke", minutes=1, jobs="auto", results_dir=tmp_path / "results",
             repo_root=tmp_path / "repo", model="resnet8", bench="never",
             stash=tmp_path / "stash", data_root=fake_data_root, log=logged.append)
    (plan,) = plans
    assert plan and all(cfg.group_weights is grouped for cfg in plan)
    line = next(m for m in logged if m.startswith("grid: weights"))
    assert ("together" in line) is grouped
    if check and not grouped:
        assert ("at 8 bits" in line) if "by_bits" in check else ("no kernel image" in line)


# CIFAR-100's three files as `lease prepare` packs them (pixels as residuals, xz), measured on
# the real data: 100,517,180 bytes (123,234,560 with xz's delta filters on the raw pixels)
CIFAR100_XZ_MIB = 95.9


@pytest.mark.parametrize("tree_mib", [10.0, 29.01, 30.0, 35.4, 37.0, 44.25])
def test_prepare_says_how_far_the_tree_may_grow_before_the_data_takes_another_call(tree_mib):
    from kdlib.lease.prepare import room_before_another_call
    from kdlib.lease.transfer import CALL_MARGIN_MIB, CALL_MIB

    data = int(95.9 * lease.MIB)

    def calls(tree):  # as prepare sizes the parts: whole MiB, what the tree leaves of a call
        return math.ceil(data / (int(CALL_MIB - CALL_MARGIN_MIB - tree) * lease.MIB))

    room = room_before_another_call(data, int(tree_mib * lease.MIB))
    assert room >= 0
    assert calls(tree_mib + room - 0.01) == calls(tree_mib)
    assert calls(tree_mib + room + 0.01) == calls(tree_mib) + 1


@pytest.mark.parametrize("preset", ["gpu", "paper"])
def test_this_checkout_sends_the_data_in_at_most_three_calls(preset):
    """Every byte the tree sends travels with each call of a lease and leaves that much less of
    the call for the data's parts: the package, the tests and notebooks, the preset's results
    and the benchmarks (the other presets' are hidden for the lease). Two calls on 2026-12-05
    (`lease prepare` prints how far the tree may grow before a third); a commit of large files
    that costs a lease a fourth data call fails here (keep such files out of git:
    .gitignore's results/*/models rules)."""

    from kdlib.lease.prepare import part_mib_for
    from kdlib.lease.tracked import untravelled_results

    root = Path(__file__).resolve().parents[1]
    part = part_mib_for(root, untravelled_results(root, root / "results" / preset))
    assert math.ceil(CIFAR100_XZ_MIB / part) <= 3, f"data parts of {part:g} MiB"


def test_a_returned_benchmark_damaged_in_transfer_is_refused(tmp_path):
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "a.json").write_text('{"run_id": "a"}')
    bench = tmp_path / "NVIDIA_H200.json"
    bench.write_text('{"device": "H200"}')
    lease.pack_outputs(results, tmp_path / "out", [bench])
    (tmp_path / "out" / bench.name).write_text('{"device": "H2OO"}')  # one byte off
    with pytest.raises(ValueError, match="NVIDIA_H200.json does not match its sha256"):
        lease.receive(tmp_path / "out", tmp_path / "back", tmp_path / "bench")
    # refused before anything is unpacked: no return half received
    assert not (tmp_path / "bench" / bench.name).exists()
    assert not (tmp_path / "back" / "runs" / "a.json").exists()


def test_a_result_rewritten_at_the_same_size_comes_back(tmp_path):
    results, stash = tmp_path / "results", tmp_path / "stash"
    (results / "runs").mkdir(parents=True)
    record = results / "runs" / "r.json"
    record.write_text('{"run_id": "r", "acc": 1}')
    lease.snapshot_results(results, stash)
    record.write_text('{"run_id": "r", "acc": 2}')  # the grid rewrote it: same size, later
    later = record.stat().st_mtime_ns + 10**9
    os.utime(record, ns=(later, later))
    lease.pack(results, tmp_path / "out", tmp_path / "bench", device="cpu", stash=stash)
    lease.receive(tmp_path / "out", tmp_path / "back", tmp_path / "back-bench")
    assert (tmp_path / "back" / "runs" / "r.json").read_text() == '{"run_id": "r", "acc": 2}'
    # a file system whose clock ticks coarsely: rewritten within the tick, another size
    lease.snapshot_results(results, stash)
    before = record.stat().st_mtime_ns
    record.write_text('{"run_id": "r", "acc": 30}')
    os.utime(record, ns=(before, before))
    lease.pack(results, tmp_path / "out2", tmp_path / "bench", device="cpu", stash=stash)
    lease.receive(tmp_path / "out2", tmp_path / "back", tmp_path / "back-bench")
    assert (tmp_path / "back" / "runs" / "r.json").read_text() == '{"run_id": "r", "acc": 30}'


def test_a_stash_that_assembled_other_data_assembles_the_new_parts(fake_data_root, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fake_data_root, other)
    source = other / "cifar-100-python"  # other files: train and test swapped
    (source / "train").rename(source / "swap")
    (source / "test").rename(source / "train")
    (source / "swap").rename(source / "test")
    stash = tmp_path / "stash"
    for root, folder in ((fake_data_root, tmp_path / "lease1"), (other, tmp_path / "lease2")):
        manifest = lease.pack_data(root, folder, part_mib=0.2, compress=fast)
        for part in manifest["parts"]:
            lease.store_part(folder / part["name"], stash)
        data = lease.assemble_data(stash)
        for name in lease.DATA_FILES:
            assert (data / "cifar-100-python" / name).read_bytes() == \
                (root / "cifar-100-python" / name).read_bytes()


def test_pack_data_packs_again_for_another_part_size(fake_data_root, tmp_path):
    lease.pack_data(fake_data_root, tmp_path, part_mib=0.4, compress=fast)
    smaller = lease.pack_data(fake_data_root, tmp_path, part_mib=0.2, compress=fast)
    assert all(p["bytes"] <= 0.2 * lease.MIB for p in smaller["parts"])
    assert sorted(p.name for p in tmp_path.glob("data.xz.*")) == \
        [p["name"] for p in smaller["parts"]]
    larger = lease.pack_data(fake_data_root, tmp_path, part_mib=0.4, compress=fast)
    assert sorted(p.name for p in tmp_path.glob("data.xz.*")) == \
        [p["name"] for p in larger["parts"]]  # no stale part of the smaller packing left


def test_receive_takes_the_returns_preset_and_refuses_another_or_a_mix(tmp_path):
    """The returns go into their own preset's folder: a --preset that disagrees, or returns of
    two presets' grids in one command, are refused (records in the wrong results folder)."""
    def returned(name: str, preset: str | None, number: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        manifest = {"sha256": name, "returned": number}
        (folder / "manifest.json").write_text(json.dumps(
            manifest if preset is None else {**manifest, "preset": preset}))
        return folder

    gpu, paper, old = returned("a", "gpu", 0), returned("b", "paper", 1), returned("c", None, 0)
    assert lease.returned_preset([gpu], None) == "gpu"
    assert lease.returned_preset([gpu, old], None) == "gpu"
    with pytest.raises(ValueError, match="preset 'gpu''s grid, not 'paper''s"):
        lease.returned_preset([gpu], "paper")
    with pytest.raises(ValueError, match=r"several presets \(gpu, paper\)"):
        lease.returned_preset([gpu, paper], None)
    with pytest.raises(ValueError, match=r"several presets \(gpu, paper\)"):
        lease.returned_preset([gpu, paper], "gpu")
    with pytest.raises(ValueError, match="calls' order"):  # two machines' return 0 each
        lease.check_returns([gpu, returned("d", "gpu", 0)])


def test_two_returns_that_brought_nothing_new_are_still_two_returns(tmp_path):
    results, stash = tmp_path / "results", tmp_path / "stash"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "old.json").write_text('{"run_id": "old"}')
    outs = [tmp_path / "out0", tmp_path / "out1"]
    for out in outs:  # the last call and its follow-up, both with nothing left to train
        lease.snapshot_results(results, stash)
        lease.pack(results, out, tmp_path / "bench", device="cpu", stash=stash)
    lease.check_returns(outs)


def test_a_folder_left_out_of_the_tree_leaves_folders_whose_names_it_begins(tmp_path):
    from kdlib.lease.tracked import travelling_files
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for name in ("results/quick/m.bin", "results/quick_squeezenet/m.bin"):
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_bytes(b"x" * 10)
    sent = travelling_files(tmp_path, leaving=[tmp_path / "results" / "quick"])
    assert sent == {"results/quick_squeezenet/m.bin": 10}


def test_a_carried_file_that_exactly_fills_the_room_a_part_leaves_rides_with_it(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"w" * 1000)
    assert lease.plan_carry([4000], [weights], 5000) == ([[weights]], [])
    # from the last call back: the data's first calls stay lean
    assert lease.plan_carry([100, 100], [weights], 5000) == ([[], [weights]], [])
    with pytest.raises(ValueError, match="larger than what a call can carry"):
        lease.plan_carry([10], [weights], 999)  # one byte over: no call could hold it


def test_a_data_part_is_the_whole_mib_a_call_leaves_and_never_under_the_smallest():
    """A part rounded up would push its call past the tool's 64 MiB; a tree that leaves less
    than MIN_PART_MIB is refused (a lease of dozens of calls), and the room left says so."""
    from kdlib.lease.prepare import fallback_parts, part_mib_beside, room_before_another_call
    from kdlib.lease.transfer import CALL_MARGIN_MIB, CALL_MIB, MIN_PART_MIB

    def tree_leaving(room_mib: float) -> int:
        return int((CALL_MIB - CALL_MARGIN_MIB - room_mib) * lease.MIB)

    assert part_mib_beside(tree_leaving(10.9)) == 10
    assert part_mib_beside(tree_leaving(MIN_PART_MIB)) == MIN_PART_MIB
    with pytest.raises(ValueError, match="commit fewer large files"):
        part_mib_beside(tree_leaving(MIN_PART_MIB - 0.5))
    data = int(95.9 * lease.MIB)
    assert room_before_another_call(data, tree_leaving(MIN_PART_MIB - 0.5)) < 0
    assert "no data part fits" in fallback_parts(data, tree_leaving(MIN_PART_MIB - 0.5))


@pytest.mark.parametrize("minutes, reserve_s", [(1, 6.0), (10, 45.0)])
def test_go_keeps_a_tenth_of_its_minutes_at_most_45_s_for_runs_that_overrun(
        fake_data_root, tmp_path, monkeypatch, minutes, reserve_s):
    import re
    import kdlib.executors

    monkeypatch.setattr(kdlib.executors, "execute_processes", lambda *a, **k: [])  # no training
    logged = []
    lease.go(preset="smoke", minutes=minutes, jobs=2, results_dir=tmp_path / "results",
             repo_root=tmp_path / "repo", model="resnet8", bench="never",
             stash=tmp_path / "stash", data_root=fake_data_root, log=logged.append)
    line = next(m for m in logged if m.startswith("grid: ") and "s of budget" in m)
    budget_s = float(re.search(r"(\d+) s of budget", line).group(1))
    assert 60 * minutes - reserve_s - 3 <= budget_s <= 60 * minutes - reserve_s + 0.5


def test_by_default_a_return_is_at_most_eight_files_of_at_most_16_mib(tmp_path):
    """The device tool returns at most 8 files of at most 16 MiB: a larger file or a ninth
    one is lost with the lease's results, so `pack` splits the results and counts the
    benchmarks beside them, refusing before it writes anything."""
    results = tmp_path / "results"
    (results / "checkpoints").mkdir(parents=True)
    (results / "checkpoints" / "a.weights.pt").write_bytes(os.urandom(20 * lease.MIB))
    benches = []
    for i in range(6):
        benches.append(tmp_path / f"GPU_{i}.json")
        benches[-1].write_text("{}")
    files = lease.pack_outputs(results, tmp_path / "out", benches[:5])
    assert len(files) == lease.OUT_MAX_FILES == 8  # the manifest, 2 parts, 5 benchmarks
    assert all(path.stat().st_size <= 16 * lease.MIB for path in files)
    with pytest.raises(ValueError, match="9 files to return, more than 8"):
        lease.pack_outputs(results, tmp_path / "over", benches)
    assert not list((tmp_path / "over").iterdir())


def test_a_return_one_file_over_the_limit_is_refused(tmp_path):
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "a.json").write_text('{"run_id": "a"}')
    assert len(lease.pack_outputs(results, tmp_path / "fits", max_files=2)) == 2  # manifest, part
    with pytest.raises(ValueError, match="2 files to return, more than 1"):
        lease.pack_outputs(results, tmp_path / "over", max_files=1)
    assert not list((tmp_path / "over").iterdir())  # refused before any file is written


def test_a_benchmark_file_over_the_return_limit_is_refused_before_anything_is_written(tmp_path):
    """Results are split into parts, the benchmark files beside them are not: one over the
    limit would be dropped by the device tool, the lease's benchmark lost."""
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "a.json").write_text('{"run_id": "a"}')
    bench = tmp_path / "NVIDIA_H200.json"
    bench.write_bytes(b"0" * 200_000)
    assert len(lease.pack_outputs(results, tmp_path / "fits", [bench], file_mib=0.2)) == 3
    with pytest.raises(ValueError, match=r"NVIDIA_H200.json \(0.2 MiB\): over the 0.1 MiB"):
        lease.pack_outputs(results, tmp_path / "over", [bench], file_mib=0.1)
    assert not list((tmp_path / "over").iterdir())


def test_go_takes_a_follow_ups_seconds_as_seconds(tmp_path, monkeypatch):
    """A follow-up's --seconds are seconds; every other option of `go`'s command line reaches
    `lease.go`, whose benchmarks are the working directory's results/bench, where `pack` looks
    for them."""
    from kdlib import cli

    seen = []
    monkeypatch.setattr(lease, "go", lambda **kwargs: seen.append(kwargs))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["lease", "go", "--preset", "smoke", "--results-dir", str(tmp_path),
                     "--seconds", "150", "--bench", "never"]) == 0
    assert seen[-1]["minutes"] == 2.5 and seen[-1]["bench"] == "never"
    assert cli.main(["lease", "go", "--preset", "smoke", "--results-dir", str(tmp_path)]) == 0
    assert {k: seen[-1][k] for k in ("model", "jobs", "bench", "device", "bench_args", "grid",
                                     "results_dir", "repo_root")} == {
        "model": "resnet20", "jobs": "auto", "bench": "auto", "device": None, "bench_args": None,
        "grid": {}, "results_dir": tmp_path.resolve(), "repo_root": tmp_path}
    assert cli.main(["lease", "go", "--preset", "smoke", "--model", "resnet8", "--minutes", "3",
                     "--jobs", "2", "--device", "cpu", "--bench", "always", "--bench-args",
                     '{"windows": 1}', "--seeds", "5", "--methods", "direct_kd",
                     "--results-dir", str(tmp_path / "r")]) == 0
    assert {k: seen[-1][k] for k in ("model", "minutes", "jobs", "bench", "device", "bench_args",
                                     "grid", "results_dir")} == {
        "model": "resnet8", "minutes": 3.0, "jobs": 2, "bench": "always", "device": "cpu",
        "bench_args": {"windows": 1}, "grid": {"seeds": [5], "methods": ["direct_kd"]},
        "results_dir": (tmp_path / "r").resolve()}


@pytest.mark.parametrize("go_rc, pack_rc, call_rc", [(0, 0, 0), (5, 0, 5), (0, 1, 1)])
def test_the_last_call_packs_whatever_go_did_and_fails_when_either_failed(tmp_path, go_rc,
                                                                          pack_rc, call_rc):
    """The last call's shell (python3 stubbed: seconds, not the slow tests' minutes): `go` for
    the lease's minutes, then `pack` even after a failing `go`; the call fails with `go`'s status,
    or with `pack`'s where the files could not be packed (a call that returns nothing must not
    look like a success)."""
    from kdlib.lease.prepare import device_commands

    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "$*" >> "$LOG"\n'
                    'case "$*" in *"lease go"*) exit $GO_RC;; *) exit $PACK_RC;; esac\n')
    stub.chmod(0o755)
    finish, _ = device_commands(preset="smoke", model="resnet8", jobs=1, grid=None,
                                rel_results="results/smoke", bench_args=None, minutes=2)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
           "LOG": str(log), "GO_RC": str(go_rc), "PACK_RC": str(pack_rc), "OUT": "out"}
    done = subprocess.run(["bash", "-c", finish], env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == call_rc
    go, pack = log.read_text().splitlines()
    assert "lease go --preset smoke" in go and go.endswith("--minutes 2")
    assert pack.startswith("-m kdlib lease pack --preset smoke") and pack.endswith("--out out")


@pytest.mark.parametrize("left, go_s", [(400.7, 300), (200, 100), (199, None), (5000, None)])
def test_the_follow_up_gives_go_the_seconds_left_less_its_margin_and_never_overruns(
        tmp_path, left, go_s):
    """The follow-up call's shell (`timeout` and python3 stubbed): `go` for the session's
    seconds left less AGAIN_GO_MARGIN_S, interrupted go's grace after them; at AGAIN_MIN_S
    left it still runs, below it does nothing; with more left than one call holds, capped so
    that `go`'s hard limit and `pack` end inside the call's timeout."""
    from kdlib.lease.prepare import device_commands
    from kdlib.lease.transfer import (AGAIN_GO_MARGIN_S, AGAIN_LEFT, CALL_TIMEOUT_S, GO_GRACE_S,
                                      KILL_AFTER_S, PACK_S)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\necho "python3 $*" >> "$LOG"\n')
    (bin_dir / "timeout").write_text('#!/bin/sh\necho "timeout $*" >> "$LOG"\n'
                                     'shift 5\nexec "$@"\n')  # -s INT -k KILL LIMIT
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    _, again = device_commands(preset="smoke", model="resnet8", jobs=1, grid=None,
                               rel_results="results/smoke", bench_args=None, minutes=2)
    log = tmp_path / "log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LOG": str(log),
           "OUT": "out"}
    done = subprocess.run(["bash", "-c", again.replace(AGAIN_LEFT, str(left))], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = log.read_text().splitlines()
    if left < 200:
        assert lines == [] and "too little" in done.stdout
        return
    limit = int(lines[0].split()[5])
    seconds = int(lines[0].split("--seconds ")[1].split()[0])
    assert seconds == go_s if go_s else seconds + AGAIN_GO_MARGIN_S < left
    assert limit - seconds == GO_GRACE_S  # its budgeted runs stop before the interruption
    kill = int(lines[0].split()[4])
    # a `go` that ignores its interruption killed, then pack, inside the call's timeout
    assert kill == KILL_AFTER_S and limit + kill + PACK_S <= CALL_TIMEOUT_S
    assert "lease pack" in lines[-1]


def test_go_s_command_line_carries_the_grid_prepare_planned(tmp_path):
    """The grid options given to `prepare` reach the device's `go` as it parses them: a lease
    that trained another grid (say, the preset's seeds) would return records nobody asked for."""
    import argparse
    import shlex

    from kdlib.lease.prepare import device_commands

    grid = {"seeds": [3, 4], "chain": [32, 4], "chain_methods": ["ta_chain"],
            "methods": ["direct_kd"]}
    finish, again = device_commands(preset="smoke", model="resnet8", jobs=2, grid=grid,
                                    rel_results="results/smoke", bench_args=None, minutes=2)
    parser = argparse.ArgumentParser()
    lease_commands.add_lease_parser(parser.add_subparsers(dest="command"))
    go = finish[finish.index("python3 -m kdlib lease go"):].split(";")[0]
    args = parser.parse_args(shlex.split(go)[3:])
    assert (args.step, args.preset, args.jobs) == ("go", "smoke", 2)
    assert (args.seeds, args.chain, args.chain_methods, args.methods) == \
        ([3, 4], ["32", "4"], ["ta_chain"], ["direct_kd"])
    assert go.split(" --minutes")[0] + " --seconds" in again  # the follow-up: the same grid


def test_only_the_last_call_finishes_and_gets_the_long_timeout(tmp_path):
    """A call that only stores its carry is short: a stuck one fails in 2 minutes, not 10."""
    from kdlib.lease.prepare import _calls
    from kdlib.lease.transfer import CALL_TIMEOUT_S

    parts = [None, {"name": "data.xz.00"}, {"name": "data.xz.01"}]
    groups = [tmp_path / "weights" / "00", None, None]
    calls = _calls(parts, groups, tmp_path, "FINISH")
    assert [c["timeout_s"] for c in calls] == [120, 120, CALL_TIMEOUT_S]
    assert [c["command"].endswith("&& FINISH") for c in calls] == [False, False, True]


@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_jobs_is_auto_or_a_positive_integer(jobs, capsys, monkeypatch):
    """Refused by the parser, before anything is planned or packed."""
    from kdlib import cli

    monkeypatch.setattr(lease, "prepare", lambda *a, **k: pytest.fail("prepared"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["lease", "prepare", "--preset", "smoke", "--jobs", jobs])
    assert exit.value.code == 2
    assert "give 'auto' or an integer >= 1" in capsys.readouterr().err


def test_prepare_passes_the_command_lines_grid_and_the_presets_results_folder(monkeypatch,
                                                                              tmp_path):
    """--seeds and the other grid options reach both the plan and `go`'s command line; without
    --results-dir the folder is the preset's; every other option reaches `lease.prepare`, and
    the defaults leave the last call inside its timeout with the benchmark choosing the jobs."""
    from kdlib import cli
    from kdlib.checkout import default_results_dir
    from kdlib.data import resolve_data_root
    from kdlib.lease.prepare import device_commands

    seen = {}

    def prepare(plan, **kwargs):
        seen.update(kwargs, seeds={cfg.seed for cfg in plan}, models={cfg.model for cfg in plan})
        raise ValueError("stop here")

    monkeypatch.setattr(lease, "prepare", prepare)
    assert cli.main(["lease", "prepare", "--preset", "smoke", "--seeds", "3", "4"]) == 2
    assert seen["grid"] == {"seeds": [3, 4]} and seen["seeds"] == {3, 4}
    assert seen["results_dir"] == default_results_dir("smoke").resolve()
    assert (seen["jobs"], seen["bench_args"], seen["part_mib"]) == ("auto", None, None)
    assert seen["model"] == "resnet20" and seen["data_root"] == resolve_data_root(None)
    device_commands(preset="smoke", model="resnet20", jobs=1, grid=None,  # not refused
                    rel_results="results/smoke", bench_args=None, minutes=seen["minutes"])
    seen.clear()
    assert cli.main(["lease", "prepare", "--preset", "smoke", "--model", "resnet8", "--minutes",
                     "4", "--jobs", "2", "--data-dir", str(tmp_path / "data"), "--bench-args",
                     '{"windows": 1}', "--part-mib", "3", "--results-dir",
                     str(tmp_path / "r")]) == 2
    assert {k: seen[k] for k in ("minutes", "jobs", "bench_args", "part_mib", "model", "models",
                                 "data_root", "results_dir", "preset", "grid")} == {
        "minutes": 4.0, "jobs": 2, "bench_args": {"windows": 1}, "part_mib": 3.0,
        "model": "resnet8", "models": {"resnet8"}, "data_root": (tmp_path / "data").absolute(),
        "results_dir": (tmp_path / "r").resolve(), "preset": "smoke", "grid": {}}


def test_go_that_finds_a_fresh_machine_exits_with_the_status_the_follow_up_checks(
        tmp_path, monkeypatch):
    """The follow-up call skips its pack only on this status (a stash without the data)."""
    from kdlib import cli

    def go(**_):
        raise lease.StashIncomplete("call 1's files are gone")

    monkeypatch.setattr(lease, "go", go)
    assert cli.main(["lease", "go", "--preset", "smoke", "--results-dir",
                     str(tmp_path)]) == lease.STASH_INCOMPLETE_EXIT


def test_prepare_prints_the_calls_the_follow_up_and_the_receive_to_copy(tmp_path, monkeypatch,
                                                                        capsys):
    """What `prepare` prints is copied into the device tool and the shell: each call's carry as
    JSON (the tool's list), the follow-up from .lease/, the copy of the last call's files before
    it, and the receive of both returns; the committed weights no run of the preset's whole grid
    needs (not only --seeds' runs) are the ones named for `git rm`."""
    from kdlib import cli
    from kdlib.presets import get_preset

    calls = [{"carry": [".lease/data.xz.00"], "timeout_s": 120, "command": "STORE 1"},
             {"carry": [".lease/data.xz.01", ".lease/stash.json"], "timeout_s": 600,
              "command": "STORE 2 && FINISH"}]
    (tmp_path / lease.LEASE_DIR).mkdir()
    (tmp_path / lease.LEASE_DIR / lease.AGAIN_FILE).write_text(
        json.dumps({"timeout_s": 590, "command": "AGAIN"}))
    monkeypatch.setattr(lease_commands, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(lease, "prepare", lambda plan, **kwargs: calls)
    planned = []
    monkeypatch.setattr(lease, "unneeded_committed_weights",
                        lambda plan, results_dir, repo_root: planned.append(plan) or [])
    assert cli.main(["lease", "prepare", "--preset", "smoke", "--seeds", "7", "--results-dir",
                     str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1:5] == ['1. carry=[".lease/data.xz.00"] timeout_s=120', "   STORE 1",
                          '2. carry=[".lease/data.xz.01", ".lease/stash.json"] timeout_s=600',
                          "   STORE 2 && FINISH"]
    assert f"cp -r FILES_AT {lease.LEASE_DIR}/back-2," in lines[5]
    assert "carry=[] timeout_s=590" in lines[5] and lines[6] == "   AGAIN"
    assert lines[-1] == (f"then: python -m kdlib lease receive {lease.LEASE_DIR}/back-2 "
                         "[FOLDER_OF_CALL_3] --preset smoke")
    assert [{cfg.seed for cfg in plan} for plan in planned] == [set(get_preset("smoke").seeds)]


def test_the_light_entry_packs_what_pack_is_given_and_refuses_with_status_2(tmp_path,
                                                                           monkeypatch, capsys):
    """`store` and `pack` start through main_light, without kdlib.cli: `pack` hands the preset
    (named in the manifest), --out and the working directory's results/bench to `lease.pack`; a
    part the call did not carry is an error with status 2, as through kdlib.cli."""
    packed = []
    monkeypatch.setattr(lease, "pack", lambda *a, **k: packed.append((a, k)))
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()
    assert lease_commands.main_light(["lease", "pack", "--out", "o", "--preset", "smoke",
                                      "--results-dir", "r"]) == 0
    assert packed == [((here / "r", Path("o"), here / "results" / "bench"), {"preset": "smoke"})]

    def store(paths, call):
        raise FileNotFoundError(f"not found: {paths[0]}")

    monkeypatch.setattr(lease, "store", store)
    capsys.readouterr()
    assert lease_commands.main_light(["lease", "store", "data.xz.00", "--call", "2"]) == 2
    assert capsys.readouterr().err == "error: not found: data.xz.00\n"


def test_receive_unpacks_the_returns_in_order_and_says_what_the_next_lease_needs(
        tmp_path, monkeypatch, capsys):
    """`lease receive`: refused (status 2, nothing written) for a --preset that is not the
    returns'; else the returns unpacked in the calls' order (the follow-up's record replaces
    the last call's), their benchmarks into --bench-dir, each benchmark's compile decision
    printed for every preset (with that preset's results), a paused run that finished said;
    the grid of the returns' preset and --model is the one staged and noted for the next
    lease."""
    from kdlib import cli
    from kdlib.checkout import default_results_dir
    from kdlib.presets import PRESETS, get_preset

    device = tmp_path / "device"
    (device / "runs").mkdir(parents=True)
    outs = [tmp_path / "out0", tmp_path / "out1"]
    for i, out in enumerate(outs):  # the last call, then its follow-up
        (device / "runs" / "r.json").write_text(json.dumps({"run_id": "r", "call": i}))
        bench = tmp_path / f"GPU_{i}.json"
        bench.write_text(json.dumps({"call": i}))
        lease.pack_outputs(device, out, [bench], returned=i, preset="smoke")
    here, bench_dir = tmp_path / "here", tmp_path / "b"
    (here / "checkpoints").mkdir(parents=True)
    (here / "checkpoints" / "r.pt").write_bytes(b"paused by an earlier lease")
    weights = here / "checkpoints" / "t.weights.pt"
    weights.write_bytes(b"w")
    decided, seen = [], {}

    def undecided(bench, name, model, results_dir):
        decided.append((name, results_dir))
        return f"call {bench['call']} decides {name}" if name == "paper" else None

    monkeypatch.setattr(lease, "compile_undecided", undecided)
    monkeypatch.setattr(lease_commands, "REPO_ROOT", tmp_path)  # nothing of this checkout
    monkeypatch.setattr(lease, "stage_for_next_lease", lambda plan, results_dir, repo_root:
                        seen.update(plan=plan, where=(results_dir, repo_root))
                        or {"added": [weights], "removed": []})
    monkeypatch.setattr(lease, "planned_paused", lambda plan, results_dir: [here / "p.pt"])
    monkeypatch.setattr(lease, "unneeded_committed_weights",
                        lambda plan, results_dir, repo_root: [weights])
    monkeypatch.setattr(lease, "unhide_after_lease", lambda repo_root: ["results/quick"])
    assert cli.main(["lease", "receive", *map(str, outs), "--preset", "quick", "--results-dir",
                     str(here), "--bench-dir", str(bench_dir)]) == 2  # smoke's returns
    assert not (here / "runs").exists() and not bench_dir.exists() and decided == []
    assert cli.main(["lease", "receive", *map(str, outs), "--model", "resnet8",
                     "--results-dir", str(here), "--bench-dir", str(bench_dir)]) == 0
    out = capsys.readouterr().out
    assert json.loads((here / "runs" / "r.json").read_text())["call"] == 1
    assert sorted(p.name for p in bench_dir.iterdir()) == ["GPU_0.json", "GPU_1.json"]
    assert [line for line in out.splitlines() if line.startswith("GPU_")] == [
        "GPU_0.json: call 0 decides paper", "GPU_1.json: call 1 decides paper"]
    assert sorted(set(decided)) == sorted((name, default_results_dir(name)) for name in PRESETS)
    assert "1 paused run(s) finished" in out and not (here / "checkpoints" / "r.pt").exists()
    assert {cfg.model for cfg in seen["plan"]} == {"resnet8"}
    assert {cfg.seed for cfg in seen["plan"]} == set(get_preset("smoke").seeds)
    assert seen["where"] == (here.resolve(), tmp_path)
    assert "staged in git: 1 weight or checkpoint file(s)" in out
    assert "1 paused run(s) continue next lease" in out
    assert "no unfinished run needs 1 committed weight file(s)" in out
    assert "back in git's index: results/quick" in out


def test_restore_puts_back_the_checkpoints_of_the_results_dir_it_is_given(tmp_path, monkeypatch,
                                                                          capsys):
    """`restore --results-dir` alone names the folder whose checkpoints go back into git's
    index; with neither it nor --preset, every results folder's."""
    from kdlib import cli

    put_back = []

    def unhide(repo_root, also=()):
        put_back.extend(also)
        return []

    monkeypatch.setattr(lease, "unhide_after_lease", unhide)
    monkeypatch.setattr(lease_commands, "REPO_ROOT", tmp_path)
    for name in ("gpu", "smoke"):
        (tmp_path / "results" / name / "checkpoints").mkdir(parents=True)
    (tmp_path / "results" / "bench").mkdir()
    assert cli.main(["lease", "restore", "--results-dir", str(tmp_path / "mine")]) == 0
    assert put_back == [(tmp_path / "mine").resolve() / "checkpoints"]
    assert capsys.readouterr().out == "mine/checkpoints: in git's index as committed\n"
    put_back.clear()
    assert cli.main(["lease", "restore"]) == 0
    assert put_back == [tmp_path / "results" / n / "checkpoints" for n in ("gpu", "smoke")]


def test_a_go_that_finds_no_data_is_told_a_fresh_machine_and_still_in_the_call_log(tmp_path):
    """A stash without the data is a fresh machine: `go` says so with StashIncomplete (whose
    exit status the follow-up checks before it packs), and a `go` that fails or is interrupted
    still shows in the next call's timeline (its time is what the follow-up's margins cover)."""
    stash = tmp_path / "stash"
    with pytest.raises(lease.StashIncomplete, match="fresh machine"):
        lease.go(preset="smoke", minutes=1, jobs=1, results_dir=tmp_path / "results",
                 repo_root=tmp_path, model="resnet8", bench="never", stash=stash,
                 log=lambda m: None)
    assert [line.split(":")[0] for line in lease.call_timeline(stash)] == ["go"]


def test_a_stash_that_lost_a_carried_checkpoint_is_a_fresh_machine_too(tmp_path, monkeypatch):
    """Carried weights and paused runs' checkpoints go in the first calls, alone: a machine
    taken back after such a call lacks them, and without `store`'s check the last call would
    train those runs from their start. The call that finds it keeps its own files and says
    which calls to make again, and what then."""
    import hashlib

    lease_dir = tmp_path / lease.LEASE_DIR
    data = _split(bytes(range(10)), lease_dir, part_bytes=8, stem="data.xz")
    (lease_dir / lease.DATA_MANIFEST).write_text(json.dumps(data))
    group = lease_dir / "weights" / "00"
    group.mkdir(parents=True)
    paused = b"a paused run's checkpoint"
    (group / ("p.pt" + lease.CARRIED_SUFFIX)).write_bytes(lzma.compress(paused))
    digest = {"p.pt": hashlib.sha256(paused).hexdigest()}
    (group / "sha256.json").write_text(json.dumps(digest))
    (lease_dir / lease.STASH_PLAN).write_text(json.dumps(
        [{"parts": {}, "weights": digest}] + [{"parts": {p["name"]: p["sha256"]}, "weights": {}}
                                              for p in data["parts"]]))
    parts = [lease_dir / p["name"] for p in data["parts"]]
    monkeypatch.chdir(tmp_path)
    stash = tmp_path / "stash"
    lease.store([group], stash, call=1)
    shutil.rmtree(stash)  # the machine went back after call 1
    with pytest.raises(lease.StashIncomplete, match=r"call\(s\) 1 stored \(p\.pt\).* Make "
                                                    r"call\(s\) 1 again, then go on with call 3"):
        lease.store(parts[:1], stash, call=2)
    assert (stash / parts[0].name).read_bytes() == parts[0].read_bytes()  # call 2's: stored
    lease.store([group], stash, call=1)
    lease.store(parts[1:], stash, call=3)  # call 1 made again: the stash is whole
    assert (stash / "weights" / "p.pt").read_bytes() == paused
    shutil.rmtree(stash)
    with pytest.raises(lease.StashIncomplete, match=r"call\(s\) 1, 2 stored .*then this call "
                                                    r"again\.$"):
        lease.store(parts[1:], stash, call=3)


def test_a_follow_up_go_puts_back_the_newest_returns_and_returns_only_what_it_adds(
        fake_data_root, tmp_path):
    """On the warm machine the tool copies the tree afresh: the follow-up's `go` puts back what
    the earlier calls returned, in their order and over the older checkpoint a call carried
    (else a paused run would resume epochs back), and its `pack` returns none of it again."""
    stash, bench = tmp_path / "stash", tmp_path / "bench"
    (stash / "weights").mkdir(parents=True)
    (stash / "weights" / "p.pt").write_bytes(b"carried: paused after epoch 1")
    earlier = tmp_path / "earlier" / "checkpoints"
    earlier.mkdir(parents=True)
    for epoch in (2, 3):  # the last call, then a first follow-up
        (earlier / "p.pt").write_bytes(f"returned: paused after epoch {epoch}".encode())
        (earlier / f"e{epoch}.weights.pt").write_bytes(b"w")
        lease.pack(earlier.parent, tmp_path / f"out{epoch}", bench, device="cpu", stash=stash)
    results = tmp_path / "device"
    logged = []
    lease.go(preset="smoke", minutes=0.001, jobs=1, results_dir=results, repo_root=tmp_path,
             model="resnet8", bench="never", stash=stash, data_root=fake_data_root,
             log=logged.append)  # no time to train
    assert "put back what 2 earlier call(s) on this machine returned" in logged
    assert (results / "checkpoints" / "p.pt").read_bytes() == b"returned: paused after epoch 3"
    assert (results / "checkpoints" / "e2.weights.pt").exists()
    lease.pack(results, tmp_path / "out", bench, device="cpu", stash=stash, preset="smoke")
    assert lease.read_manifest(tmp_path / "out")["returned"] == 2
    assert lease.read_manifest(tmp_path / "out")["preset"] == "smoke"
    assert lease.receive(tmp_path / "out", tmp_path / "back", bench)["files"] == 0


def test_go_measures_in_spare_time_only_once_every_planned_run_has_a_record(
        fake_data_root, tmp_path, monkeypatch):
    """The compiled part a later preset decides on takes minutes: `go` gives it only the
    seconds its deadline leaves (more would push `pack` past the call's end and lose the
    lease's results), only once the grid is done, and still reports the benchmark this
    lease wrote."""
    import itertools

    from kdlib.lease import device as lease_device
    from kdlib.presets import get_preset

    clock = itertools.count(1000.0, 1.0)  # each reading of go's clock a second later
    monkeypatch.setattr(lease_device, "time", SimpleNamespace(monotonic=lambda: next(clock),
                                                              time=lambda: 0.0))
    monkeypatch.setattr(experiments, "execute", lambda *a, **k: [])  # no training
    spare = []
    monkeypatch.setattr(lease_device, "_bench_device", lambda *a, **k: Path("written.json"))
    monkeypatch.setattr(lease_device, "_measure_in_spare_time",
                        lambda *a, **k: spare.append(k["seconds"]))  # it measured nothing
    results = tmp_path / "results"
    plan = experiments.plan_grid(preset="smoke", model="resnet8",
                                 seeds=list(get_preset("smoke").seeds))
    assert len(plan) > 1
    for done in (plan[:1], plan):
        for cfg in done:
            save_record(results, {"run_id": cfg.run_id(), "config": cfg.to_dict(),
                                  "metrics": {}, "history": [{}]})
        summary = lease.go(preset="smoke", minutes=5, jobs=1, results_dir=results,
                           repo_root=tmp_path, model="resnet8", bench="never",
                           stash=tmp_path / "stash", data_root=fake_data_root,
                           log=lambda m: None)
    (seconds,) = spare  # not while a planned run lacked its record
    assert 0 < seconds < 5 * 60
    assert summary["bench"] == "written.json"  # the benchmark written this lease
    assert summary["records"] == summary["planned"] == len(plan)


def test_the_compiled_part_gets_its_whole_allowance_and_a_failing_one_costs_no_records(
        tmp_path, monkeypatch):
    """With exactly SPARE_COMPILED_S left the compiled part a later preset decides on is
    measured; one that fails is logged and `go` goes on (the lease's records matter more).
    (`paper` as it was before its decision, not compiling.)"""
    from kdlib import presets
    from kdlib.lease import device as lease_device

    real = presets.build_config
    monkeypatch.setattr(presets, "build_config",
                        lambda *a, **k: real(*a, **k).replace(compile=False))
    completed, lines = [], []
    monkeypatch.setattr(lease_device, "complete_bench",
                        lambda bench, *a, preset, **k: completed.append(preset) or Path("b.json"))
    old = {"compiled": {"division": "an earlier one"}}
    spare = dict(preset="gpu", model="resnet20", data_root=tmp_path, log=lines.append,
                 seconds=lease.SPARE_COMPILED_S)
    assert lease_device._measure_in_spare_time(old, tmp_path, "cuda", **spare) == Path("b.json")
    assert completed == ["paper"]

    def fails(*args, **kwargs):
        raise RuntimeError("no Triton")

    monkeypatch.setattr(lease_device, "complete_bench", fails)
    assert lease_device._measure_in_spare_time(old, tmp_path, "cuda", **spare) is None
    assert lines[-1] == "compiled part failed (RuntimeError: no Triton)"


def test_pack_returns_this_devices_benchmarks_and_passes_over_files_it_cannot_read(tmp_path):
    """Of results/bench, only this device's benchmarks go back (the others came from here and
    count among the eight returned files); a file there that is no benchmark must not stop
    the lease's results from being packed."""
    from kdlib.device import cpu_model

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "here.json").write_text(json.dumps({"machine": {"cpu_model": cpu_model()}}))
    (bench / "NVIDIA_H200.json").write_text(json.dumps({"machine": {"gpu": "NVIDIA H200"}}))
    (bench / "notes.json").write_text("not a benchmark")
    (bench / "list.json").write_text("[]")
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "a.json").write_text('{"run_id": "a"}')
    lease.pack(results, tmp_path / "out", bench, device="cpu", stash=tmp_path / "stash")
    assert [e["name"] for e in lease.read_manifest(tmp_path / "out")["extra"]] == ["here.json"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_go_trains_the_grid_its_command_line_names(fake_data_root, tmp_path, monkeypatch, jobs):
    """The seeds and methods `prepare` put on go's command line replace the preset's (a lease
    that trained the preset's seeds would return records nobody asked for), an option left
    empty keeps the preset's; one run at a time trains in this process, with no worker to
    start, several in as many processes. What `go` says is done counts the planned runs'
    records only, not those of other seeds already here."""
    import kdlib.executors

    other = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[0])[0]
    save_record(tmp_path / "results", {"run_id": other.run_id(), "config": other.to_dict(),
                                       "metrics": {}, "history": [{}]})
    ran, logged = [], []
    monkeypatch.setattr(experiments, "execute",
                        lambda plan, **k: ran.append(("here", plan)) or [])
    monkeypatch.setattr(kdlib.executors, "execute_processes",
                        lambda plan, **k: ran.append((k["jobs"], plan)) or [])
    grid = {"seeds": [7], "methods": ["direct_kd"], "chain": []}
    summary = lease.go(preset="smoke", minutes=1, jobs=jobs, results_dir=tmp_path / "results",
                       repo_root=tmp_path, model="resnet8", bench="never",
                       stash=tmp_path / "stash", data_root=fake_data_root, grid=grid,
                       log=logged.append)
    wanted = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[7],
                                   methods=["direct_kd"])
    ((how, plan),) = ran
    assert how == ("here" if jobs == 1 else jobs)
    assert [cfg.run_id() for cfg in plan] == [cfg.run_id() for cfg in wanted]
    assert {cfg.seed for cfg in plan} == {7} and summary["planned"] == len(wanted)
    assert summary["records"] == 0  # nothing trained (stubbed), seed 0's record not planned
    assert any(m.startswith(f"lease: 0 of {len(wanted)} planned runs have records")
               for m in logged)
