# Two commands (see README):  make tutorial   |   make test
# Both create (or reuse) the local environment .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.finer1-installed
PROFILE ?= cpu
export HF_HUB_OFFLINE = 1
export HF_HUB_DISABLE_PROGRESS_BARS = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: tutorial test env pretrain clean-runs

env: $(STAMP)

# torch first, pinned to the CPU wheel: pip must never resolve a bare `torch` (multi-GB CUDA build).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The main job: every notebook on the micro world -> figures/ and figures/results.md
tutorial: $(STAMP)
	$(BIN)/python -m finer1_lib tutorial --profile $(PROFILE)

# The tests: library tests + every notebook under nbval, in the smoke profile
test: $(STAMP)
	FINER1_PROFILE=smoke $(BIN)/python -m pytest -q -p no:cacheprovider tests --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks

# Rebuild the shipped base model (data/base_model); see README for its run time
pretrain: $(STAMP)
	$(BIN)/python -m finer1_lib pretrain --profile cpu --ship

clean-runs:
	rm -rf data/runs
