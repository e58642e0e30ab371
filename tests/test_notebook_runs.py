"""Running the notebooks with papermill: an executed copy is replaced only when a result
changed, and reads the same in every clone."""
import json
import os
import subprocess
import sys

import nbformat
import pytest

from kdlib import notebook_runs
from kdlib.checkout import REPO_ROOT


def test_executed_notebook_is_replaced_only_when_its_outputs_change(tmp_path):
    def notebook(path, text, when, source="print(1)"):
        cell = {"cell_type": "code", "source": source,
                "metadata": {"papermill": {"start_time": when}},
                "outputs": [{"output_type": "stream", "name": "stdout", "text": text}]}
        path.write_text(json.dumps({"cells": [cell],
                                    "metadata": {"papermill": {"end_time": when}}}))

    a, b, c = tmp_path / "a.ipynb", tmp_path / "b.ipynb", tmp_path / "c.ipynb"
    notebook(a, "1\n", "10:00")
    notebook(b, "1\n", "11:00")  # run again: other times, same outputs
    notebook(c, "2\n", "11:00")
    assert notebook_runs.outputs(a) == notebook_runs.outputs(b)
    assert notebook_runs.outputs(a) != notebook_runs.outputs(c)
    notebook(c, "1\n", "11:00", source="print(3 - 2)")  # same output, code of another version
    assert notebook_runs.outputs(a) != notebook_runs.outputs(c)
    assert notebook_runs.outputs(tmp_path / "missing.ipynb") is None


def test_printed_text_cut_into_other_messages_is_the_same_output(tmp_path):
    def notebook(path, *texts, name="stdout"):
        outputs = [{"output_type": "stream", "name": name, "text": text} for text in texts]
        cell = {"cell_type": "code", "source": "run()", "metadata": {}, "outputs": outputs}
        path.write_text(json.dumps({"cells": [cell], "metadata": {}}))
        return notebook_runs.outputs(path)

    whole = notebook(tmp_path / "a.ipynb", ["[1/2] a\n", "skip a\n", "[2/2] b\n"])
    assert notebook(tmp_path / "b.ipynb", ["[1/2] a\n"], ["skip a\n", "[2/2] b\n"]) == whole
    assert notebook(tmp_path / "c.ipynb", "[1/2] a\nskip a\n", "[2/2] b\n") == whole
    assert notebook(tmp_path / "d.ipynb", "[1/2] a\n", "skip a\n[2/2] c\n") != whole
    assert notebook(tmp_path / "e.ipynb", "[1/2] a\nskip a\n[2/2] b\n", name="stderr") != whole


def test_text_moved_from_one_stream_to_the_other_is_another_output():
    def stream(name, text):
        return {"output_type": "stream", "name": name, "text": text}

    printed = [stream("stdout", "a\n"), stream("stderr", "b\n")]
    moved = [stream("stdout", "a\n"), stream("stdout", "b\n")]
    assert notebook_runs.joined_streams(printed) != notebook_runs.joined_streams(moved)


def test_an_executed_notebook_names_its_paths_from_the_checkout_and_its_injected_cell_by_a_fixed_id(
        tmp_path):
    notebook = nbformat.v4.new_notebook()
    injected = nbformat.v4.new_code_cell("preset = 'quick'",
                                         metadata={"tags": ["injected-parameters"]})
    notebook.cells = [nbformat.v4.new_code_cell("x = 1"), injected]
    notebook.metadata["papermill"] = {
        "input_path": str(notebook_runs.NOTEBOOKS_DIR / "01_baseline.ipynb"),
        "output_path": str(tmp_path / ".01_baseline.running.ipynb")}
    running = tmp_path / ".01_baseline.running.ipynb"
    nbformat.write(notebook, running)
    first_id = notebook.cells[0].id
    for target, shown in ((REPO_ROOT / "results" / "quick" / "executed" / "01_baseline.ipynb",
                           "results/quick/executed/01_baseline.ipynb"),
                          (tmp_path / "01_baseline.ipynb", str(tmp_path / "01_baseline.ipynb"))):
        notebook_runs.name_paths_from_the_checkout(running, target)  # writes the running copy only
        written = nbformat.read(running, as_version=4)
        assert written.metadata["papermill"]["input_path"] == "notebooks/01_baseline.ipynb"
        assert written.metadata["papermill"]["output_path"] == shown
        assert [c.id for c in written.cells] == [first_id, "injected-parameters"]
        nbformat.validate(written)


