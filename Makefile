# sc2quant: everything a developer or CI runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: install install-gpu test lint embedded-model calib-data bench clean

install:  ## create .venv and install sc2quant with CPU dependencies (torch pinned, nothing from a model hub)
	$(PY) -m venv $(VENV)
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e ".[cpu,dev,bench]"

install-gpu:  ## the same with the CUDA builds of ONNX Runtime
	$(PY) -m venv $(VENV)
	$(PIP) -q -e ".[gpu,dev,bench]"

test:  ## lint, then the whole test suite (slow tests included); first the CPU kind and compute mode
	$(BIN)/sc2quant --version
	$(BIN)/ruff check sc2quant tests bench tools
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check sc2quant tests bench tools

embedded-model:  ## retrain the embedded model (about 50 minutes on 2 cores)
	$(BIN)/python -m tools.train_embedded --force

calib-data:  ## rebuild calib_data/ from the machine's permissively licensed sources
	$(BIN)/python -m tools.build_calib_data

bench:  ## sc2quant vs llama.cpp and transformers (~45 min on 2 cores the first time; needs cmake and a C++ compiler)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf .pytest_cache build dist *.egg-info
