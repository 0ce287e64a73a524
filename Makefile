# Two entry points for users: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AZURITE_DIR := .azurite
AZURITE := $(AZURITE_DIR)/node_modules/azurite/dist/src/blob/main.js
DEMO_DIR ?= outputs/demo
# Tests never reach the real Hub: point it at a dead local port. One intra-op thread per process: two test workers
# share the cores, and an OpenMP team of 2 on a core that is busy spins (a 2-thread run became 20x slower so).
TEST_ENV := HF_ENDPOINT=http://127.0.0.1:9 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

.PHONY: install demo test test-fast lint azurite clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" ; test $${PIPESTATUS[0]} -eq 0
	touch $(STAMP)

azurite: $(AZURITE)

$(AZURITE):
	mkdir -p $(AZURITE_DIR)
	npm install --prefix $(AZURITE_DIR) --no-audit --no-fund --silent azurite@3

demo: install
	@bash recipes/demo.sh $(DEMO_DIR)

# Two workers, a test file per worker at a time (--dist loadfile: a module's fixtures are built once).
test: install azurite
	$(TEST_ENV) $(BIN)/python -m pytest tests -n 2 --dist loadfile --durations=25

test-fast: install
	$(TEST_ENV) $(BIN)/python -m pytest tests -m "not slow"

lint: install
	$(BIN)/ruff check hf_medvis recipes tests benchmarks
	$(BIN)/ruff format --check hf_medvis recipes tests benchmarks

clean:
	rm -rf $(VENV) $(AZURITE_DIR) outputs
