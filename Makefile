# Two commands matter: `make up` runs the stack, `make test` runs every check. Each installs what
# it needs into .venv first (re-installing only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test lint type unit fmt test-gpu browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[cpu,client]'
	touch $@

$(VENV)/.dev-deps: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,cpu,client]'
	touch $@ $(VENV)/.run-deps

up: $(VENV)/.run-deps
	$(BIN)/switchboard up $(ARGS)

test: $(VENV)/.dev-deps lint type
	$(BIN)/pytest

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

type: $(VENV)/.dev-deps
	$(BIN)/mypy schemas services tests bench

unit: $(VENV)/.dev-deps
	$(BIN)/pytest tests/unit

fmt: $(VENV)/.dev-deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-gpu: $(VENV)/.dev-deps
	$(BIN)/pytest -m gpu tests/gpu

# Headless Chromium (Debian's package) for the /dashboard browser test; that test skips without it.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; else \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$sudo apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends chromium; \
	fi

clean:
	rm -rf $(VENV) .switchboard .mypy_cache .ruff_cache .pytest_cache
