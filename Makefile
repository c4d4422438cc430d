# dfk8s: `make install` sets everything up on a fresh Linux machine; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PYTEST_ARGS ?=
# torch first, from the exact version whose CPU wheel is available offline; any other request pulls CUDA.
TORCH_VERSION ?= 2.13.0

.PHONY: install test lint bench images test-images kind-up kind-down kind-test clean help

help:  ## List targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)  ## Create .venv with dfk8s and every extra (torch CPU first).
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[api,gpu,kube,test]'

test:  ## Run the test suite.
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

lint:  ## ruff over the package, tests and benchmarks.
	$(BIN)/ruff check dfk8s tests bench

bench:  ## Run the CPU benchmarks and print their ratios (see bench/RESULTS.md).
	$(PY) bench/caption_api.py
	$(PY) bench/worker_overhead.py
	$(PY) bench/plan_reduce.py

clean:  ## Remove build and test leftovers (not .venv).
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache runs
