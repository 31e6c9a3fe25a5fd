# Everything runs in a virtual environment of its own ($(VENV), created from nothing by the first target
# that needs it), holding the tested set of requirements.lock. `make demo VENV=path` uses another one.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# unbuffered: logs show output in the order it happened (pytest's summary before any late traceback)
export PYTHONUNBUFFERED=1

.PHONY: install test-deps demo test bench canary lock

# re-installs when the lock, the project's metadata or the install script change
$(VENV)/.installed: requirements.lock pyproject.toml scripts/install.sh scripts/torch-version
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PYTHON=$(BIN)/python bash scripts/install.sh
	touch $@

install: $(VENV)/.installed

# system packages only the tests need (a headless browser for the health page test)
test-deps:
	bash scripts/install-test-deps.sh

demo: install
	$(BIN)/swarmlm demo

test: install test-deps
	$(BIN)/python -m pytest -x -q tests

bench: install
	$(BIN)/python benchmarks/bench_generation.py

# the newest releases pyproject.toml allows, in a fresh venv of their own, against a short exactness smoke
canary:
	bash scripts/canary.sh

lock:
	bash scripts/lock.sh
