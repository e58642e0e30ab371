"""Here, after a lease: its returned files unpacked into the results (:func:`receive`)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

from kdlib.lease.tracked import stage_for_later
from kdlib.lease.transfer import RETURN_MANIFEST, join_parts, sha256_of


def read_manifest(folder: Path) -> dict:
    """The manifest a :func:`~kdlib.lease.device.pack` wrote into ``folder``."""
    path = folder / RETURN_MANIFEST
    if not path.exists():
        raise ValueError(f"{folder} holds no {RETURN_MANIFEST}: that call returned nothing (its "
                         "reply's output_tail says why; did `lease pack` run?)")
    return json.loads(path.read_text())


def returned_preset(folders: list[Path], preset: str | None) -> str:
    """The preset whose grid the returns hold, as their manifests name it; ``preset`` (the
    command line's), when given, must agree. Returns whose manifests name none (packed before
    they did) need ``preset``."""
    named = {read_manifest(f).get("preset") for f in folders} - {None}
    if len(named) > 1:
        raise ValueError(f"these returns hold the grids of several presets "
                         f"({', '.join(sorted(named))}): receive each in its own command")
    if named and preset is not None and named != {preset}:
        raise ValueError(f"these returns hold preset {next(iter(named))!r}'s grid, not "
                         f"{preset!r}'s: receive them with --preset {next(iter(named))}")
    if named:
        return next(iter(named))
    if preset is None:
        raise ValueError("these returns do not name their preset (packed before manifests "
                         "did): give --preset, the one `lease prepare` was given")
    return preset


def check_returns(folders: list[Path], partial: bool = False) -> None:
    """Refuse folders that cannot be one machine's returns in the calls' order: two holding the
    same return (the device tool put a later call's files where an earlier call's were, which
    are then lost here), returns out of order, or, unless ``partial``, a follow-up's return
    without the ones the machine made before it (it needs their runs: teachers, records)."""
    numbers = []
    seen: dict[tuple, Path] = {}
    for folder in folders:
        manifest = read_manifest(folder)
        key = (manifest["sha256"], manifest.get("returned"))
        if key in seen:
            raise ValueError(
                f"{seen[key]} and {folder} hold the same return: the device tool "
                "reused one folder, and the earlier call's files are gone from it. Copy each "
                "call's files_at (cp -r FILES_AT .lease/back-N) before making the next call; "
                "receive the copies")
        seen[key] = folder
        numbers.append(manifest.get("returned"))  # None: packed before returns were numbered
    known = [n for n in numbers if n is not None]
    if known != sorted(known) or len(set(known)) != len(known):
        order = ", ".join(f"{f} (return {n})" for f, n in zip(folders, numbers))
        raise ValueError(f"give the folders in the calls' order: {order} (returns of two "
                         "machines, each numbered from 0, go in two receive commands)")
    missing = sorted(set(range(known[-1] + 1)) - set(known)) if known else []
    if missing and not partial:
        raise ValueError(
            f"the machine's return(s) {missing} are missing (the last call's, before a "
            "follow-up's): its runs are the teachers and records these build on. Add their "
            "folder first, or pass --partial to receive these alone")


def receive(folder: Path, results_dir: Path, bench_dir: Path) -> dict[str, int]:
    """Unpack a lease's returned files (``manifest.json`` and its parts) into ``results_dir``
    and ``bench_dir``; files already here are replaced by the returned ones. The checkpoint of
    a run paused at an earlier lease's end is deleted once that run has a record (counted in
    ``"finished_paused"``)."""
    manifest = read_manifest(folder)
    blob = join_parts(folder, manifest)
    for extra in manifest["extra"]:  # every file checked before any is unpacked here
        path = folder / extra["name"]
        if sha256_of(path) != extra["sha256"]:
            raise ValueError(f"{path} does not match its sha256")
    results_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
        tar.extractall(results_dir, filter="data")
    for extra in manifest["extra"]:
        bench_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / extra["name"], bench_dir / extra["name"])
    from kdlib.results import note_paused, paused_checkpoints, run_checkpoints

    paused = paused_checkpoints(results_dir)
    finished = [path for run_id, path in run_checkpoints(results_dir).items()
                if run_id not in paused]
    for path in finished:
        path.unlink()
    note_paused(results_dir)  # for the README of a clone without the checkpoints
    runs = sum(m.name.startswith("runs/") for m in members)
    return {"records": runs, "files": len(members), "bench": len(manifest["extra"]),
            "finished_paused": len(finished)}


def stage_for_next_lease(plan, results_dir: Path, repo_root: Path) -> dict[str, list[Path]]:
    """Stage in git the files the unfinished runs of ``plan`` (the preset's grid) need from
    this checkout: the fp32 weights they start from or learn from and the checkpoints of runs
    paused at the lease's end; and the removal of the checkpoints of runs that finished. A later
    session is a fresh checkout (ignored files do not outlive a session), and a `paper` run
    spans several leases, so its checkpoint must be committed to ever finish."""
    from kdlib.lease.prepare import frontier_weights, planned_paused

    keep = frontier_weights(plan, results_dir) + planned_paused(plan, results_dir)
    return stage_for_later(repo_root, keep, Path(results_dir) / "checkpoints")
