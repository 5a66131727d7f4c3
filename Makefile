# Set-up is two commands on a fresh machine: `make demo` and `make test` (each creates .venv if needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build available offline here; the project itself accepts torch>=2.6.
TORCH ?= torch==2.13.0
EXTRAS ?= test,onnx,openvino,coreml,tensorrt,bench
DEMO_OUT ?= diffship-demo
PYTEST_ARGS ?=
# Two test workers (pytest-xdist), each module on one worker so its module fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-gpu clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: venv
	$(BIN)/diffship demo --out $(DEMO_OUT)

test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Where an NVIDIA GPU is: the GPU tests (engines run, parity, profiles, CUDA graphs, runtime caches) in their own
# venv with a CUDA build of torch and standard TensorRT beside TensorRT-RTX (the CPU venv would skip them).
GPU_VENV ?= .venv-gpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cu128

test-gpu:
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet "$(TORCH)" --index-url $(TORCH_INDEX)
	$(GPU_VENV)/bin/python -m pip install --quiet -e ".[test,tensorrt]" tensorrt --extra-index-url https://pypi.nvidia.com
	$(GPU_VENV)/bin/python -m pytest -m "gpu or tensorrt" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
