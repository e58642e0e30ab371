"""A lent GPU in a few calls: data carried in parts, benchmark, budgeted grid, results back.

The lent machine (see the README, "On a GPU") has no network and our pins don't apply there:
its python3 has torch 2.11, pandas, tqdm, filelock and tensorboard, no papermill or Ray. A call
carries at most 64 MiB of working tree and returns at most 8 files of 16 MiB, and the machine
is given back 30 s after a call. So:

* here, :func:`prepare` packs CIFAR-100 into compressed parts of at most ``part_mib``, plus the
  fp32 weights that the grid's unfinished runs start from or learn from and the checkpoints of
  runs paused at an earlier lease's end (in the room the parts leave, else calls of their own:
  :func:`plan_carry`), under ``.lease/`` (git-ignored), and prints the calls to make;
* there, each call stores what it carries in ``/dev/shm`` (:func:`store`) and checks that the
  earlier calls' files are still there (:func:`check_stash`: a fresh machine lost them); the last one also
  runs :func:`go`: reassemble and check the data, benchmark the device if ``results/bench`` has
  no file for it, train the grid with ``python -m kdlib grid``'s budget until the minutes run
  out, and pack what it added (records, weights, packed models, logs, the checkpoints of paused
  runs) and the benchmark into ``$OUT`` (:func:`pack_outputs`: at most 8 files);
* here again, :func:`receive` unpacks those files into ``results/gpu`` and ``results/bench``.

Every file crossing between the machines is checked against a sha256 written beside it.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

LEASE_DIR = ".lease"  # in the repository root; ignored by git, named in each call's carry
# on the lent machine: survives between calls, not leases ($KDLIB_LEASE_STASH for rehearsals)
STASH = Path(os.environ.get("KDLIB_LEASE_STASH") or "/dev/shm/kdlib-lease")
DATA_MANIFEST = "data.json"
STASH_PLAN = "stash.json"  # what each call stores: checked by every later call's `store`
STASH_INCOMPLETE_EXIT = 3  # `lease store`'s exit status when earlier calls' files are missing
DATA_FILES = ("meta", "train", "test")  # of cifar-100-python/
CALL_MIB = 64  # what one call may carry: the travelling tree, the carried paths
CALL_MARGIN_MIB = 3  # the manifest, the calls file, files written between prepare and the call
MIN_PART_MIB = 4
OUT_FILE_MIB = 15  # returned files: at most 16 MiB each
OUT_MAX_FILES = 8
RESULTS_ARCHIVE = "results.tar"
# CIFAR's pixels are rows of 32 bytes, one plane after another: xz's delta filters at 1 and 32
# bytes store each byte as its difference from left + up - upper-left, which xz compresses to
# 66% of the raw bytes instead of 74% (measured on the test file); lzma reads
# the filters back from the archive, so nothing changes on the device
XZ_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_DELTA, "dist": 32},
              {"id": lzma.FILTER_LZMA2, "preset": 6}]
CALL_TIMEOUT_S = 600  # the device tool's limit for one command
COMMAND_MAX_CHARS = 2000  # and for its command line
GO_GRACE_S = 20  # `go` is interrupted this long after its --minutes (it plans to end before)
PACK_S = 25  # packing and the return, after `go` ended or was interrupted
# one more call on the machine while it is warm, for the device time the session has left
# (the reply's lease.budget_left_s, put in for AGAIN_LEFT): `go` for that less AGAIN_GO_MARGIN_S
# (the tree's transfer, go's grace, pack, the return, and slack), never under AGAIN_MIN_S
AGAIN_LEFT = "SECONDS_LEFT"
AGAIN_GO_MARGIN_S = 100
AGAIN_MIN_S = 200
RETURNED = "returned"  # in the stash: a copy of what each `pack` of this machine returned
MIB = 1 << 20
# the device benchmark: fit()'s steps, the bf16 mode, compile and the typical pipeline, in
# about two minutes on a GPU (plus its concurrent, compiled and profile parts, kdlib.bench.run)
DEVICE_BENCH = dict(variants=["fp32", "w4a4", "w1a1", "kd_w4", "kd_w4_nchw", "kd_w4_bf16",
                              "kd_w4_compile", "kd_w4_typical", "data_kdlib"],
                    windows=5, steps=50, concurrency_seconds=10.0)
FALLBACK_BENCH = dict(variants=["fp32", "w4a4", "kd_w4"], windows=3, steps=20, concurrency=())


def device_bench_args(preset: str, model: str | None = None,
                      bench_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """run_benchmark's arguments for a lease of ``preset``: ``bench_args`` (default
    :data:`DEVICE_BENCH`), without the compiled variants, and so without the compiled part,
    for a preset whose runs are too short to compile (minutes of the lease it trains instead;
    a lease of a long-run preset measures that part, see :func:`missing_parts`)."""
    from kdlib.bench.compiled import compile_may_pay

    args = dict(DEVICE_BENCH if bench_args is None else bench_args)
    if "variants" in args and not compile_may_pay(preset, model):
        args["variants"] = [v for v in args["variants"] if "compile" not in v]
    return args


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def _split(blob: bytes, folder: Path, stem: str, part_bytes: int) -> list[dict[str, Any]]:
    parts = []
    for i, start in enumerate(range(0, len(blob), part_bytes)):
        path = folder / f"{stem}.{i:02d}"
        path.write_bytes(blob[start:start + part_bytes])
        parts.append({"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path)})
    return parts


def _join(folder: Path, manifest: dict[str, Any]) -> bytes:
    """The parts named in ``manifest``, each checked, concatenated and checked as a whole."""
    chunks = []
    for part in manifest["parts"]:
        path = folder / part["name"]
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: carry {LEASE_DIR}/{part['name']} in a "
                                    f"call and run `python3 -m kdlib lease store` on it first")
        if sha256_of(path) != part["sha256"]:
            raise ValueError(f"{path} does not match its sha256 in the manifest: carry it again")
        chunks.append(path.read_bytes())
    blob = b"".join(chunks)
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise ValueError("the reassembled archive does not match its sha256: parts from two "
                         "different `lease prepare` runs? Prepare again and carry all parts")
    return blob


# ----------------------------------------------------------------------------- here: prepare
def travelling_bytes(repo_root: Path) -> int:
    """What every call sends besides its carry: tracked files and untracked ones git does not
    ignore (the device tool's rule)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=repo_root, capture_output=True, check=True).stdout
    paths = {repo_root / name for name in listed.decode().split("\0") if name}
    return sum(p.stat().st_size for p in paths if p.is_file())


def _tracked(repo_root: Path, path: Path) -> bool:
    listed = subprocess.run(["git", "ls-files", "--", os.path.relpath(path, repo_root)],
                            cwd=repo_root, capture_output=True, text=True)
    return listed.returncode == 0 and bool(listed.stdout.strip())


def part_mib_for(repo_root: Path) -> float:
    """The largest data part that, with the travelling tree, stays under a call's
    :data:`CALL_MIB`: also the room a call has for carried weight files (:func:`plan_carry`)."""
    tree = travelling_bytes(repo_root)
    part = CALL_MIB - CALL_MARGIN_MIB - tree / MIB
    if part < MIN_PART_MIB:
        raise ValueError(f"the tracked tree ({tree / MIB:.1f} MiB) leaves {part:.1f} MiB of a "
                         f"call's {CALL_MIB} MiB for data: commit fewer large files")
    return float(int(part))


def pack_data(data_root: Path, folder: Path, part_mib: float,
              compress: Callable[[bytes], bytes] | None = None) -> dict[str, Any]:
    """``data_root/cifar-100-python/{meta,train,test}`` as an xz tar split into parts of at most
    ``part_mib`` MiB in ``folder``; returns (and writes) the manifest. Reused when the manifest
    already describes the same source files and part size (packing takes minutes)."""

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
        if old.get("sources") == sources and old.get("part_mib") == part_mib and all(
                (folder / p["name"]).exists() and (folder / p["name"]).stat().st_size == p["bytes"]
                for p in old["parts"]):
            return old
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in DATA_FILES:
            tar.add(source / name, arcname=f"cifar-100-python/{name}")
    compress = compress or (lambda raw: lzma.compress(raw, format=lzma.FORMAT_XZ,
                                                      filters=XZ_FILTERS))
    blob = compress(buffer.getvalue())
    for old_part in folder.glob("data.xz.*"):
        old_part.unlink()
    manifest = {"sources": sources, "sha256": hashlib.sha256(blob).hexdigest(),
                "bytes": len(blob), "part_mib": part_mib,
                "parts": _split(blob, folder, "data.xz", int(part_mib * MIB))}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def frontier_weights(plan: Sequence, results_dir: Path) -> list[Path]:
    """The fp32 weight files of finished runs that an unfinished planned run starts from or
    learns from (what the lent machine needs to continue the grid). A 32-bit run whose packed
    file holds it losslessly needs none: that file is committed, travels with the tree, and a
    run there loads it when the weight file is missing."""
    from kdlib.experiments import is_lossless  # lazy: pandas
    from kdlib.results import find_record, packed_path, weights_path

    needed: dict[str, Path] = {}
    for cfg in plan:
        if find_record(results_dir, cfg.run_id()) is not None:
            continue
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
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", os.path.relpath(Path(results_dir) / "checkpoints", repo_root)],
        cwd=repo_root, capture_output=True)
    if listed.returncode != 0:  # not a git checkout: nothing is committed
        return []
    committed = {(Path(repo_root) / name).resolve() for name in listed.stdout.decode().split("\0")
                 if name.endswith(".weights.pt")}
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


