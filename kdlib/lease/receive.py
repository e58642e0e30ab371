"""Here, after a lease: its returned files unpacked into the results (:func:`receive`)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

from kdlib.lease.transfer import join_parts, sha256_of


def receive(folder: Path, results_dir: Path, bench_dir: Path) -> dict[str, int]:
    """Unpack a lease's returned files (``manifest.json`` and its parts) into ``results_dir``
    and ``bench_dir``; files already here are replaced by the returned ones. The checkpoint of
    a run paused at an earlier lease's end is deleted once that run has a record (counted in
    ``"finished_paused"``)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    blob = join_parts(folder, manifest)
    results_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
        tar.extractall(results_dir, filter="data")
    for extra in manifest["extra"]:
        path = folder / extra["name"]
        if sha256_of(path) != extra["sha256"]:
            raise ValueError(f"{path} does not match its sha256")
        bench_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, bench_dir / extra["name"])
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
