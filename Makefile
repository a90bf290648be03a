# The two commands (README): `make run` and `make test`. Each sets everything up itself.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-deps
EXT_STAMP := $(VENV)/.stamp-ext
TORCH_SPEC := torch==2.13.0

.PHONY: run test setup ext cuda-check gpu-check clean bench

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# NOTE: torch is installed first and alone, pinned, so that nothing later resolves a CUDA build of it.
# A CPU machine of this project carries the CPU wheel in pip's find-links; elsewhere the PyTorch CPU index is used.
$(STAMP): $(VPY) pyproject.toml requirements-dev.txt
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH_SPEC) || \
	  $(VPY) -m pip install -q $(TORCH_SPEC) --index-url https://download.pytorch.org/whl/cpu
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

$(EXT_STAMP): $(STAMP) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/common/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
	MAX_JOBS=2 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(EXT_STAMP)

setup: $(EXT_STAMP)

ext: setup

run: setup
	$(VPY) -m stablelm_fast.demo

test: setup
	$(VPY) -m pytest -q -n 2 --dist loadgroup tests
	@if command -v nvcc >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check; else echo "nvcc not found: cuda-check skipped"; fi

cuda-check:
	@bash csrc/cuda/check.sh

# GPU bring-up in one command (gpu/check.sh): builds the extension for the GPU present, runs every CUDA/Triton
# kernel and the engine against the references, benchmarks; results under $$OUT (else gpu/results/). Uses the
# machine's own python (torch, triton, transformers preinstalled; no pip, no network), or this venv if made.
# On a machine without a CUDA GPU it says so and exits 0.
gpu-check:
	@PY="$(if $(wildcard $(VPY)),$(VPY),$(PY))" bash gpu/check.sh

bench: setup
	$(VPY) bench/latency.py

clean:
	rm -rf build *.egg-info stablelm_fast/_C*.so
