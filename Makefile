# One verb per task; CI runs the same verbs (.ci/run -> make install test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, so that nothing pulls a build you did not choose. The default is the CPU build this project's
# machines carry; on a CUDA host use e.g. TORCH=torch==2.11.0 (PyPI's Linux wheels are CUDA builds).
# TORCH_INDEX is where it comes from. Left empty: a wheel this machine carries (pip's find-links), else PyPI
# where `nvidia-smi` is present, else PyTorch's CPU index, so that a machine without a GPU does not download
# PyPI's CUDA build and its several GB of CUDA libraries. A changed TORCH or TORCH_INDEX reinstalls torch.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
CPU_INDEX   := https://download.pytorch.org/whl/cpu
MODEL  ?= builtin/tiny-sd
PORT   ?= 8000

# One stamp per torch choice, named after it: a new choice has no stamp yet, so its rule runs.
TORCH_STAMP := $(VENV)/.torch-$(subst /,_,$(subst :,_,$(subst =,_,$(TORCH)$(if $(TORCH_INDEX),@$(TORCH_INDEX)))))
# Evaluated only when torch is being installed (each is a few hundred ms).
local_torch = $(shell $(BIN)/python -m pip install --dry-run --quiet --no-index --no-deps --ignore-installed \
              "$(TORCH)" >/dev/null 2>&1 && echo yes)
nvidia_gpu  = $(shell command -v nvidia-smi)
torch_index = $(or $(TORCH_INDEX),$(if $(local_torch)$(nvidia_gpu),,$(CPU_INDEX)))

.PHONY: install serve test test-fast lint format bench lock clean

install: $(BIN)/diffusers-api

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Another choice installed before is removed first: pip would keep a build that satisfies the version (a CPU
# torch==2.11.0 for a CUDA one).
$(TORCH_STAMP): | $(BIN)/python
	@if ls $(VENV)/.torch-* >/dev/null 2>&1; then \
		echo "torch: replacing the build installed before"; \
		$(BIN)/python -m pip uninstall --quiet --yes torch; rm -f $(VENV)/.torch-*; fi
	$(BIN)/python -m pip install --quiet $(addprefix --index-url ,$(torch_index)) "$(TORCH)"
	@touch $@

# spandrel (the upscale extra) without its dependencies: it requires torchvision, which would pull its own torch
# (models/upscalers.py says why spandrel works without it); its other dependency, einops, comes with [dev].
$(BIN)/diffusers-api: pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "spandrel>=0.4.2"
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

# requirements.lock: the exact packages (with their hashes) the Docker image installs, for Linux x86-64 and
# Python 3.11: the package with its runpod and upscale extras (the upscale extra's torchvision is the build of the
# locked torch: each torchvision release requires one torch version), torch held to docker/lock-constraints.txt. uv resolves it
# from PyPI's metadata alone: nothing is downloaded or installed. It keeps the versions already in the lock that
# still fit; `make lock LOCK_ARGS=--upgrade` takes the newest.
LOCK_ARGS ?=
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "uv>=0.5"
	$(BIN)/uv pip compile pyproject.toml --extra runpod --extra upscale --constraint docker/lock-constraints.txt \
		--python-platform x86_64-manylinux_2_28 --python-version 3.11 --only-binary :all: --generate-hashes \
		--custom-compile-command "make lock" --output-file requirements.lock --quiet $(LOCK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
