"""There, on the lent machine: each call stores what it carries (:func:`store`), the last one
trains the grid (:func:`go`) and returns what it added (:func:`pack`)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import math
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kdlib.lease.decisions import (BENCH_ALLOWANCE_S, FALLBACK_BENCH, SPARE_COMPILED_S,
                                   auto_jobs, compile_undecided, complete_bench, device_bench_args,
                                   groups_weights, later_compile_parts, missing_parts,
                                   replays_steps)
from kdlib.lease.pixels import recode_file
from kdlib.lease.receive import receive
from kdlib.lease.transfer import (CALL_LOG, CARRIED_MANIFEST, CARRIED_SUFFIX, DATA_MANIFEST,
                                  LEASE_DIR, MIB, OUT_FILE_MIB, OUT_MAX_FILES, RESULTS_ARCHIVE,
                                  RETURN_MANIFEST, RETURNED, STASH, STASH_PLAN, join_parts,
                                  sha256_of, split_into_parts)


def _uptime_s() -> float | None:
    """Seconds since the machine booted (Linux), else None."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def note_step(stash: Path, step: str, started: float) -> None:
    """Append when ``step`` (``"store 3"``, ``"go"``, ``"pack"``) ran on this machine to the
    stash's call log, which each `go` puts in its lease log (:func:`call_timeline`): how long
    the machine took to start, the transfers between calls, the follow-up's margins."""
    stash.mkdir(parents=True, exist_ok=True)
    line = {"step": step, "started": started, "ended": time.time(), "uptime_s": _uptime_s()}
    with open(stash / CALL_LOG, "a") as f:
        f.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def timed_step(stash: Path, step: str) -> Iterator[None]:
    """:func:`note_step` for the block inside, however it ends (an interrupted `go` too)."""
    started = time.time()
    try:
        yield
    finally:
        note_step(stash, step, started)


def call_timeline(stash: Path) -> list[str]:
    """The steps of the call log, each with how long it ran and the gap since the step before
    it ended (a gap between calls holds the return, the next call's transfer and its start)."""
    path = stash / CALL_LOG
    if not path.exists():
        return []
    lines, previous = [], None
    for entry in map(json.loads, path.read_text().splitlines()):
        took = entry["ended"] - entry["started"]
        if previous is None:
            up = entry.get("uptime_s")
            since = (f"the machine up {up - took:.0f} s before it started" if up is not None
                     else "the first step on this machine")
        else:
            since = f"{entry['started'] - previous['ended']:.1f} s after {previous['step']} ended"
        lines.append(f"{entry['step']}: {took:.1f} s, {since}")
        previous = entry
    return lines


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


