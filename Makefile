# Set-up is two commands on a fresh machine: `make demo` and `make test` (each creates .venv if needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build available offline here; the project itself accepts torch>=2.6.
TORCH ?= torch==2.13.0
EXTRAS ?= test,onnx,openvino,coreml,tensorrt,bench
DEMO_OUT ?= diffship-demo
PYTEST_ARGS ?=

.PHONY: venv demo test clean

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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
