"""Here, before a lease: the data packed into parts, the weight files and checkpoints that the
grid's unfinished runs need, and the calls to make (:func:`prepare`)."""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import shutil
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdlib.lease.transfer import (AGAIN_FILE, AGAIN_GO_MARGIN_S, AGAIN_LEFT, AGAIN_MIN_S,
                                  CALL_MARGIN_MIB, CALL_MIB, CALL_TIMEOUT_S, CALLS_FILE,
                                  CARRIED_MANIFEST, CARRIED_SUFFIX, CARRIED_XZ_PRESET,
                                  COMMAND_MAX_CHARS, DATA_FILES, DATA_MANIFEST, GO_GRACE_S,
                                  KILL_AFTER_S, LEASE_DIR, MIB, MIN_PART_MIB, PACK_S,
                                  STASH_INCOMPLETE_EXIT, STASH_PLAN, XZ_FILTERS, sha256_of,
                                  split_into_parts)
from kdlib.lease.pixels import PIXEL_CODING, locate_pixels, recode_file
from kdlib.lease.tracked import (committed_files, hide_for_lease, largest_folders, staged_among,
                                 tracked_among, travelling_bytes, travelling_files,
                                 unhide_after_lease, untrack_for_lease, untravelled_results,
                                 within)


def part_mib_for(repo_root: Path, leaving: Sequence[Path] = ()) -> float:
    """The largest data part that, with the travelling tree, stays under a call's
    :data:`CALL_MIB`: also the room a call has for carried weight files (:func:`plan_carry`).
    ``leaving``: tracked files the lease takes out of the index (:func:`untrack_for_lease`)
    and folders it hides (:func:`hide_for_lease`)."""
    return part_mib_beside(travelling_bytes(repo_root, leaving))


def part_mib_beside(tree_bytes: int) -> float:
    """The largest whole-MiB data part a call holds beside a travelling tree of ``tree_bytes``."""
    part = _room_beside(tree_bytes)
    if part < MIN_PART_MIB:
        raise ValueError(f"the tree every call sends ({tree_bytes / MIB:.1f} MiB) leaves "
                         f"{part:.1f} MiB of a call's {CALL_MIB} MiB for data: commit fewer "
                         "large files")
    return float(int(part))


def _room_beside(tree_bytes: int) -> float:
    """The MiB a call has for data beside a travelling tree of ``tree_bytes``."""
    return CALL_MIB - CALL_MARGIN_MIB - tree_bytes / MIB


def _bytes_of(path: Path) -> int:
    """A carried file's size, or all a carried folder holds."""
    return (sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir()
            else path.stat().st_size)


def room_before_another_call(data_bytes: int, tree_bytes: int) -> float:
    """How many MiB the travelling tree may grow before the data (``data_bytes``, in parts
    sized by :func:`part_mib_for`) takes one more call than it does now (negative: the tree
    leaves too little room for any part)."""
    room = _room_beside(tree_bytes)
    if room < MIN_PART_MIB:
        return room - MIN_PART_MIB
    calls = math.ceil(data_bytes / (int(room) * MIB))
    needed = math.ceil(data_bytes / calls / MIB)  # the smallest whole-MiB part for that many
    return room - needed


def fallback_parts(data_bytes: int, whole_tree_bytes: int) -> str:
    """What to do should the device tool refuse a call as over its 64 MiB because it sends the
    folders a lease hides (``whole_tree_bytes``: the tree with them): the part size that fits
    beside that tree, and how many data calls it makes."""
    room = int(_room_beside(whole_tree_bytes))
    head = (f"should the tool refuse call 1 as over {CALL_MIB} MiB (sending the hidden folders "
            f"too: {whole_tree_bytes / MIB:.1f} MiB of tree), ")
    if room < MIN_PART_MIB:
        return head + "no data part fits beside that tree: commit fewer large files"
    return (head + f"prepare again with --part-mib {room}: "
            f"{math.ceil(data_bytes / (room * MIB))} data calls")