def store(paths: Sequence[Path], stash: Path = STASH, *, call: int | None = None) -> None:
    """`lease store`: each path a data part (:func:`store_part`) or a folder of carried files
    (:func:`store_carried`). With ``call`` (1-based, as `prepare` numbers them), then checks
    that the stash holds what the calls before it stored (:func:`check_stash`, by the carried
    ``.lease/stash.json``)."""
    missing = [str(path) for path in map(Path, paths) if not path.exists()]
    if missing:  # on the device: a path the call's carry did not name
        raise FileNotFoundError(f"not found: {', '.join(missing)} (a call must carry each data "
                                "part and weight folder it stores)")
    with timed_step(stash, f"store {call}" if call is not None else "store"):
        for path in map(Path, paths):
            if path.is_dir():
                store_carried(path, stash)
            else:
                store_part(path, stash)
        if call is not None:
            check_stash(Path(LEASE_DIR) / STASH_PLAN, call, stash)


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
    """The data root (holding cifar-100-python/) rebuilt from the stashed parts; a stash
    without them is a fresh machine (:class:`StashIncomplete`)."""
    root = stash / "data"
    if not (stash / DATA_MANIFEST).exists():
        raise StashIncomplete(
            f"{stash} holds no data: this is a fresh machine (the one the calls stored on went "
            "back), so there is nothing to continue; receive the earlier calls' folders")
    manifest = json.loads((stash / DATA_MANIFEST).read_text())
    done = root / "cifar-100-python" / ".sha256"
    if done.exists() and done.read_text() == manifest["sha256"]:
        return root
    blob = lzma.decompress(join_parts(stash, manifest))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(root, filter="data")
    for name, span in manifest.get("pixels", {}).items():  # residuals back to pixels
        path = root / "cifar-100-python" / name
        path.write_bytes(recode_file(path.read_bytes(), span, encode=False))
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
                 unchanged: dict[str, list[int]] | None = None,
                 returned: int | None = None, preset: str | None = None) -> list[Path]:
    """The result files of ``results_dir`` (:func:`_result_files`) but those ``unchanged`` since
    a :func:`snapshot_results`, as a tar split into files of <= ``file_mib`` MiB in ``out``,
    with ``extra`` files beside them and a manifest (``returned``: how many returns this
    machine made before, which :func:`~kdlib.lease.receive.check_returns` orders by;
    ``preset``: the grid's, which `receive` takes them into)."""
    out.mkdir(parents=True, exist_ok=True)
    unchanged = unchanged or {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in _result_files(results_dir):
            arcname = str(path.relative_to(results_dir))
            if unchanged.get(arcname) != _stamp(path):
                tar.add(path, arcname=arcname)
    blob = buffer.getvalue()
    extra = list(extra)
    part_bytes = int(file_mib * MIB)
    written = 1 + math.ceil(len(blob) / part_bytes) + len(extra)  # manifest, parts, extras
    if written > max_files:  # refused before any is written: no partial return in `out`
        raise ValueError(f"{written} files to return, more than {max_files}: the results do not "
                         "fit one call's return; train fewer runs per lease")
    too_big = [f"{path.name} ({path.stat().st_size / MIB:.1f} MiB)" for path in extra
               if path.stat().st_size > part_bytes]
    if too_big:  # the device tool would drop it, not split it
        raise ValueError(f"{', '.join(too_big)}: over the {file_mib:g} MiB a returned file may "
                         "weigh; leave it out of the return")
    parts = split_into_parts(blob, out, RESULTS_ARCHIVE, part_bytes)
    extras = []
    for path in extra:
        shutil.copyfile(path, out / path.name)
        extras.append({"name": path.name, "sha256": sha256_of(out / path.name)})
    manifest = {"sha256": hashlib.sha256(blob).hexdigest(), "parts": parts, "extra": extras,
                "returned": returned, "preset": preset}
    (out / RETURN_MANIFEST).write_text(json.dumps(manifest, indent=1))
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
    the device tool copies the tree again at each call, and what a call wrote outside ignored
    folders may not be there at the next. Returns how many returns were put back."""
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
    ``jobs="auto"``: as many runs at once as the benchmark found worth it (1 without one).
    With the grid done and time left, the compiled part a later preset decides on
    (:func:`_measure_in_spare_time`)."""
    from kdlib.bench.graphs import graphs_verdict
    from kdlib.budget import Budget, RunTimer, load_bench
    from kdlib.device import device_kind, pick_device
    from kdlib.executors import execute_processes
    from kdlib.experiments import execute, plan_grid
    from kdlib.presets import get_preset
    from kdlib.results import load_records

    model = model or get_preset(preset).model
    for line in call_timeline(stash):
        log(f"on this machine before: {line}")
    with timed_step(stash, "go"):
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
        bench_written = _bench_device(bench, bench_dir, kind, torch_device, data_root,
                                      preset=preset, model=model, bench_args=bench_args,
                                      started=started, log=log)
        timer = RunTimer(kind, bench=load_bench(bench_dir, kind))
        timer.graphs = replays_steps(timer.bench, preset, model)
        verdict = graphs_verdict(timer.bench) if timer.bench else None
        if verdict:
            log(f"grid: {'steps replayed as CUDA graphs' if timer.graphs else 'eager steps'} "
                f"({verdict['why']})")
        grouped, why = groups_weights(timer.bench)
        how = "of all layers quantized together" if grouped else "quantized per layer"
        log(f"grid: weights {how} ({why})")
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
        seeds = list(get_preset(preset).seeds)
        overrides = {**({"cuda_graphs": True} if timer.graphs else {}),
                     **({} if grouped else {"group_weights": False})}
        plan = plan_grid(preset=preset, model=model, **{"seeds": seeds, **grid},
                         overrides=overrides or None)
        log(f"grid: {len(plan)} planned runs, {budget_s:.0f} s of budget, {jobs} at a time")
        if budget_s > 0:
            # at most as many runs continue next lease as run at once: their checkpoints come
            # back and travel again (paper: each run spans leases; gpu: 12 paused filled 41 MB)
            budget = Budget(budget_s, timer, max_spans=jobs)
            if jobs > 1:
                execute_processes(plan, jobs=jobs, data_dir=data_root, results_dir=results_dir,
                                  device=str(torch_device), budget=budget, log=log)
            else:
                execute(plan, data_dir=data_root, results_dir=results_dir,
                        device=str(torch_device), progress=False, budget=budget)
        have = {record["run_id"] for record in load_records(results_dir)}
        if all(cfg.run_id() in have for cfg in plan):
            bench_written = _measure_in_spare_time(
                timer.bench, bench_dir, torch_device, preset=preset, model=model,
                data_root=data_root, seconds=deadline - time.monotonic(), log=log) or bench_written
        summary = {"records": sum(cfg.run_id() in have for cfg in plan), "planned": len(plan),
                   "seconds": time.monotonic() - started,
                   "bench": str(bench_written) if bench_written else None}
        log(f"lease: {summary['records']} of {len(plan)} planned runs have records; "
            f"{summary['seconds']:.0f} s; now `python3 -m kdlib lease pack`")
        return summary


def _bench_device(bench: str, bench_dir: Path, kind: str, device, data_root: Path, *,
                  preset: str, model: str, bench_args: dict[str, Any] | None, started: float,
                  log: Callable[[str], None]) -> Path | None:
    """`go`'s benchmark (``bench``: auto | always | never): a new one where ``bench_dir`` has
    none for this device kind (a minimal one if the full one fails: the grid needs estimates
    more than the rest), else the parts an older one lacks. Either way the later parts get what
    is left of :data:`BENCH_ALLOWANCE_S` from the benchmark's start; those that do not fit wait
    for the next lease. Returns the file it wrote; logs it with the seconds since ``started``
    (monotonic)."""
    from kdlib.bench.run import bench_file_name, run_benchmark
    from kdlib.budget import load_bench
    from kdlib.data import load_cifar100
    from kdlib.fileio import write_json_atomic

    existing = load_bench(bench_dir, kind)
    if bench == "auto" and existing is not None:
        if not missing_parts(existing, device, preset):
            return None
        path = complete_bench(existing, bench_dir, data_root, device, preset=preset,
                              model=model, seconds=BENCH_ALLOWANCE_S, log=log)
        log(f"benchmark completed as far as its {BENCH_ALLOWANCE_S:.0f} s allow: {path} "
            f"({time.monotonic() - started:.0f} s in)")
        return path
    if bench == "never":
        return None
    bench_started = time.monotonic()
    images, labels = load_cifar100(data_root, train=True, download=False)
    source = f"CIFAR-100 training set, {len(images)} images"
    try:
        result = run_benchmark(images, labels, device=device, preset=preset, model=model,
                               data_source=source, later_parts=False,
                               **device_bench_args(preset, model, bench_args, device))
    except Exception as exc:  # noqa: BLE001 - the grid needs estimates more than the rest
        log(f"benchmark failed ({type(exc).__name__}: {exc}); timing only fit()'s steps")
        result = run_benchmark(images, labels, device=device, preset=preset, model=model,
                               data_source=source, later_parts=False, **FALLBACK_BENCH)
    path = bench_dir / bench_file_name(result)
    write_json_atomic(path, result)
    log(f"benchmark written: {path} ({time.monotonic() - started:.0f} s in)")
    if missing_parts(result, device, preset):
        spent = time.monotonic() - bench_started
        complete_bench(result, bench_dir, data_root, device, preset=preset, model=model,
                       seconds=BENCH_ALLOWANCE_S - spent, log=log)
        log(f"benchmark completed as far as its {BENCH_ALLOWANCE_S:.0f} s allow: {path} "
            f"({time.monotonic() - started:.0f} s in)")
    return path


def _measure_in_spare_time(bench: dict[str, Any] | None, bench_dir: Path, device, *,
                           preset: str, model: str, data_root: Path, seconds: float,
                           log: Callable[[str], None]) -> Path | None:
    """With the grid done and :data:`SPARE_COMPILED_S` left: the compiled part a later preset
    decides on (:func:`~kdlib.lease.decisions.later_compile_parts`), into the benchmark."""
    later = later_compile_parts(bench, device, preset)
    if not later:
        return None
    if seconds < SPARE_COMPILED_S:
        log(f"grid done; {seconds:.0f} s left, too few to measure the compiled part that "
            f"`{later[0]}` decides on (about {SPARE_COMPILED_S:.0f} s)")
        return None
    log(f"grid done; {seconds:.0f} s left: the compiled part that `{later[0]}` decides on")
    try:
        path = complete_bench(bench, bench_dir, data_root, device, preset=later[0], model=model,
                              log=log)
    except Exception as exc:  # noqa: BLE001 - the lease's records matter more
        log(f"compiled part failed ({type(exc).__name__}: {exc})")
        return None
    log(f"benchmark completed for `{later[0]}`: {path}")
    return path


def pack(results_dir: Path, out: Path, bench_dir: Path, device: str | None = None,
         stash: Path = STASH, preset: str | None = None) -> list[Path]:
    """There, after :func:`go` (finished, failed or interrupted): what this lease added or
    changed (everything, if `go` failed before its snapshot), and the benchmarks of this device
    (this lease's among them), into ``out``; the manifest names ``preset``."""
    from kdlib.device import bench_device_kind, device_kind, pick_device

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
    earlier = len(list((stash / RETURNED).glob("[0-9]*")))
    with timed_step(stash, "pack"):
        files = pack_outputs(results_dir, out, benches, unchanged=unchanged, returned=earlier,
                             preset=preset)
        kept = stash / RETURNED / f"{earlier:02d}"
        kept.mkdir(parents=True)
        for path in files:  # for a follow-up call on this machine (restore_returned)
            shutil.copyfile(path, kept / path.name)
    print(f"packed {len(files)} file(s) into {out}: "
          f"{len(list(results_dir.glob('runs/*.json')))} record(s), "
          f"{len(benches)} benchmark(s) of {kind}", flush=True)
    return files