CARRIED_MANIFEST = "sha256.json"
CARRIED_SUFFIX = ".xz"
# a checkpoint holds the weights twice (now and at the best epoch: often the same values) and
# xz finds the repeat: 3.4 MB of ResNet-20 checkpoint carry as 2.06 MB (measured on twelve)
CARRIED_XZ_PRESET = 6


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
    lease = repo_root / LEASE_DIR
    # committed weight files and checkpoints travel with the tree: carry only the others
    frontier = [p for p in frontier_weights(plan, results_dir) + planned_paused(plan, results_dir)
                if not _tracked(repo_root, p)]
    part_mib = part_mib_for(repo_root) if part_mib is None else part_mib  # also a call's room
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
    from kdlib.checkpoints import epochs_done

    for path in planned_paused(plan, results_dir):
        log(f"resumes: {path.name[:-len('.pt')]} from epoch {epochs_done(path)}")
    rel_results = os.path.relpath(results_dir, repo_root)
    from kdlib.presets import get_preset

    model = model or get_preset(preset).model
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
    # nothing, so the limit leaves `pack` and the return time before the call's 600 s
    grace_s = GO_GRACE_S if grace_s is None else grace_s
    hard_s = int(60 * minutes + grace_s)
    if hard_s + PACK_S > CALL_TIMEOUT_S:
        raise ValueError(f"--minutes {minutes:g}: the last call's work would end past its "
                         f"{CALL_TIMEOUT_S} s timeout; at most "
                         f"{(CALL_TIMEOUT_S - PACK_S - grace_s) / 60:.2f}")
    pack = f"python3 -m kdlib lease pack --results-dir {rel_results} --out \"$OUT\""
    finish = (f"{{ timeout -s INT -k 15 {hard_s} {go} --minutes {minutes:g}; rc=$?; "
              f"{pack} && exit $rc; }}")
    # the follow-up: the same grid on the same machine (its stash keeps the data and what the
    # last call returned, which `go` puts back first), no benchmark, for the time left
    hard_again = f"$((S - {AGAIN_GO_MARGIN_S - int(grace_s)}))"
    most = CALL_TIMEOUT_S - PACK_S - 10 + AGAIN_GO_MARGIN_S - int(grace_s)  # inside its timeout
    again = (f"S={AGAIN_LEFT}; S=${{S%.*}}; if [ $S -lt {AGAIN_MIN_S} ]; then echo \"$S s left: "
             f"too little for another call\"; exit 0; fi; if [ $S -gt {most} ]; then S={most}; "
             f"fi; {{ timeout -s INT -k 15 {hard_again} {go} "
             f"--seconds $((S - {AGAIN_GO_MARGIN_S})) --bench never; rc=$?; {pack} && exit $rc; }}")
    parts = [None] * len(extra_groups) + list(manifest["parts"])
    (lease / STASH_PLAN).write_text(json.dumps(
        [{"parts": {part["name"]: part["sha256"]} if part else {},
          "weights": json.loads((group / CARRIED_MANIFEST).read_text()) if group else {}}
         for part, group in zip(parts, group_dirs)], indent=1))
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
    follow_up = {"carry": [], "command": again, "timeout_s": CALL_TIMEOUT_S}
    for call in [*calls, follow_up]:
        if len(call["command"]) > COMMAND_MAX_CHARS:
            raise ValueError(f"a device call's command is {len(call['command'])} characters, "
                             f"more than the tool's {COMMAND_MAX_CHARS}: shorten --bench-args "
                             f"or the grid arguments")
    (lease / "again.json").write_text(json.dumps(follow_up, indent=1))
    log(f"{LEASE_DIR}/: data in {len(manifest['parts'])} part(s) of <= {part_mib:g} MiB "
        f"({manifest['bytes'] / MIB:.1f} MiB), {len(frontier)} weight and checkpoint file(s) "
        f"to carry ({sum(p.stat().st_size for p in frontier) / MIB:.1f} MiB, "
        f"{sum(map(len, packed.values())) / MIB:.1f} MiB compressed"
        + (f", {len(extra_groups)} call(s) of their own" if extra_groups else "") + ")")
    (lease / "calls.json").write_text(json.dumps(calls, indent=1))
    return calls


