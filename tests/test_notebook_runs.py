"""Running the notebooks with papermill: an executed copy is replaced only when a result
changed, and reads the same in every clone."""
import json
import subprocess

import nbformat

from kdlib import notebook_runs
from kdlib.checkout import REPO_ROOT


def test_executed_notebook_is_replaced_only_when_its_outputs_change(tmp_path):
    def notebook(path, text, when):
        cell = {"cell_type": "code", "source": "print(1)",
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
    assert notebook_runs.outputs(tmp_path / "missing.ipynb") is None


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