def test_the_copy_an_interrupted_run_leaves_behind_is_not_a_change_to_commit():
    running = notebook_runs.running_copy(REPO_ROOT / "results" / "quick" / "executed",
                                         "01_baseline")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(running)], cwd=REPO_ROOT)
    assert ignored.returncode == 0


def test_changed_cells_names_the_cells_an_executed_copy_ran_that_the_notebook_no_longer_has(
        tmp_path):
    source = nbformat.read(notebook_runs.NOTEBOOKS_DIR / "01_baseline.ipynb", as_version=4)
    executed = tmp_path / "01_baseline.ipynb"
    injected = nbformat.v4.new_code_cell("preset = 'quick'",
                                         metadata={"tags": ["injected-parameters"]})
    source.cells.insert(2, injected)
    nbformat.write(source, executed)
    assert notebook_runs.changed_cells(executed) == []  # the injected cell is not a change
    # a run that raised: papermill's banner on top and its marker before the failing cell
    failed = nbformat.read(executed, as_version=4)
    for at in (5, 0):
        failed.cells.insert(at, nbformat.v4.new_markdown_cell(
            "An Exception was encountered", metadata={"tags": ["papermill-error-cell-tag"]}))
    nbformat.write(failed, executed)
    assert notebook_runs.changed_cells(executed) == []
    source.cells[4].source += "\n# edited"
    source.cells.pop()
    nbformat.write(source, executed)
    last = len(notebook_runs.sources(notebook_runs.NOTEBOOKS_DIR / "01_baseline.ipynb")) - 1
    assert notebook_runs.changed_cells(executed) == [3, last]


