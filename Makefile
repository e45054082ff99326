# One entry point: `make demo` runs the real thing on a local broker, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 9092

REGISTRY_PORT ?= 8081

.PHONY: setup demo demo-registry test test-all broker-start broker-stop model bench chaos clean

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
	@echo "The broker on 127.0.0.1:$(PORT) keeps running for the next demo; 'make broker-stop PORT=$(PORT)' stops it."

# The same demo with a local Schema Registry (Apicurio): input and verdicts in the Confluent wire format.
demo-registry: broker-start
	$(BIN)/fraud-worker registry start --port $(REGISTRY_PORT)
	FRAUD_BOOTSTRAP_SERVERS=127.0.0.1:$(PORT) FRAUD_SCHEMA_REGISTRY_URL=http://127.0.0.1:$(REGISTRY_PORT)/apis/ccompat/v7 \
	  $(BIN)/fraud-worker demo

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest --run-slow

model: setup
	$(BIN)/python models/train.py

bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache bench/java/target
