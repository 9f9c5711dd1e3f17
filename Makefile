# The two commands of the README. Both build .venv from nothing (only Python and pip needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install (numpy, numba, sentencepiece) and the main job on the bundled tiny checkpoint.
demo: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/python -m minigemma.demo

# torch first, from its pinned CPU build, so that transformers does not pull a CUDA build.
test: $(BIN)/python
	$(BIN)/pip install -q torch==$$(sed -n 's/^torch==//p' requirements-test.txt)
	$(BIN)/pip install -q -e . -r requirements-test.txt
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Everything but the full-size (true 2B shape) tests.
test-fast: $(BIN)/python
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
