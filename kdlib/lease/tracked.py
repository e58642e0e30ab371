"""What git tracks, seen from a lease: the tree every device call sends (the tool's rule:
tracked files and untracked ones git does not ignore); the weight files and checkpoints a
later session needs, which must be committed because a session's ignored files do not outlive
it (:func:`untrack_for_lease`, :func:`stage_for_later`); and the other presets' results, which
the device never reads, hidden from the lease's calls (:func:`hide_for_lease`)."""
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path


def _git(repo_root: Path, *args: str) -> subprocess.CompletedProcess | None:
    """``git args`` in ``repo_root``; None where that is no checkout (or git is missing)."""
    if not Path(repo_root).is_dir():
        return None
    try:
        done = subprocess.run(["git", "--literal-pathspecs", *args], cwd=repo_root,
                              capture_output=True)
    except FileNotFoundError:
        return None
    return done if done.returncode == 0 else None


def _names(done: subprocess.CompletedProcess | None) -> list[str]:
    """The NUL-separated paths a ``git ... -z`` printed (none for a refused command)."""
    return [name for name in done.stdout.decode().split("\0") if name] if done else []


def travelling_files(repo_root: Path, leaving: Sequence[Path] = ()) -> dict[str, int]:
    """What every call sends besides its carry, path (relative) to size: tracked files and
    untracked ones git does not ignore (the device tool's rule); none outside a checkout.
    ``leaving``: files :func:`untrack_for_lease` is about to take out of the index, and
    folders :func:`hide_for_lease` is about to hide."""
    names = set(_names(_git(repo_root, "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard")))
    gone = _inside(repo_root, leaving)
    return {name: (repo_root / name).stat().st_size for name in sorted(names)
            if not within(name, gone) and (repo_root / name).is_file()}


def within(name: str, paths: Sequence[str]) -> bool:
    """Whether the relative path ``name`` is one of ``paths`` (files) or inside one (folders)."""
    return any(name == path or name.startswith(path + "/") for path in paths)


def travelling_bytes(repo_root: Path, leaving: Sequence[Path] = ()) -> int:
    return sum(travelling_files(repo_root, leaving).values())


