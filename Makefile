# Every target creates/reuses .venv on its own. PRESET=smoke for a seconds-long run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= quick
ARGS ?=
# Data: $KDLIB_DATA if set, else ./data (downloaded there on first use).
export KDLIB_DATA ?= $(CURDIR)/data

.PHONY: run test bench lab tb sync clean-smoke

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

run: $(VENV)/.installed  ## the workbook end to end: notebooks 01-04 with papermill
	$(PY) -m kdlib run --preset $(PRESET) $(ARGS)

test: $(VENV)/.installed  ## the whole test suite (unit, papermill smoke, nbval)
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.installed  ## training throughput -> results/bench/<host>-<processor>.json
	$(PY) -m kdlib bench $(ARGS)

lab: $(VENV)/.installed  ## JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks/

tb: $(VENV)/.installed  ## TensorBoard on every run's live curves (results/<preset>/tb/<run_id>)
	$(VENV)/bin/tensorboard --logdir results/ $(ARGS)

sync: $(VENV)/.installed  ## re-pair notebooks/*.py with their .ipynb after editing either
	$(VENV)/bin/jupytext --sync notebooks/[0-9]*.py

clean-smoke:  ## forget smoke-preset results
	rm -rf results/smoke