def pack_data(data_root: Path, folder: Path, part_mib: float,
              compress: Callable[[bytes], bytes] | None = None) -> dict[str, Any]:
    """``data_root/cifar-100-python/{meta,train,test}`` as an xz tar split into parts of at most
    ``part_mib`` MiB in ``folder``; returns (and writes) the manifest. The pixels of train and
    test go as prediction residuals (:mod:`kdlib.lease.pixels`; the manifest's ``pixels`` says
    where, for the device to decode). Reused when the manifest already describes the same
    source files, part size and coding (packing takes minutes)."""

    source = Path(data_root) / "cifar-100-python"
    missing = [n for n in DATA_FILES if not (source / n).exists()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {missing}: point --data-dir (or $KDLIB_DATA) at "
                                "the folder holding cifar-100-python/")
    sources = {n: {"bytes": (source / n).stat().st_size, "sha256": sha256_of(source / n)}
               for n in DATA_FILES}
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / DATA_MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("sources") == sources and old.get("part_mib") == part_mib \
                and old.get("coding") == PIXEL_CODING and all(
                (folder / p["name"]).exists() and (folder / p["name"]).stat().st_size == p["bytes"]
                for p in old["parts"]):
            return old
    buffer, pixels = io.BytesIO(), {}
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in DATA_FILES:
            raw, span = (source / name).read_bytes(), locate_pixels(source / name)
            if span:  # the pixels as residuals (kdlib.lease.pixels), decoded on the device
                raw, pixels[name] = recode_file(raw, span, encode=True), span
            member = tarfile.TarInfo(f"cifar-100-python/{name}")
            member.size = len(raw)
            tar.addfile(member, io.BytesIO(raw))
    compress = compress or (lambda raw: lzma.compress(raw, format=lzma.FORMAT_XZ,
                                                      filters=XZ_FILTERS))
    blob = compress(buffer.getvalue())
    for old_part in folder.glob("data.xz.*"):
        old_part.unlink()
    manifest = {"sources": sources, "coding": PIXEL_CODING, "pixels": pixels,
                "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                "part_mib": part_mib,
                "parts": split_into_parts(blob, folder, "data.xz", int(part_mib * MIB))}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def frontier_weights(plan: Sequence, results_dir: Path) -> list[Path]:
    """The fp32 weight files of finished runs that an unfinished planned run starts from or
    learns from (what the lent machine needs to continue the grid). A 32-bit run whose packed
    file holds it losslessly needs none: that file is committed, travels with the tree, and a
    run there loads it when the weight file is missing."""
    from kdlib.experiments import is_lossless  # lazy: pandas
    from kdlib.results import find_record, packed_path, untrained, weights_path

    needed: dict[str, Path] = {}
    for cfg in untrained(plan, results_dir):
        for dep in (cfg.teacher_id, cfg.init_id):
            record = find_record(results_dir, dep) if dep else None
            if record is None:
                continue
            trained = record.get("same_run_as") or dep
            path = weights_path(results_dir, trained)
            if is_lossless(packed_path(results_dir, trained)):
                continue
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing, but unfinished runs need the weights "
                                        f"of {trained}: restore it (a session after the lease "
                                        "that trained it needs it committed: `git add -f`), or "
                                        "delete its record to train it again")
            needed[trained] = path
    return list(needed.values())


def unneeded_committed_weights(plan: Sequence, results_dir: Path, repo_root: Path) -> list[Path]:
    """Committed fp32 weight files of ``results_dir`` that no unfinished run of ``plan`` starts
    from or learns from any more. They were committed so that a later session could continue
    the grid (:func:`frontier_weights`); now they only make every call of every lease carry
    them, and git's history keeps them."""
    committed = {p for p in committed_files(repo_root, Path(results_dir) / "checkpoints")
                 if p.name.endswith(".weights.pt")}
    needed = {p.resolve() for p in frontier_weights(plan, results_dir)}
    return sorted(p for p in committed - needed if p.exists())


