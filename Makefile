# Two commands do everything on a fresh machine:
#   make reproduce   set up .venv, restore the data, run the whole DVC pipeline (offline, CPU)
#   make test        set up .venv, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline model hubs fail fast; torch must not spin-wait on a shared CPU.
export HF_HUB_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install reproduce test lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# Keep notebook outputs out of git (cell tags such as `parameters` are kept).
	-git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install
	touch $(STAMP)

reproduce: install
	# The images and the trained miniature come from the DVC remote inside the repository.
	$(BIN)/dvc pull --quiet data.dvc
	$(BIN)/dvc pull --quiet editor || echo "note: no cached editor for these parameters; the editor stage will train it"
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean-venv:
	rm -rf $(VENV)