# ----------------------------------------------------------------------------- there
def store_part(part: Path, stash: Path = STASH) -> Path:
    """Copy one carried part (and the manifest beside it) into the stash, checked."""
    part = Path(part)
    manifest = json.loads((part.parent / DATA_MANIFEST).read_text())
    entry = next((p for p in manifest["parts"] if p["name"] == part.name), None)
    if entry is None:
        raise ValueError(f"{part.name} is not in {part.parent / DATA_MANIFEST}")
    if sha256_of(part) != entry["sha256"]:
        raise ValueError(f"{part} does not match its sha256: the transfer broke; carry it again")
    stash.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part.parent / DATA_MANIFEST, stash / DATA_MANIFEST)
    shutil.copyfile(part, stash / part.name)
    have = sum((stash / p["name"]).exists() for p in manifest["parts"])
    print(f"stored {part.name} in {stash}: {have} of {len(manifest['parts'])} parts", flush=True)
    return stash / part.name


def store_carried(folder: Path, stash: Path = STASH) -> list[Path]:
    """Decompress one call's carried weight and checkpoint files into the stash, each checked
    against the sha256 of the file packed here."""
    folder = Path(folder)
    expected = json.loads((folder / CARRIED_MANIFEST).read_text())
    target = stash / "weights"
    target.mkdir(parents=True, exist_ok=True)
    stored = []
    for name, digest in expected.items():
        carried = folder / (name + CARRIED_SUFFIX)
        try:
            content = lzma.decompress(carried.read_bytes())
        except lzma.LZMAError as exc:
            raise ValueError(f"{carried} does not decompress ({exc}): the transfer broke; "
                             "carry it again") from exc
        if hashlib.sha256(content).hexdigest() != digest:
            raise ValueError(f"{carried} does not match its sha256: the transfer broke; "
                             "carry it again")
        (target / name).write_bytes(content)
        stored.append(target / name)
    print(f"stored {len(stored)} weight and checkpoint file(s) in {target}", flush=True)
    return stored


