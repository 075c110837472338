# Two commands on a fresh machine:
#   make demo   set up .venv and run the built-in demo
#   make test   set up .venv (with the torch reference) and run the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow setup setup-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e .

setup-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

demo: setup
	$(BIN)/mlxclip finetune

test: setup-dev
	$(BIN)/pytest -q

test-slow: setup-dev
	$(BIN)/pytest -q -m slow

bench: setup-dev
	$(BIN)/python -m benchmarks.blas

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