def largest_folders(files: dict[str, int], depth: int = 2, top: int = 3) -> list[tuple[str, int]]:
    """The ``top`` folders (``depth`` levels down) holding most of ``files``' bytes, largest
    first, then ``("the rest", bytes)``: what makes the tree every call sends, so what to
    commit less of when the data takes more calls than it should."""
    by_folder: dict[str, int] = {}
    for name, size in files.items():
        folder = "/".join(name.split("/")[:-1][:depth]) or "(top files)"
        by_folder[folder] = by_folder.get(folder, 0) + size
    ranked = sorted(by_folder.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked[:top] + [("the rest", sum(size for _, size in ranked[top:]))]


def committed_files(repo_root: Path, folder: Path) -> set[Path]:
    """The files under ``folder`` that git tracks (resolved paths; none outside a checkout)."""
    return set(tracked_among(repo_root, [folder]))


def _inside(repo_root: Path, paths: Sequence[Path]) -> list[str]:
    """``paths`` relative to ``repo_root``, those outside it left out."""
    root = Path(repo_root).resolve()
    inside = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved.is_relative_to(root):
            inside.append(str(resolved.relative_to(root)))
    return inside


def tracked_among(repo_root: Path, paths: Sequence[Path]) -> list[Path]:
    """The files git tracks among ``paths`` (files, or folders for what they hold; resolved;
    none outside a checkout)."""
    names = _inside(repo_root, paths)
    root = Path(repo_root).resolve()
    return [root / name for name in _names(_git(repo_root, "ls-files", "-z", "--", *names)
                                           if names else None)]


def untrack_for_lease(repo_root: Path, paths: Sequence[Path]) -> None:
    """Take ``paths`` (committed weight files and checkpoints a lease carries,
    :func:`tracked_among`) out of git's index, kept on disk, where their folder's ignore rule
    hides them: so they travel once, in a call's carry, instead of with the tree in every
    call. :func:`stage_for_later` puts back those a later session still needs; ``git reset -q
    -- PATHS`` undoes it for a lease that never ran."""
    names = _inside(repo_root, paths)
    if names and _git(repo_root, "rm", "--cached", "-q", "--", *names) is None:
        raise RuntimeError(f"git rm --cached failed in {repo_root} for {names}")


def stage_for_later(repo_root: Path, keep: Sequence[Path], folder: Path) -> dict[str, list[Path]]:
    """Stage in git what a later session needs under ``folder`` (a results folder's
    checkpoints): ``keep`` added (``git add -f``: the folder is ignored) and tracked files of
    ``folder`` gone from disk removed, so that committing the lease's records commits them
    too. Returns ``{"added": ..., "removed": ...}``: ``keep``, and the committed files of
    ``folder`` the next commit removes (nothing outside a checkout)."""
    if _git(repo_root, "rev-parse", "--git-dir") is None:
        return {"added": [], "removed": []}
    keep = [Path(p) for p in keep if Path(p).exists()]
    added = _inside(repo_root, keep)
    if added and _git(repo_root, "add", "-f", "--", *added) is None:
        raise RuntimeError(f"git add -f failed in {repo_root} for {added}")
    where = os.path.relpath(folder, repo_root)
    gone = _names(_git(repo_root, "ls-files", "-z", "--deleted", "--", where))
    if gone and _git(repo_root, "rm", "--cached", "-q", "--", *gone) is None:
        raise RuntimeError(f"git rm --cached failed in {repo_root} for {gone}")
    # what the commit removes, also what untrack_for_lease took out and nobody needs now
    removed = _names(_git(repo_root, "diff", "--cached", "--relative", "--name-only", "-z",
                          "--diff-filter=D", "--", where))
    root = Path(repo_root).resolve()
    return {"added": [root / name for name in added], "removed": [root / n for n in removed]}


# The lines `lease prepare` writes into .git/info/exclude (the device tool honours it) around
# the folders it hides; `lease receive` and `lease restore` remove them.
EXCLUDE_BEGIN = "# kdlib lease, from commit {commit}: out of git's index for the lease's calls"
EXCLUDE_END = "# kdlib lease: end (python -m kdlib lease restore puts them back)"
_BEGIN = re.compile(r"^# kdlib lease, from commit (\S*):")
BENCH_FOLDER = "bench"  # results/bench: the device reads its benchmark file there


def untravelled_results(repo_root: Path, results_dir: Path) -> list[Path]:
    """The folders beside ``results_dir`` but the benchmarks' (the other presets' results)
    that hold files every call would send. The device reads only its preset's results and
    ``results/bench``, and the other presets' committed weights (quick's teachers and seed 0,
    SqueezeNet's teachers: 32.4 MiB at commit 04c0cf1) would take most of each call's 64 MiB from
    the data; :func:`hide_for_lease` keeps them here."""
    root, results_dir = Path(repo_root).resolve(), Path(results_dir).resolve()
    parent = results_dir.parent
    if parent == root or not parent.is_relative_to(root):
        return []
    prefix = str(parent.relative_to(root)) + "/"
    folders = {name[len(prefix):].split("/")[0] for name in travelling_files(root)
               if name.startswith(prefix) and "/" in name[len(prefix):]}
    return [parent / name for name in sorted(folders - {results_dir.name, BENCH_FOLDER})]


def staged_among(repo_root: Path, folders: Sequence[Path]) -> list[str]:
    """Changes staged in git under ``folders`` (relative paths): taking them out of the index
    for a lease and putting them back as committed would unstage them
    (:func:`unhide_after_lease`)."""
    names = _inside(repo_root, folders)
    return _names(_git(repo_root, "diff", "--cached", "--name-only", "-z", "--", *names)
                  if names else None)


def _exclude_file(repo_root: Path) -> Path | None:
    done = _git(repo_root, "rev-parse", "--git-path", "info/exclude")
    return Path(repo_root) / done.stdout.decode().strip() if done else None


def _split_exclude(text: str) -> tuple[list[str], list[str], str | None]:
    """``text`` of .git/info/exclude as (its lines but the lease's block, the folders in that
    block, the commit the block names, None where there is no block)."""
    kept, folders, commit, inside = [], [], None, False
    for line in text.splitlines():
        begin = _BEGIN.match(line)
        if begin:
            inside, commit = True, begin.group(1)
        elif inside and line == EXCLUDE_END:
            inside = False
        elif inside:
            folders.append(line.strip("/"))
        else:
            kept.append(line)
    return kept, folders, commit


def hidden_folders(repo_root: Path) -> list[str]:
    """The folders (relative) an earlier :func:`hide_for_lease` hid and nothing put back."""
    exclude = _exclude_file(repo_root)
    return _split_exclude(exclude.read_text())[1] if exclude and exclude.exists() else []


def hide_for_lease(repo_root: Path, folders: Sequence[Path]) -> None:
    """Keep ``folders`` (:func:`untravelled_results`) out of the lease's calls: their files
    taken out of git's index (kept on disk) and the folders ignored in .git/info/exclude, for
    the tool sends tracked files and untracked ones git does not ignore. A rule that ignores a
    folder there also holds against .gitignore's negations (``!results/*/models/*-s0-*.packed``):
    git does not look inside an ignored folder. :func:`unhide_after_lease` undoes it."""
    names = _inside(repo_root, folders)
    exclude = _exclude_file(repo_root)
    if not names or exclude is None:
        return
    head = _git(repo_root, "rev-parse", "--verify", "-q", "HEAD")
    commit = head.stdout.decode().strip() if head else ""
    if _git(repo_root, "rm", "-r", "--cached", "-q", "--ignore-unmatch", "--", *names) is None:
        raise RuntimeError(f"git rm --cached failed in {repo_root} for {names}")
    kept = _split_exclude(exclude.read_text())[0] if exclude.exists() else []
    block = [EXCLUDE_BEGIN.format(commit=commit), *(f"/{name}/" for name in names), EXCLUDE_END]
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text("\n".join([*kept, *block]) + "\n")


def unhide_after_lease(repo_root: Path, also: Sequence[Path] = ()) -> list[str]:
    """Undo :func:`hide_for_lease`: the hidden folders' files back in git's index as the
    commit it saw had them (a commit made since, which would have removed them, is undone
    for them too), and its lines gone from .git/info/exclude. ``also``: more paths put back
    the same way (the checkpoints :func:`untrack_for_lease` took out, for a lease that never
    ran). Returns the folders put back (relative)."""
    exclude = _exclude_file(repo_root)
    kept, folders, seen = (_split_exclude(exclude.read_text()) if exclude and exclude.exists()
                           else ([], [], None))
    commit = seen or (_git(repo_root, "rev-parse", "--verify", "-q", "HEAD") and "HEAD")
    names = folders + _inside(repo_root, also)
    if names and commit and _git(repo_root, "reset", "-q", commit, "--", *names) is None:
        raise RuntimeError(f"git reset failed in {repo_root} for {names}")
    if seen is not None:  # the block was there
        exclude.write_text("\n".join(kept) + "\n" if kept else "")
    return folders