class StashIncomplete(RuntimeError):
    """The stash lacks what earlier calls stored: the machine is a fresh one."""


def store(paths: Sequence[Path], stash: Path = STASH, *, call: int | None = None,
          plan: Path | None = None) -> None:
    """`lease store`: each path a data part (:func:`store_part`) or a folder of carried files
    (:func:`store_carried`). With ``call`` (1-based, as `prepare` numbers them), then checks
    that the stash holds what the calls before it stored (:func:`check_stash`)."""
    for path in map(Path, paths):
        if path.is_dir():
            store_carried(path, stash)
        else:
            store_part(path, stash)
    if call is not None:
        check_stash(Path(plan or Path(LEASE_DIR) / STASH_PLAN), call, stash)


def check_stash(plan: Path, call: int, stash: Path = STASH) -> None:
    """Raise :class:`StashIncomplete` naming the calls to make again when the stash lacks a
    file that one of the calls before ``call`` stored, or holds another version of it.

    The stash lives in the lent machine's memory, and the machine goes back 30 s after a call:
    a call made later, or after the machine was taken back, finds a fresh one, and without
    this check the last call would train paused runs from their start and miss the data."""
    calls = json.loads(plan.read_text())
    missing: dict[int, list[str]] = {}
    for i, entry in enumerate(calls[:call - 1], 1):
        wanted = [(stash / name, name, digest) for name, digest in entry["parts"].items()]
        wanted += [(stash / "weights" / name, name, digest)
                   for name, digest in entry["weights"].items()]
        lost = [name for path, name, digest in wanted
                if not path.exists() or sha256_of(path) != digest]
        if lost:
            missing[i] = lost
    if not missing:
        have = sum(len(e["parts"]) + len(e["weights"]) for e in calls[:call])
        print(f"call {call} of {len(calls)}: the stash holds all {have} file(s) stored so far",
              flush=True)
        return
    again = ", ".join(map(str, missing))
    lost = sorted(name for names in missing.values() for name in names)
    then = ("then this call again" if call == len(calls)
            else f"then go on with call {call + 1} (this call's files are stored)")
    raise StashIncomplete(
        f"this machine lacks what call(s) {again} stored ({', '.join(lost[:4])}"
        f"{', ...' if len(lost) > 4 else ''}): it is a fresh machine (the last one went back "
        f"30 s after a call, or was taken back). Make call(s) {again} again, {then}.")