def plan_carry(part_bytes: Sequence[int], files: Sequence[Path], room_bytes: int,
               sizes: dict[Path, int] | None = None) -> tuple[list[list[Path]], list[list[Path]]]:
    """Which call carries which weight or checkpoint file: ``(by_part, extra)``, the files that
    ride with each data part's call (in the room the part leaves of ``room_bytes``) and groups
    of the rest, each a call of its own. Largest first, each into the first call with room.
    ``sizes``: what each file takes in a call (default its size on disk)."""
    def size_of(path: Path) -> int:
        return sizes[path] if sizes is not None else path.stat().st_size

    by_part: list[list[Path]] = [[] for _ in part_bytes]
    free = [room_bytes - b for b in part_bytes]
    extra: list[list[Path]] = []
    extra_free: list[int] = []
    for path in sorted(files, key=size_of, reverse=True):
        size = size_of(path)
        if size > room_bytes:
            raise ValueError(f"{path} ({size / MIB:.1f} MiB) is larger than what a call can "
                             f"carry besides the tree ({room_bytes / MIB:.1f} MiB)")
        i = next((i for i in range(len(free) - 1, -1, -1) if free[i] >= size), None)
        if i is not None:  # from the last call back: the data's first calls stay lean
            by_part[i].append(path)
            free[i] -= size
            continue
        j = next((j for j, f in enumerate(extra_free) if f >= size), None)
        if j is None:
            extra.append([])
            extra_free.append(room_bytes)
            j = len(extra) - 1
        extra[j].append(path)
        extra_free[j] -= size
    return by_part, extra


def compress_carried(paths: Sequence[Path]) -> dict[Path, bytes]:
    """Each carried file xz-compressed, as a call carries it."""
    return {path: lzma.compress(path.read_bytes(), format=lzma.FORMAT_XZ,
                                preset=CARRIED_XZ_PRESET) for path in paths}


def _write_group(folder: Path, paths: Sequence[Path], packed: dict[Path, bytes]) -> Path:
    """One call's carried files, compressed into ``folder``, with the sha256 of each file as
    it must come out on the device."""
    folder.mkdir(parents=True)
    for path in paths:
        (folder / (path.name + CARRIED_SUFFIX)).write_bytes(packed[path])
    (folder / CARRIED_MANIFEST).write_text(json.dumps(
        {path.name: sha256_of(path) for path in paths}, indent=1))
    return folder


def planned_paused(plan: Sequence, results_dir: Path) -> list[Path]:
    """The checkpoints of ``plan``'s runs paused at the end of a lease (or interrupted), which
    the next lease resumes instead of starting over."""
    from kdlib.results import paused_checkpoints

    planned = {cfg.run_id() for cfg in plan}
    return [path for run_id, path in paused_checkpoints(results_dir).items() if run_id in planned]


def lost_paused(plan: Sequence, results_dir: Path) -> dict[str, int]:
    """{run id: epochs done} of ``plan``'s runs that a lease paused (``paused.json``) but whose
    checkpoint this checkout lacks (a fresh clone): the next lease trains them from the start."""
    from kdlib.results import noted_paused, paused_checkpoints

    planned = {cfg.run_id() for cfg in plan}
    here = paused_checkpoints(results_dir)
    return {run_id: done for run_id, done in noted_paused(results_dir).items()
            if run_id in planned and run_id not in here}


NEXT_PRESET = {"gpu": "paper"}  # what the leases fill once a preset's grid is done


def check_something_to_train(plan: Sequence, results_dir: Path, preset: str) -> None:
    """ValueError, before anything is packed, when every planned run already has a record: a
    lease would spend its minutes carrying data in to train nothing."""
    from kdlib.results import untrained

    if plan and not untrained(plan, results_dir):
        nxt = NEXT_PRESET.get(preset)
        raise ValueError(f"nothing for a lease to train: all {len(plan)} planned runs of preset "
                         f"{preset!r} have records in {results_dir}"
                         + (f"; the next grid to fill is {nxt!r}: python -m kdlib lease prepare "
                            f"--preset {nxt}" if nxt else "; add seeds (--seeds) or methods"))


