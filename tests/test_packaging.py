"""The project's set-up files agree with each other."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(spec: str) -> str:
    return re.split(r"[<>=!\[ ]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {s for s in pip_section if not s.startswith("-e")}
    assert listed == wanted, \
        f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    assert "-e .[dev]" in pip_section


def test_torch_pair_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make run" in (ROOT / "README.md").read_text()


def test_only_ci_mentions_the_shared_folder():
    offenders = []
    for path in ROOT.rglob("*"):
        if any(part in {".venv", ".git", "results", "data", "__pycache__"}
               for part in path.relative_to(ROOT).parts):
            continue
        if path.is_file() and path.suffix in {".py", ".ipynb", ".md", ".toml", ".yml", ""} \
                and path != ROOT / ".ci" / "run" and path != Path(__file__):
            if "../shared" in path.read_text(errors="ignore"):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_notebook_pairs_in_sync():
    import jupytext

    for py in sorted((ROOT / "notebooks").glob("[0-9]*.py")):
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{py.name} has no paired .ipynb"
        a = [c.source for c in jupytext.read(py).cells]
        b = [c.source for c in jupytext.read(ipynb).cells]
        assert a == b, f"{py.name} and {ipynb.name} differ: run `make sync`"


def test_notebooks_are_thin():
    for py in sorted((ROOT / "notebooks").glob("[0-9]*.py")):
        text = py.read_text()
        assert not re.search(r"^\s*(def|class) ", text, re.M), \
            f"{py.name} defines logic: move it to kdlib"
        assert 'tags=["parameters"]' in text


def test_python_lines_fit_100_columns():
    """The project's width (side-by-side diffs, review): kdlib/ and tests/ hold to it; the
    notebooks' markdown tables may not wrap."""
    long = [f"{path.relative_to(ROOT)}:{i}" for folder in ("kdlib", "tests")
            for path in sorted((ROOT / folder).rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
    assert long == []
