# Every target installs what it needs first; `make demo` and `make test` are all a user types.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedspeech-installed
PYTEST_ARGS ?=
export FLWR_TELEMETRY_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo test test-slow test-all docker-test lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

demo: install
	$(BIN)/fedspeech demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow --durations=15 $(PYTEST_ARGS)

# The Docker test alone (also in test-slow): makes this machine a Docker host first (root).
docker-test: install
	bash scripts/docker_host.sh
	FEDSPEECH_REQUIRE_DOCKER=1 $(BIN)/python -m pytest -m slow tests/test_docker.py $(PYTEST_ARGS)

test-all: lint typecheck
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/mfcc_speed.py
	$(BIN)/python benchmarks/synthetic_build.py
	$(BIN)/python benchmarks/transcribe_rtf.py
	$(BIN)/python benchmarks/fed_overhead.py
	$(BIN)/python benchmarks/fast_paths.py
	$(BIN)/python benchmarks/head_rounds.py
	$(BIN)/python benchmarks/pause_levels.py

clean:
	rm -rf $(VENV) .fedspeech .pytest_cache .mypy_cache .ruff_cache
