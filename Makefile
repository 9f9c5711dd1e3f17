# The two commands of the README. Both build .venv from nothing (only Python and pip needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install (numpy, numba, sentencepiece) and the main job, `minigemma generate`, on the
# bundled tiny checkpoint. Its weights are seeded random numbers: the text is babble by design.
demo: $(BIN)/python
	$(BIN)/pip install -q -e .
	@echo "Babble from a tiny RANDOM model (examples/tiny-gemma: 100K random weights, 512-piece tokenizer)."
	@echo "It shows the whole pipeline running, not Gemma's answers: see README 'Getting the real weights'."
	$(BIN)/minigemma generate --weights examples/tiny-gemma --max-new-tokens 32 "Gemma is"

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