def assemble_data(stash: Path = STASH) -> Path:
    """The data root (holding cifar-100-python/) rebuilt from the stashed parts."""

    root = stash / "data"
    manifest = json.loads((stash / DATA_MANIFEST).read_text())
    done = root / "cifar-100-python" / ".sha256"
    if done.exists() and done.read_text() == manifest["sha256"]:
        return root
    blob = lzma.decompress(_join(stash, manifest))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(root, filter="data")
    for name, source in manifest["sources"].items():
        if sha256_of(root / "cifar-100-python" / name) != source["sha256"]:
            raise ValueError(f"cifar-100-python/{name} differs from the file packed here")
    done.write_text(manifest["sha256"])
    return root


RESULT_PATTERNS = ("runs/*.json", "checkpoints/*.weights.pt", "models/*.packed", "logs/*")
SNAPSHOT = "results-before.json"


def _result_files(results_dir: Path) -> list[Path]:
    """Records, best fp32 weights, packed models, logs and the checkpoints of runs without a
    record (paused or interrupted: the next lease resumes them)."""
    from kdlib.results import paused_checkpoints

    files = [path for pattern in RESULT_PATTERNS for path in sorted(results_dir.glob(pattern))]
    return files + list(paused_checkpoints(results_dir).values())


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def snapshot_results(results_dir: Path, stash: Path = STASH) -> dict[str, list[int]]:
    """Size and modification time of every result file there before the grid: they came from
    here (the tree, the carried files), so :func:`pack` leaves them out."""
    snapshot = {str(p.relative_to(results_dir)): _stamp(p) for p in _result_files(results_dir)}
    stash.mkdir(parents=True, exist_ok=True)
    (stash / SNAPSHOT).write_text(json.dumps(snapshot))
    return snapshot


