# One verb per task; CI runs the same verbs (.ci/run -> make install test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, so that nothing pulls a build you did not choose. The default is the CPU build this project's
# machines carry; on a CUDA host use e.g. TORCH="torch==2.11.0" (PyPI's Linux wheels are CUDA builds).
TORCH  ?= torch==2.13.0
MODEL  ?= builtin/tiny-sd
PORT   ?= 8000

.PHONY: install serve test test-fast lint format bench clean

install: $(BIN)/diffusers-api

$(BIN)/diffusers-api: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

serve: install
	$(BIN)/diffusers-api serve --model $(MODEL) --port $(PORT)

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest tests/unit

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: install
	$(BIN)/python bench/cpu_batching.py --out bench/results/cpu.jsonl
	$(BIN)/python bench/archive_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
