# Two commands matter: `make run` and `make test`. Both build the virtualenv
# on first use, so they work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint venv clean bench bench-quick cluster config-doc fuzz

# torch first and pinned: 2.13.0 resolves to the local CPU wheel, so the
# extras after it (torch, and s3torchconnector which needs it) find it
# installed instead of pulling a multi-GB CUDA build.
$(BIN)/nearstore: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench,torch]'
	touch $@

venv: $(BIN)/nearstore

run: venv
	$(BIN)/nearstore serve

cluster: venv
	$(BIN)/nearstore cluster --nodes 3

lint: venv
	$(BIN)/ruff check nearstore gateway cache metadata clients bench tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# Coverage-guided fuzzing of the request front door (tests/fuzz/front_door.py,
# atheris) for SECONDS seconds: the corpus grows in build/fuzz/corpus across
# runs, each crash is written as build/fuzz/crash-<sha1> (replay one with
# `$(BIN)/python -m tests.fuzz build/fuzz/crash-<sha1>`).
SECONDS ?= 600
fuzz: venv
	mkdir -p build/fuzz/corpus
	NEARSTORE_FUZZ_DATA=build/fuzz/node $(BIN)/python -m tests.fuzz -max_total_time=$(SECONDS) -timeout=30 \
		-print_final_stats=1 -artifact_prefix=build/fuzz/ build/fuzz/corpus

bench-quick: venv
	$(BIN)/nearstore bench --quick

bench: venv
	$(BIN)/nearstore bench

clean:
	rm -rf $(VENV) nearstore-data .pytest_cache .mypy_cache .ruff_cache

config-doc: venv
	$(BIN)/python -m nearstore.gateway.config > docs/CONFIG.md