def pack_outputs(results_dir: Path, out: Path, extra: Iterable[Path] = (),
                 file_mib: float = OUT_FILE_MIB, max_files: int = OUT_MAX_FILES,
                 unchanged: dict[str, list[int]] | None = None) -> list[Path]:
    """The result files of ``results_dir`` (:func:`_result_files`) but those ``unchanged`` since
    a :func:`snapshot_results`, as a tar split into files of <= ``file_mib`` MiB in ``out``,
    with ``extra`` files beside them and a manifest."""
    out.mkdir(parents=True, exist_ok=True)
    unchanged = unchanged or {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in _result_files(results_dir):
            arcname = str(path.relative_to(results_dir))
            if unchanged.get(arcname) != _stamp(path):
                tar.add(path, arcname=arcname)
    blob = buffer.getvalue()
    parts = _split(blob, out, RESULTS_ARCHIVE, int(file_mib * MIB))
    extras = []
    for path in extra:
        shutil.copyfile(path, out / path.name)
        extras.append({"name": path.name, "sha256": sha256_of(out / path.name)})
    manifest = {"sha256": hashlib.sha256(blob).hexdigest(), "parts": parts, "extra": extras}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    written = 1 + len(parts) + len(extras)
    if written > max_files:
        raise ValueError(f"{written} files to return, more than {max_files}: the results do not "
                         "fit one call's return; train fewer runs per lease")
    return sorted(out.iterdir())


def place_carried(results_dir: Path, stash: Path = STASH) -> list[Path]:
    """The carried weight files and paused runs' checkpoints (stored by the calls), where the
    grid reads them."""
    placed = []
    for path in sorted((stash / "weights").glob("*.pt")):
        target = results_dir / "checkpoints" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        placed.append(target)
    return placed


def restore_returned(results_dir: Path, bench_dir: Path, stash: Path = STASH) -> int:
    """Put back what earlier calls on this machine returned (kept by :func:`pack`), in order:
    the device tool copies the tree afresh at each call, so a follow-up call's results folder
    holds only what came from here. Returns how many returns were put back."""
    kept = sorted((stash / RETURNED).glob("[0-9]*"))
    for folder in kept:
        receive(folder, results_dir, bench_dir)
    return len(kept)


def go(*, preset: str, minutes: float, jobs: int | str, results_dir: Path,
       repo_root: Path, model: str | None = None, bench: str = "auto", device: str | None = None,
       stash: Path = STASH, reserve_s: float | None = None, grid: dict[str, Any] | None = None,
       data_root: Path | None = None, bench_args: dict[str, Any] | None = None,
       log: Callable[[str], None] = print) -> dict[str, Any]:
    """On the lent machine: data, benchmark, budgeted grid, outputs. ``minutes``: wall-clock for
    all of it (less than the call's timeout); ``reserve_s`` of it is kept as slack for runs
    that overrun their estimate (default a tenth, at most 45 s). Packing is :func:`pack`'s.
    ``jobs="auto"``: as many runs at once as the benchmark found worth it (1 without one)."""
    import torch

    from kdlib.bench.graphs import graphs_verdict
    from kdlib.bench.run import run_benchmark, bench_file_name
    from kdlib.budget import Budget, RunTimer, device_kind, load_bench
    from kdlib.data import load_cifar100
    from kdlib.device import pick_device
    from kdlib.executors import execute_processes
    from kdlib.experiments import execute, plan_grid
    from kdlib.fileio import write_json_atomic
    from kdlib.presets import get_preset
    from kdlib.results import load_records

    model = model or get_preset(preset).model
    started = time.monotonic()
    deadline = started + 60.0 * minutes
    reserve_s = min(45.0, 6.0 * minutes) if reserve_s is None else reserve_s
    data_root = data_root or assemble_data(stash)
    log(f"data ready in {time.monotonic() - started:.0f} s: {data_root}")
    place_carried(results_dir, stash)
    bench_dir = repo_root / "results" / "bench"
    restored = restore_returned(results_dir, bench_dir, stash)  # after the carried checkpoints:
    if restored:                                                # newer versions of some
        log(f"put back what {restored} earlier call(s) on this machine returned")
    snapshot_results(results_dir, stash)  # what is here already is not returned
    torch_device = pick_device(device)
    kind = device_kind(torch_device)
    bench_written = None
    existing = load_bench(bench_dir, kind)
    if bench == "always" or (bench == "auto" and existing is None):
        images, labels = load_cifar100(data_root, train=True, download=False)
        source = f"CIFAR-100 training set, {len(images)} images"
        try:
            result = run_benchmark(images, labels, device=torch_device, preset=preset, model=model,
                                   data_source=source,
                                   **device_bench_args(preset, model, bench_args))
        except Exception as exc:  # noqa: BLE001 - the grid needs estimates more than the rest
            log(f"benchmark failed ({type(exc).__name__}: {exc}); timing only fit()'s steps")
            result = run_benchmark(images, labels, device=torch_device, preset=preset, model=model,
                                   data_source=source, **FALLBACK_BENCH)
        bench_written = bench_dir / bench_file_name(result)
        write_json_atomic(bench_written, result)
        log(f"benchmark written: {bench_written} ({time.monotonic() - started:.0f} s in)")
    elif bench == "auto" and missing_parts(existing, torch_device, preset):
        bench_written = complete_bench(existing, bench_dir, data_root, torch_device, preset=preset,
                                       model=model, log=log)
        log(f"benchmark completed: {bench_written} ({time.monotonic() - started:.0f} s in)")
    timer = RunTimer(kind, bench=load_bench(bench_dir, kind))
    timer.graphs = replays_steps(timer.bench, preset, model)
    verdict = graphs_verdict(timer.bench) if timer.bench else None
    if verdict:
        log(f"grid: {'steps replayed as CUDA graphs' if timer.graphs else 'eager steps'} "
            f"({verdict['why']})")
    if jobs == "auto":
        jobs = auto_jobs(timer.bench, preset, model)
    timer.jobs = jobs
    for record in load_records(results_dir):
        timer.add(record)
    budget_s = deadline - reserve_s - time.monotonic()
    undecided = compile_undecided(timer.bench, preset, model, results_dir)
    if undecided:
        log(f"grid: not started: {undecided}")
        budget_s = 0.0
    grid = {k: v for k, v in (grid or {}).items() if v}
    plan = plan_grid(preset=preset, model=model, **{"seeds": list(get_preset(preset).seeds), **grid},
                     overrides={"cuda_graphs": True} if timer.graphs else None)
    log(f"grid: {len(plan)} planned runs, {budget_s:.0f} s of budget, {jobs} at a time")
    if budget_s > 0:
        # at most as many runs continue next lease as run at once: their checkpoints come back
        # and travel again (paper: each run spans leases; gpu: 12 paused at once filled 41 MB)
        budget = Budget(budget_s, timer, max_spans=jobs)
        if jobs > 1:
            execute_processes(plan, jobs=jobs, data_dir=data_root, results_dir=results_dir,
                              device=str(torch_device), budget=budget, log=log)
        else:
            execute(plan, data_dir=data_root, results_dir=results_dir, device=str(torch_device),
                    progress=False, budget=budget)
    done = sum(1 for _ in (results_dir / "runs").glob("*.json")) if (results_dir / "runs").exists() else 0
    summary = {"records": done, "planned": len(plan), "seconds": time.monotonic() - started,
               "bench": str(bench_written) if bench_written else None}
    log(f"lease: {done} of {len(plan)} planned runs have records; {summary['seconds']:.0f} s; "
        "now `python3 -m kdlib lease pack`")
    return summary


def compile_undecided(bench: dict[str, Any] | None, preset: str, model: str | None,
                      results_dir: Path) -> str | None:
    """Why a lease must not train ``preset`` yet, or None. ``compile`` is in the run id, so a
    grid of long runs (:func:`kdlib.bench.compiled.compile_may_pay`) whose benchmark says
    compiling pays, while the preset does not compile, would train runs that the switch then
    orphans: that is decided first, by hand, before its first run (later, its records stand)."""
    from kdlib.bench.compiled import compile_may_pay, compile_verdict
    from kdlib.budget import LEASE_TRAINING_MINUTES
    from kdlib.presets import build_config

    if bench is None or not compile_may_pay(preset, model) or build_config(preset, model).compile:
        return None
    if any((results_dir / "runs").glob("*.json")):
        return None
    verdict = compile_verdict(bench, 60.0 * LEASE_TRAINING_MINUTES)
    if not verdict or not verdict["pays"]:
        return None
    return (f"torch.compile pays for `{preset}` ({verdict['why']}) but the preset does not "
            f"compile: set compile=True in its preset (kdlib/presets.py) before its first run, "
            "then lease again")


def replays_steps(bench: dict[str, Any] | None, preset: str, model: str | None = None) -> bool:
    """Whether a lease trains the preset's runs with ``cuda_graphs``: the benchmark's graphs
    part found the replayed step bit for bit eager's and faster side by side
    (:func:`kdlib.bench.graphs.graphs_verdict`), and the preset does not compile."""
    from kdlib.bench.graphs import graphs_verdict
    from kdlib.presets import build_config

    if bench is None or build_config(preset, model).compile:
        return False
    verdict = graphs_verdict(bench)
    return bool(verdict and verdict["use"])


def auto_jobs(bench: dict[str, Any] | None, preset: str, model: str | None = None) -> int:
    """`--jobs auto`: as many runs at once as the benchmark found worth it for the preset's
    step: compiled processes for a preset that compiles, replaying ones where a lease replays
    steps (:func:`replays_steps`), eager ones otherwise (1 without a benchmark)."""
    from kdlib.bench.concurrent import worth_running
    from kdlib.presets import build_config

    if build_config(preset, model).compile:
        part = (bench or {}).get("compiled")
    elif replays_steps(bench, preset, model):
        part = bench["graphs"]
    else:
        part = bench
    return worth_running((part or {}).get("concurrency"))


def missing_parts(result: dict[str, Any], device, preset: str | None = None) -> dict[str, Any]:
    """What a benchmark measured before its parts existed lacks: ``{"profile": True}`` (again
    when profiled before the weights were quantized together), ``{"grouped": True}``
    (:mod:`kdlib.bench.grouped`) and, on a GPU, ``{"graphs": True}`` (the step replayed as a
    CUDA graph, :mod:`kdlib.bench.graphs`), ``{"concurrency": [counts]}`` of
    :func:`kdlib.bench.run.device_concurrency` it has not measured (none once measuring them
    failed) and ``{"compiled": True}`` (the compiled quantizers' levels and compiled processes
    side by side, :mod:`kdlib.bench.compiled`; again when measured with another
    ``COMPILED_DIVISION`` than today's; only for a ``preset`` whose runs are long enough to
    compile, :func:`kdlib.bench.compiled.compile_may_pay`, so that a `gpu` lease trains instead).
    ``preset=None``: every part."""
    import torch

    from kdlib.bench.compiled import compile_may_pay
    from kdlib.bench.run import device_concurrency
    from kdlib.quant.ste import COMPILED_DIVISION

    missing: dict[str, Any] = {}
    profile = result.get("profile")
    if profile is None or not (profile.get("grouped_weights") or "error" in profile):
        missing["profile"] = True  # none, or one of the weights quantized per layer
    if "grouped" not in result:
        missing["grouped"] = True
    if torch.device(device).type == "cuda" and "graphs" not in result:
        missing["graphs"] = True
    # measured before compiled graphs divided the levels as they do now: measured again
    compiled = result.get("compiled") or {}
    if (torch.device(device).type == "cuda" and compiled.get("division") != COMPILED_DIVISION
            and (preset is None or compile_may_pay(preset))):
        missing["compiled"] = True
    concurrency = result.get("concurrency") or {}
    tried = "error" in concurrency or "added_error" in concurrency  # an answer too: not again
    if torch.device(device).type == "cuda" and not tried:
        cores = (result.get("machine") or {}).get("usable_cores")
        counts = [k for k in device_concurrency(cores)
                  if str(k) not in concurrency.get("by_jobs", {})]
        if counts:
            missing["concurrency"] = counts
    return missing


def complete_bench(result: dict[str, Any], bench_dir: Path, data_root: Path, device, *,
                   preset: str, model: str, steps: int | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """A benchmark measured before it had a part gets it, in place: the grouped-weights part
    (about 20 s on a GPU), the profile (about 15 s), the replayed step (about 2 minutes), the
    larger counts of processes side by side (about 30 s each), the compiled part (a few
    minutes)."""
    from kdlib.bench.run import (PROFILE_STEPS, add_concurrency, bench_file_name, compiled_part,
                                 graphs_part, grouped_part, profile_or_error)
    from kdlib.bench.variants import make_context
    from kdlib.data import load_cifar100
    from kdlib.fileio import write_json_atomic

    missing = missing_parts(result, device, preset)
    images, labels = load_cifar100(data_root, train=True, download=False)
    preset = result.get("settings", {}).get("preset", preset)
    ctx = make_context(images, labels, preset=preset, model=model, device=device, workers=0)
    # the short parts first, the compiled part (minutes) last, at the process count just
    # chosen; the file is written after each, so a lease cut short keeps what it measured
    parts = {
        "grouped": lambda r: grouped_part(ctx, r.get("settings", {}), log),
        "profile": lambda r: profile_or_error(ctx, steps or PROFILE_STEPS, log),
        "graphs": lambda r: graphs_part(r, ctx, preset=preset, model=model, log=log),
        "concurrency": lambda r: add_concurrency(r, missing["concurrency"], ctx, preset=preset,
                                                 model=model, log=log),
        "compiled": lambda r: compiled_part(r, ctx, preset=preset, model=model, log=log),
    }
    path = bench_dir / bench_file_name(result)
    for name, measure in parts.items():
        if name in missing:
            result = {**result, name: measure(result)}
            write_json_atomic(path, result)
    return path


def pack(results_dir: Path, out: Path, bench_dir: Path, device: str | None = None,
         stash: Path = STASH) -> list[Path]:
    """There, after :func:`go` (finished, failed or interrupted): what this lease added or
    changed (everything, if `go` failed before its snapshot), and the benchmarks of this device
    (this lease's among them), into ``out``."""
    from kdlib.budget import bench_device_kind, device_kind
    from kdlib.device import pick_device

    kind = device_kind(pick_device(device))
    benches = []
    for path in sorted(bench_dir.glob("*.json")):
        try:
            if bench_device_kind(json.loads(path.read_text())) == kind:
                benches.append(path)
        except (OSError, ValueError, AttributeError):
            continue
    snapshot = stash / SNAPSHOT
    unchanged = json.loads(snapshot.read_text()) if snapshot.exists() else None
    files = pack_outputs(results_dir, out, benches, unchanged=unchanged)
    kept = stash / RETURNED / f"{len(list((stash / RETURNED).glob('[0-9]*'))):02d}"
    kept.mkdir(parents=True)
    for path in files:  # for a follow-up call on this machine (restore_returned)
        shutil.copyfile(path, kept / path.name)
    print(f"packed {len(files)} file(s) into {out}: "
          f"{len(list(results_dir.glob('runs/*.json')))} record(s), "
          f"{len(benches)} benchmark(s) of {kind}", flush=True)
    return files


# ----------------------------------------------------------------------------- here: receive
def receive(folder: Path, results_dir: Path, bench_dir: Path) -> dict[str, int]:
    """Unpack a lease's returned files (``manifest.json`` and its parts) into ``results_dir``
    and ``bench_dir``; files already here are replaced by the returned ones. The checkpoint of
    a run paused at an earlier lease's end is deleted once that run has a record (counted in
    ``"finished_paused"``)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    blob = _join(folder, manifest)
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
    finished = [path for run_id, path in run_checkpoints(results_dir).items() if run_id not in paused]
    for path in finished:
        path.unlink()
    note_paused(results_dir)  # for the README of a clone without the checkpoints
    runs = sum(m.name.startswith("runs/") for m in members)
    return {"records": runs, "files": len(members), "bench": len(manifest["extra"]),
            "finished_paused": len(finished)}
