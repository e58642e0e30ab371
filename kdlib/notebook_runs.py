"""Executing the numbered notebooks with papermill (``python -m kdlib run``).

An executed copy is replaced only when a cell's source or output changed, and it names its
folders and paths from the checkout, so that running the workbook again, in this clone or
another, leaves the committed copies as they are unless a result changed.
"""
from __future__ import annotations

import json
import logging
import os
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any

from kdlib.checkout import REPO_ROOT, shown_path

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("01_baseline", "02_ta_chain", "03_individual", "04_results")


class NotebookFailed(Exception):
    """A cell raised; ``executed`` is the executed copy, up to the failing cell."""

    def __init__(self, message: str, executed: Path):
        super().__init__(message)
        self.executed = executed


def seen_from_notebooks(folder: str | os.PathLike) -> str:
    """A folder as the kernel (working directory notebooks/) names it: relative when inside this
    checkout, so an executed notebook reads the same in every clone; absolute otherwise, as
    given (a link is not followed: it may be the name that every machine has)."""
    absolute = os.path.abspath(folder)
    if not Path(absolute).resolve().is_relative_to(REPO_ROOT):
        return absolute
    return os.path.relpath(Path(absolute).resolve(), NOTEBOOKS_DIR)


def start_log(folder: Path, echo: bool) -> Path:
    """Send every cell's output (papermill's logger) to a timestamped file, and to stderr too
    when ``echo``; the executed notebooks hold the same output per cell."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    logger = logging.getLogger("papermill")
    logger.setLevel(logging.INFO)
    handlers = [logging.FileHandler(path)] + ([logging.StreamHandler()] if echo else [])
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return path


def kernels_import_this_checkout() -> None:
    """The kernels start in notebooks/ and import kdlib from the environment's install, which may
    be another checkout's (an editable install follows the last `pip install -e`): put this
    checkout first on their path, so that the notebooks run the code of the command that runs
    them."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def kernels_read_the_commands_data_root() -> None:
    """The kernels start in notebooks/, where the default data root ``./data`` would be another
    folder than the command's (a second 186 MB download, into a folder git does not ignore):
    give them the command's own, ``$KDLIB_DATA`` if set, else ``./data`` where it runs."""
    from kdlib.data import ENV_VAR, resolve_data_root  # lazy: it imports torch

    os.environ[ENV_VAR] = str(resolve_data_root())


def execute(name: str, parameters: dict[str, Any], executed_dir: Path, progress_bar: bool) -> Path:
    """Run ``notebooks/<name>.ipynb`` with ``parameters`` injected into
    ``executed_dir/<name>.ipynb``; raises :class:`NotebookFailed` when a cell raises."""
    import papermill  # lazy: a heavy import (jupyter client) only `run` needs

    target = executed_dir / f"{name}.ipynb"
    fresh = running_copy(executed_dir, name)
    try:
        papermill.execute_notebook(
            str(NOTEBOOKS_DIR / f"{name}.ipynb"), str(fresh), parameters=parameters,
            cwd=str(NOTEBOOKS_DIR), kernel_name="python3", log_output=True,
            progress_bar=progress_bar)
    except papermill.PapermillExecutionError as exc:
        fresh.replace(target)
        raise NotebookFailed(f"{exc.ename}: {exc.evalue}", target) from exc
    name_paths_from_the_checkout(fresh, target)
    if outputs(fresh) == outputs(target):  # nothing changed: keep the committed file as is
        fresh.unlink()
    else:
        fresh.replace(target)
    return target


def running_copy(executed_dir: Path, name: str) -> Path:
    """Where papermill writes a notebook cell by cell (ignored by git: an interrupted run may
    leave it behind) until it replaces ``executed_dir/<name>.ipynb``."""
    return executed_dir / f".{name}.running.ipynb"


def outputs(path: Path) -> list | None:
    """A notebook's cells (source and outputs) without run-to-run metadata (times, durations),
    each cell's printed text whole (:func:`joined_streams`)."""
    if not path.exists():
        return None
    cells = json.loads(path.read_text()).get("cells", [])
    return [(c.get("source"), joined_streams(c.get("outputs"))) for c in cells]


def joined_streams(outputs: list | None) -> list | None:
    """``outputs`` with each run of consecutive prints to one stream as one text: where the
    kernel cuts printed text into messages depends on timing (a pause between two prints), not
    on what was printed."""
    if outputs is None:
        return None
    joined: list = []
    for output in outputs:
        if output.get("output_type") != "stream":
            joined.append(output)
            continue
        text = "".join(output.get("text", ""))
        last = joined[-1] if joined else {}
        if last.get("output_type") == "stream" and last.get("name") == output.get("name"):
            joined[-1] = {**last, "text": last["text"] + text}
        else:
            joined.append({**output, "text": text})
    return joined


# cells papermill adds to an executed copy: the parameters it injects, and where a cell
# raised, an error banner on top and a marker before that cell
PAPERMILL_TAGS = ("injected-parameters", "papermill-error-cell-tag")


def sources(path: Path) -> list[str]:
    """A notebook's cell sources as one string each, the cells papermill adds left out."""
    cells = json.loads(path.read_text()).get("cells", [])
    return ["".join(c.get("source", "")) for c in cells
            if not set(PAPERMILL_TAGS) & set(c.get("metadata", {}).get("tags", []))]


def changed_cells(executed: Path) -> list[int]:
    """The cells (0-based, as in the notebook) whose source differs between an executed copy and
    the notebook it is a copy of, ``notebooks/<name>.ipynb``: a committed copy run from an older
    notebook, which the next ``kdlib run`` rewrites even though no result changed."""
    pairs = zip_longest(sources(executed), sources(NOTEBOOKS_DIR / executed.name))
    return [i for i, (ran, now) in enumerate(pairs) if ran != now]


def name_paths_from_the_checkout(executed: Path, target: Path) -> None:
    """Papermill records where it read and wrote the notebook as absolute paths (and wrote it to a
    temporary name), and gives the cell it injects a random id: record the notebook and its final
    place as seen from the checkout, and a fixed id, so that a rerun in another clone reads the
    same."""
    import nbformat  # lazy, as papermill (which writes notebooks with it)

    notebook = nbformat.read(executed, as_version=nbformat.NO_CONVERT)
    recorded = notebook.metadata.setdefault("papermill", {})
    if recorded.get("input_path"):
        recorded["input_path"] = shown_path(recorded["input_path"])
    recorded["output_path"] = shown_path(target)
    for cell in notebook.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"
    nbformat.write(notebook, executed)
