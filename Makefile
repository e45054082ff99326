# One entry point: `make demo` runs the real thing on a local broker, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 9092

.PHONY: setup demo test test-all broker-start broker-stop model bench chaos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

broker-start: setup
	$(BIN)/fraud-worker broker start --port $(PORT)

broker-stop: setup
	$(BIN)/fraud-worker broker stop --port $(PORT)

demo: broker-start
	FRAUD_BOOTSTRAP_SERVERS=127.0.0.1:$(PORT) $(BIN)/fraud-worker demo

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest --run-slow

model: setup
	$(BIN)/python models/train.py

bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
