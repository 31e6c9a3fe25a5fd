PYTHON ?= python3
# unbuffered: logs show output in the order it happened (pytest's summary before any late traceback)
export PYTHONUNBUFFERED=1

.PHONY: install demo test bench

install:
	bash scripts/install.sh

demo: install
	swarmlm demo

test: install
	$(PYTHON) -m pytest -x -q tests

bench:
	$(PYTHON) benchmarks/bench_generation.py
