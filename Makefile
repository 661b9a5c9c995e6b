# The two commands of the README: `make demo` and `make test`. Both are idempotent and set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-long soak lint ruff mypy imports bench clean

LINT_PATHS := core jobs orchestrator tracking serving tests benchmarks infra
# Lint and type errors fail `make test` and `make test-fast`; STRICT_LINT=0 only prints them (while editing).
STRICT_LINT ?= 1

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh scripts/install_vllm.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash scripts/install_torch.sh $(PY)
	bash scripts/install_vllm.sh $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m orchestrator.demo

# Every tier (tests/conftest.py refuses a test without exactly one of unit, integration, cluster; gpu tests skip
# without CUDA), after ruff, mypy and the import contracts, printing the 25 slowest; the 10-minute soak has its own
# target.
test: setup
	bash scripts/install_test_system_packages.sh
	$(MAKE) --no-print-directory lint || [ "$(STRICT_LINT)" != 1 ]
	$(PY) -m pytest -q -m "not soak and not long" --durations=25

# Costly variants of what `make test` covers (marker `long`), kept out of CI's 30 minutes.
test-long: setup
	$(PY) -m pytest -q -m long

# 10 minutes of mixed load against a real Serve app (LORALAND_SOAK_S shortens it); prints leak figures.
soak: setup
	$(PY) -m pytest -q -s -m soak tests/test_serving_faults.py

# The unit tier (under 3 minutes on 2 cores) and ruff.
test-fast: setup
	$(MAKE) --no-print-directory ruff || [ "$(STRICT_LINT)" != 1 ]
	$(PY) -m pytest -q -m unit

# ruff (rules in pyproject.toml), mypy (files in pyproject.toml) and the import contracts (also run by the tests).
lint: setup
	$(MAKE) --no-print-directory -k ruff mypy imports

ruff: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)

mypy: setup
	$(VENV)/bin/mypy

imports: setup
	$(VENV)/bin/lint-imports --no-cache --no-logo

bench: setup
	$(PY) -m benchmarks.train_throughput --out benchmarks/results/train_throughput.json

clean:
	rm -rf $(VENV) .loraland
