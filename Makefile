PYTHON ?= python3

.PHONY: install demo test bench

install:
	bash scripts/install.sh

demo: install
	swarmlm demo

test: install
	$(PYTHON) -m pytest -x -q tests

bench:
	$(PYTHON) benchmarks/bench_generation.py
