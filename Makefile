# Two commands matter: `make up` runs the stack, `make test` runs every check. Each installs what
# it needs into .venv first, from the locks in requirements/ (re-installing only when a lock
# changes); `make lock` regenerates the locks after pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch's CPU wheels: a machine without an NVIDIA GPU gets torch without GBs of CUDA libraries.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: up test lint type unit fmt test-gpu test-latest lock browser clean bench-routing bench-router

# install(VENV, LOCK): the locked pip and build backend, torch, the lock, then this project itself
# without touching its dependencies (no build isolation: the backend is the locked one).
define install
	$(1)/bin/python -m pip install -q -r requirements/build.txt
	tools/install-torch $(1)/bin/python $(2) $(TORCH_CPU_INDEX)
	$(1)/bin/python -m pip install -q -r $(2)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
endef

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: requirements/run.txt requirements/build.txt | $(BIN)/python
	$(call install,$(VENV),requirements/run.txt)
	touch $@

$(VENV)/.dev-deps: requirements/dev.txt requirements/build.txt | $(BIN)/python
	$(call install,$(VENV),requirements/dev.txt)
	touch $@ $(VENV)/.run-deps

up: $(VENV)/.run-deps
	$(BIN)/switchboard up $(ARGS)

test: $(VENV)/.dev-deps lint type
	$(BIN)/pytest

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

type: $(VENV)/.dev-deps
	$(BIN)/mypy schemas services tests bench tools

unit: $(VENV)/.dev-deps
	$(BIN)/pytest tests/unit

fmt: $(VENV)/.dev-deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-gpu: $(VENV)/.dev-deps
	$(BIN)/pytest -m gpu tests/gpu

# Re-resolve requirements/*.txt with uv after pyproject.toml changes (ARGS=--upgrade: newest
# versions everywhere). tests/unit/test_lock.py fails until the locks agree with pyproject.toml.
lock: $(VENV)/.dev-deps
	$(BIN)/python tools/lock.py $(ARGS)

# The whole suite on the newest releases pyproject allows, installed over the locks in a venv of
# its own: tells early what the next `make lock --upgrade` would break. CI does not run it.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	$(call install,.venv-latest,requirements/dev.txt)
	.venv-latest/bin/python -m pip install -q -U --upgrade-strategy eager \
	  $$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' requirements/dev.txt | grep -vx torch)
	.venv-latest/bin/python -m pip list --outdated --exclude torch || true
	.venv-latest/bin/ruff check . && .venv-latest/bin/mypy schemas services tests bench tools
	.venv-latest/bin/pytest

# The routing benchmark (bench/routing.py): one sim fleet behind Switchboard's router and the peers'
# routers (installed into .bench/peers); a markdown table per workload, .bench/routing.png.
# ARGS: its flags, e.g. ARGS="--workloads a --no-peers".
bench-routing: $(VENV)/.dev-deps
	$(BIN)/python -m bench.routing $(ARGS)

# The router data-path benchmark (bench/router.py): wrk against fixed-response nginx, direct and
# through each router (peers, Switchboard with 1 and 2 routers); installs wrk and nginx with
# apt-get when missing. ARGS: its flags, e.g. ARGS="--quick --no-peers" or ARGS="--baseline HEAD".
bench-router: $(VENV)/.dev-deps
	$(BIN)/python -m bench.router $(ARGS)

# Headless Chromium (Debian's package) for the /dashboard browser test; that test skips without it.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; else \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$sudo apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends chromium; \
	fi

clean:
	rm -rf $(VENV) .venv-latest .switchboard .mypy_cache .ruff_cache .pytest_cache