def prepare(plan: Sequence, *, data_root: Path, results_dir: Path, repo_root: Path,
            minutes: float, jobs: int | str, preset: str, model: str | None = None,
            grid: dict[str, Sequence] | None = None, part_mib: float | None = None,
            bench_args: dict[str, Any] | None = None, grace_s: float | None = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Write ``.lease/`` and return the device calls (carry list and command) to make in order.
    ``plan`` is the grid to continue; ``grid`` the arguments it was planned with (seeds, chain,
    chain_methods, methods: None for the preset's), passed on to ``go``. ``bench_args``:
    run_benchmark's arguments on the device (default :data:`DEVICE_BENCH`). ``part_mib``:
    default the largest that keeps each call under :data:`CALL_MIB` (:func:`part_mib_for`).
    ``grace_s``: how long after ``minutes`` `go` is interrupted (default :data:`GO_GRACE_S`)."""
    from kdlib.checkpoints import epochs_done
    from kdlib.presets import get_preset

    check_something_to_train(plan, results_dir, preset)
    rel_results = os.path.relpath(results_dir, repo_root)
    finish, again = device_commands(preset=preset, model=model or get_preset(preset).model,
                                    jobs=jobs, rel_results=rel_results, grid=grid,
                                    bench_args=bench_args, minutes=minutes, grace_s=grace_s)
    lease = repo_root / LEASE_DIR
    unhide_after_lease(repo_root)  # an earlier prepare's, so that its folders are seen again
    paused = planned_paused(plan, results_dir)
    frontier = frontier_weights(plan, results_dir) + paused
    # committed ones (for a later session: see stage_for_later) would ride in every call with
    # the tree: taken out of the index for the lease (last, once all is written), they travel
    # once, in a carry; the other presets' results, which the device never reads, not at all
    leaving = tracked_among(repo_root, frontier)
    hidden = untravelled_results(repo_root, results_dir)
    # what a lease takes out of git's index comes back as committed (receive, restore)
    staged = staged_among(repo_root, [*hidden, Path(results_dir) / "checkpoints"])
    if staged:
        raise ValueError(f"git has changes staged in what a lease takes out of its index and "
                         f"puts back as committed ({', '.join(staged[:3])}"
                         f"{' ...' if len(staged) > 3 else ''}): commit them first (or unstage "
                         "them: git reset -q -- PATHS)")
    sent = travelling_files(repo_root, leaving)  # before hiding: what each hidden folder weighs
    hidden_rel = {folder: os.path.relpath(folder, repo_root) for folder in hidden}
    tree = {name: size for name, size in sent.items() if not within(name, hidden_rel.values())}
    hidden_mib = {folder: sum(size for name, size in sent.items() if within(name, [rel])) / MIB
                  for folder, rel in hidden_rel.items()}
    forced_part = part_mib
    part_mib = part_mib_beside(sum(tree.values())) if part_mib is None else part_mib
    if tree:
        log(f"every call also sends the tree, {sum(tree.values()) / MIB:.1f} MiB ("
            + ", ".join(f"{name} {size / MIB:.1f}" for name, size in largest_folders(tree))
            + f"): what it leaves of a call's {CALL_MIB} MiB sizes the data's parts")
    manifest = pack_data(data_root, lease, part_mib)
    packed = compress_carried(frontier)
    by_part, extra_groups = plan_carry([p["bytes"] for p in manifest["parts"]], frontier,
                                       int(part_mib * MIB),
                                       sizes={p: len(b) for p, b in packed.items()})
    weights = lease / "weights"
    shutil.rmtree(weights, ignore_errors=True)
    weights.mkdir(parents=True)
    groups = [*extra_groups, *by_part]  # the calls in order: weights alone first, then the data
    group_dirs = [_write_group(weights / f"{i:02d}", paths, packed) if paths else None
                  for i, paths in enumerate(groups)]
    for path in paused:
        log(f"resumes: {path.name[:-len('.pt')]} from epoch {epochs_done(path)}")
    for run_id, done in lost_paused(plan, results_dir).items():
        log(f"starts over: {run_id} (a lease paused it after epoch {done}, but its checkpoint "
            f"is not in this checkout: it was not committed)")
    parts = [None] * len(extra_groups) + list(manifest["parts"])
    (lease / STASH_PLAN).write_text(json.dumps(
        [{"parts": {part["name"]: part["sha256"]} if part else {},
          "weights": json.loads((group / CARRIED_MANIFEST).read_text()) if group else {}}
         for part, group in zip(parts, group_dirs)], indent=1))
    calls = _calls(parts, group_dirs, repo_root, finish)
    follow_up = {"carry": [], "command": again, "timeout_s": CALL_TIMEOUT_S}
    for call in [*calls, follow_up]:
        if len(call["command"]) > COMMAND_MAX_CHARS:
            raise ValueError(f"a device call's command is {len(call['command'])} characters, "
                             f"more than the tool's {COMMAND_MAX_CHARS}: shorten --bench-args "
                             f"or the grid arguments")
    (lease / AGAIN_FILE).write_text(json.dumps(follow_up, indent=1))
    log(f"{LEASE_DIR}/: data in {len(manifest['parts'])} part(s) of <= {part_mib:g} MiB "
        f"({manifest['bytes'] / MIB:.1f} MiB), {len(frontier)} weight and checkpoint file(s) "
        f"to carry ({sum(p.stat().st_size for p in frontier) / MIB:.1f} MiB, "
        f"{sum(map(len, packed.values())) / MIB:.1f} MiB compressed"
        + (f", {len(extra_groups)} call(s) of their own" if extra_groups else "") + ")")
    largest = max(sum(tree.values()) + sum(_bytes_of(repo_root / path) for path in call["carry"])
                  for call in calls)
    log(f"the largest call sends {largest / MIB:.1f} MiB of the tool's {CALL_MIB}")
    if tree and forced_part is None:  # what the next commits of results may add
        room = room_before_another_call(manifest["bytes"], sum(tree.values()))
        log(f"the tree the calls send may grow {room:.1f} MiB before the data takes one more call")
    if hidden:  # untried: that the tool leaves out what git's index and exclude file leave out
        log(fallback_parts(manifest["bytes"], sum(sent.values())))
    (lease / CALLS_FILE).write_text(json.dumps(calls, indent=1))
    undo = (f"undo, for a lease that never runs: python -m kdlib lease restore --preset {preset} "
            f"--results-dir {rel_results}")
    if leaving:
        untrack_for_lease(repo_root, leaving)
        log(f"out of git's index for this lease, to travel once rather than in every call: "
            f"{len(leaving)} committed weight or checkpoint file(s) "
            f"({sum(p.stat().st_size for p in leaving) / MIB:.1f} MiB); `lease receive` stages "
            f"those still needed again ({undo})")
    if hidden:
        hide_for_lease(repo_root, hidden)
        log(f"out of git's index and ignored for this lease, as the device reads only "
            f"{os.path.relpath(results_dir, repo_root)} and the benchmarks: "
            + ", ".join(f"{os.path.relpath(folder, repo_root)} ({mib:.1f} MiB)"
                        for folder, mib in hidden_mib.items())
            + f"; `lease receive` puts them back ({undo})")
    return calls


def device_commands(*, preset: str, model: str, jobs: int | str, rel_results: str,
                    grid: dict[str, Sequence] | None, bench_args: dict[str, Any] | None,
                    minutes: float, grace_s: float | None = None) -> tuple[str, str]:
    """The shell of the last call after its store (``go`` under a hard limit, then ``pack``)
    and of the follow-up call (the same grid on the same machine for the time left)."""
    from kdlib.results import CODE_COMMIT  # the device's copy of .git can be stale: state it

    go = (f"env PYTHONUNBUFFERED=1 KDLIB_GIT_COMMIT={CODE_COMMIT or ''} python3 -m kdlib lease go "
          f"--preset {preset} --model {model} --jobs {jobs} --results-dir {rel_results}")
    for name, values in (grid or {}).items():
        if values:
            go += f" --{name.replace('_', '-')} " + " ".join(map(str, values))
    if bench_args is not None:
        go += f" --bench-args '{json.dumps(bench_args, separators=(',', ':'))}'"
    # `go` under a hard limit (its own budget errs long, but a run can still overrun), then
    # `pack` whatever finished, whatever became of `go`: a call killed at its timeout returns
    # nothing, so the limit, the kill of a `go` that ignores it, `pack` and the return end
    # before the call's 600 s
    grace_s = GO_GRACE_S if grace_s is None else grace_s
    hard_s = int(60 * minutes + grace_s)
    if hard_s + KILL_AFTER_S + PACK_S > CALL_TIMEOUT_S:
        raise ValueError(f"--minutes {minutes:g}: the last call's work would end past its "
                         f"{CALL_TIMEOUT_S} s timeout; at most "
                         f"{(CALL_TIMEOUT_S - KILL_AFTER_S - PACK_S - grace_s) / 60:.2f}")
    pack = (f"python3 -m kdlib lease pack --preset {preset} --results-dir {rel_results} "
            f"--out \"$OUT\"")
    limit = f"timeout -s INT -k {KILL_AFTER_S}"
    finish = f"{{ {limit} {hard_s} {go} --minutes {minutes:g}; rc=$?; {pack} && exit $rc; }}"
    # the follow-up: the same grid on the same machine (its stash keeps the data and what the
    # last call returned, which `go` puts back first), no benchmark, for the time left
    hard_again = f"$((S - {AGAIN_GO_MARGIN_S - int(grace_s)}))"
    most = CALL_TIMEOUT_S - PACK_S - KILL_AFTER_S + AGAIN_GO_MARGIN_S - int(grace_s)
    again = (f"S={AGAIN_LEFT}; S=${{S%.*}}; case $S in ''|*[!0-9]*) echo \"put the reply's "
             f"lease.budget_left_s for {AGAIN_LEFT}\"; exit 2;; esac; "
             f"if [ $S -lt {AGAIN_MIN_S} ]; then echo \"$S s left: "
             f"too little for another call\"; exit 0; fi; if [ $S -gt {most} ]; then S={most}; "
             f"fi; {{ {limit} {hard_again} {go} "
             f"--seconds $((S - {AGAIN_GO_MARGIN_S})) --bench never; rc=$?; "
             f"[ $rc -eq {STASH_INCOMPLETE_EXIT} ] && exit $rc; {pack} && exit $rc; }}")
    return finish, again


def _calls(parts: Sequence[dict[str, Any] | None], group_dirs: Sequence[Path | None],
           repo_root: Path, finish: str) -> list[dict[str, Any]]:
    """One call a data part or weight group: carry it, store it; the last also ``finish``es."""
    calls = []
    for i, (part, group) in enumerate(zip(parts, group_dirs)):
        last = i == len(parts) - 1
        carry = ([f"{LEASE_DIR}/{DATA_MANIFEST}", f"{LEASE_DIR}/{part['name']}"] if part else [])
        carry += [os.path.relpath(group, repo_root)] if group else []
        store = (f"python3 -m kdlib lease store --call {i + 1} "
                 + " ".join(carry[1:] if part else carry))
        carry.append(f"{LEASE_DIR}/{STASH_PLAN}")
        calls.append({"carry": carry, "command": f"{store} && {finish}" if last else store,
                      "timeout_s": CALL_TIMEOUT_S if last else 120})
    return calls
