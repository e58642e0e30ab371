"""What git tracks, seen from a lease: the tree every device call sends (the tool's rule:
tracked files and untracked ones git does not ignore), and the weight files and checkpoints a
later session needs, which must be committed because a session's ignored files do not outlive
it (:func:`untrack_for_lease`, :func:`stage_for_later`)."""
from __future__ import annotations

import os
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
    ``leaving``: files :func:`untrack_for_lease` is about to take out of the index."""
    names = set(_names(_git(repo_root, "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard")))
    names -= set(_inside(repo_root, leaving))
    return {name: (repo_root / name).stat().st_size for name in sorted(names)
            if (repo_root / name).is_file()}


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