def test_every_committed_executed_notebook_ran_the_notebook_as_it_is_now():
    """Else the next `kdlib run` rewrites the copy though no result changed (a clone's git is
    no longer clean after the README's `make run`)."""
    committed = subprocess.run(["git", "ls-files", "results/*/executed/*.ipynb"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    assert committed  # the quick grid's copies at least
    stale = {path: notebook_runs.changed_cells(REPO_ROOT / path) for path in committed}
    stale = {path: cells for path, cells in stale.items() if cells}
    assert not stale, ("executed from an older notebook (cells " + "; ".join(
        f"{path}: {cells}" for path, cells in stale.items()) + "): rerun it with `python -m kdlib "
        "run --preset <its folder> --only NN`, which retrains nothing already finished")


def test_the_kernels_read_the_data_root_of_the_command_not_one_of_their_own(tmp_path, monkeypatch):
    """A kernel starts in notebooks/: its own default ./data would be notebooks/data."""
    def kernels_data_root():  # as a kernel resolves it: another process, started in notebooks/
        return subprocess.run(
            [sys.executable, "-c", "from kdlib.data import resolve_data_root as r; print(r())"],
            cwd=notebook_runs.NOTEBOOKS_DIR, env=os.environ, capture_output=True, text=True,
            check=True).stdout.strip()

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDLIB_DATA", raising=False)
    assert kernels_data_root() == str(notebook_runs.NOTEBOOKS_DIR / "data")  # without the fix
    notebook_runs.kernels_read_the_commands_data_root()
    assert kernels_data_root() == str(tmp_path / "data")
    monkeypatch.setenv("KDLIB_DATA", "elsewhere")  # relative: to where the command runs
    notebook_runs.kernels_read_the_commands_data_root()
    assert kernels_data_root() == str(tmp_path / "elsewhere")


def test_paths_are_named_from_the_checkout_whatever_the_working_directory(tmp_path,
                                                                           monkeypatch):
    """A preset's results folder is the checkout's, and a path inside the checkout is shown
    relative to it, from any working directory (a notebook runs in notebooks/)."""
    from kdlib.checkout import default_results_dir, shown_path

    monkeypatch.chdir(notebook_runs.NOTEBOOKS_DIR)
    assert default_results_dir("quick") == REPO_ROOT / "results" / "quick"
    assert shown_path("../results/quick/executed/01_baseline.ipynb") \
        == "results/quick/executed/01_baseline.ipynb"
    monkeypatch.chdir(tmp_path)
    assert default_results_dir("smoke") == REPO_ROOT / "results" / "smoke"
    assert shown_path("a/b.ipynb") == str((tmp_path / "a" / "b.ipynb").resolve())


def test_execute_replaces_the_executed_copy_only_when_a_result_changed_and_keeps_a_failed_one(
        tmp_path, monkeypatch):
    """A rerun that changed nothing leaves the committed copy byte for byte and no running copy
    behind; a changed output replaces it, its paths named from the checkout; a failing cell
    leaves the copy up to that cell where the error names it."""
    import types

    printed = {"text": "1\n"}
    called = []

    class PapermillExecutionError(Exception):
        def __init__(self, ename, evalue):
            super().__init__(evalue)
            self.ename, self.evalue = ename, evalue

    def execute_notebook(source, output, parameters, **kwargs):  # writes a fresh cell id
        called.append((source, parameters, kwargs["cwd"], kwargs["progress_bar"]))
        output_cell = nbformat.v4.new_output("stream", name="stdout", text=printed["text"])
        notebook = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell("print(x)", outputs=[output_cell])],
            metadata={"papermill": {"input_path": source, "output_path": output}})
        nbformat.write(notebook, output)
        if printed["text"] == "failed\n":
            raise PapermillExecutionError("ValueError", "bad")

    monkeypatch.setitem(sys.modules, "papermill", types.SimpleNamespace(
        execute_notebook=execute_notebook, PapermillExecutionError=PapermillExecutionError))

    def run():
        return notebook_runs.execute("01_baseline", {"seeds": [0]}, tmp_path, progress_bar=False)

    def printed_by(path):
        return notebook_runs.outputs(path)[0][1][0]["text"]

    target = tmp_path / "01_baseline.ipynb"
    assert run() == target and printed_by(target) == "1\n"
    first = target.read_bytes()
    assert json.loads(first)["metadata"]["papermill"]["input_path"] \
        == "notebooks/01_baseline.ipynb"
    assert run() == target and target.read_bytes() == first
    assert list(tmp_path.iterdir()) == [target]  # no running copy left behind
    printed["text"] = "2\n"
    run()
    assert printed_by(target) == "2\n" and list(tmp_path.iterdir()) == [target]
    printed["text"] = "failed\n"
    with pytest.raises(notebook_runs.NotebookFailed, match="^ValueError: bad$") as failed:
        run()
    assert failed.value.executed == target and printed_by(target) == "failed\n"
    # the notebook itself, with its parameters, in notebooks/ (where its relative paths start)
    assert called == [(str(notebook_runs.NOTEBOOKS_DIR / "01_baseline.ipynb"), {"seeds": [0]},
                       str(notebook_runs.NOTEBOOKS_DIR), False)] * 4


def test_the_kernels_import_this_checkout_first(monkeypatch):
    """Before any other kdlib on the path (another clone's editable install), once."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/elsewhere", str(REPO_ROOT)]))
    notebook_runs.kernels_import_this_checkout()
    notebook_runs.kernels_import_this_checkout()
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/elsewhere"]
