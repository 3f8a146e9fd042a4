# Two commands do everything on a fresh machine:
#   make reproduce   set up .venv, restore the data, run the whole DVC pipeline (offline, CPU)
#   make test        set up .venv, run the fast test tier (make test-all: every test, as CI does)
# With internet (weights) and, for the paper's settings, a GPU:
#   make weights            fetch the default weights into models/ (big-lama, clip-vit-b-32, lpips-alex)
#   make reproduce-real     Big-LaMa at 256 px on N=6 embedded images (GPU if any, else CPU)
#   make reproduce-paper    512 px, expansion kernel 17, all images, GPU (EDITOR=mat|sd-inpainting)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline model hubs fail fast; torch must not spin-wait on a shared CPU.
export HF_HUB_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install reproduce test test-all lint clean-venv stability weights reproduce-real reproduce-paper docs

install: $(STAMP)

# The stamp holds pyproject.toml's sha256, not a time: installation runs when the venv has no
# python or the hash differs (a fresh clone sharing an installed VENV=... has a newer
# pyproject.toml, not another one).
PYPROJECT_SHA := $(firstword $(shell sha256sum pyproject.toml 2>/dev/null || shasum -a 256 pyproject.toml 2>/dev/null))
INSTALLED := $(and $(wildcard $(BIN)/python),$(PYPROJECT_SHA),$(filter $(PYPROJECT_SHA),$(shell cat $(STAMP) 2>/dev/null)))
.PHONY: pyproject-changed
pyproject-changed:
$(STAMP): $(if $(INSTALLED),,pyproject-changed)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,mat,demo,docs]'
	# Keep notebook outputs out of git (cell tags such as `parameters` are kept).
	-git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install
	# Papermill's kernels: no "running over TCP without encryption" notice on every stage (a
	# local kernel's transport is not the user's to change); code warnings still show.
	mkdir -p $(VENV)/etc/ipython
	echo '{"IPKernelApp": {"log_level": "ERROR"}}' > $(VENV)/etc/ipython/ipython_kernel_config.json
	echo $(PYPROJECT_SHA) > $(STAMP)

reproduce: install
	# The images and the trained miniature come from the DVC remote inside the repository.
	$(BIN)/dvc pull --quiet data.dvc
	$(BIN)/dvc pull --quiet editor || echo "note: no cached editor for these parameters; the editor stage will train it"
	$(BIN)/dvc repro

# Real-model runs: the same pipeline in runs/<preset>/ (git-ignored) with params/<preset>.yaml
# laid over params.yaml; the embedded default's reports/ is never written. WEIGHTS=PATH and
# CLIP=PATH|none override the files from `make weights`; they are checked before anything runs.
N ?= 6
EDITOR ?= lama
RUN_ARGS = $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(CLIP),--clip $(CLIP))

weights: install
	# The default set: big-lama (TorchScript, 206 MB, Apache-2.0), clip-vit-b-32 (CLIP-FID,
	# about 600 MB, MIT) and lpips-alex (LPIPS's AlexNet, 233 MB, BSD-3-Clause);
	# `runtime-backdoor weights list` shows the others, `weights fetch NAME` gets them.
	HF_HUB_OFFLINE=0 $(BIN)/runtime-backdoor weights fetch big-lama clip-vit-b-32 lpips-alex

reproduce-real: install
	$(BIN)/python -m runtime_backdoor.runs real --n $(N) $(RUN_ARGS)

reproduce-paper: install
	$(BIN)/python -m runtime_backdoor.runs paper --editor $(EDITOR) $(RUN_ARGS) $(if $(filter 1,$(FORCE)),--force)

# The fast tier (a few minutes): every test not marked slow; the 15 slowest are listed.
# tests/README.md: the tiers, their times, how to run one stage's or one folder's tests.
test: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

# Every tier: adds the notebooks end to end, dvc repro, the browser, multi-process and subprocess
# tests (about half an hour on 2 cores). .ci/run calls this.
test-all: install
	$(BIN)/python -m pytest -q --durations=15

# The pipeline twice more in scratch copies (MKL_CBWR=COMPATIBLE; implant.seed + 1), compared
# with the committed reports: reports/stability.md. About twice `make reproduce`'s time.
stability: install
	$(BIN)/dvc pull --quiet data.dvc
	$(BIN)/python benchmarks/stability.py

# The study book (docs/about.md): docs/*.md, the tutorial and the executed stage notebooks of
# reports/notebooks/ (it runs no stage: `make reproduce` first) -> _build/html/index.html, offline.
docs: install
	$(BIN)/python docs/build.py

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean-venv:
	rm -rf $(VENV)
