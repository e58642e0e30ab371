"""Where this checkout is, and paths named from it (in the README and the executed notebooks),
so that what is committed reads the same in every clone."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the checkout when inside it, else absolute."""
    path = Path(path).resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def default_results_dir(preset: str) -> Path:
    """Where a preset's records, weights and figures live unless --results-dir says otherwise."""
    return REPO_ROOT / "results" / preset
