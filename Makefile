# AIQ developer commands. Needs GNU make and Python 3.11+; everything else goes into $(VENV).
#   make dev    run the whole service (embedded PostgreSQL/Redis and LLM simulator when unset)
#   make test   lint, type-check and run the test suite
# Variables: VENV (default .venv), PYTHON (interpreter that creates the venv), DEV_ARGS, PYTEST_ARGS,
# PYTEST_WORKERS (pytest-xdist processes for `make test`, default 2; 0 runs the suite in one process).

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Recreated when pyproject.toml changes, so `git pull && make test` picks up new dependencies.
STAMP := $(VENV)/.aiq-installed
DEV_ARGS ?=
PYTEST_ARGS ?=
# Most of the suite waits on its servers rather than computing, so two processes finish in about half the
# time even on a two-core machine. Each has its own session fixtures: stack, databases, queue name.
PYTEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install dev test lint fmt bench bench-quick chaos tools clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "AIQ needs Python 3.11+; run e.g. 'make PYTHON=python3.12 $(MAKECMDGOALS)'" >&2; exit 1; }
	@# Debian/Ubuntu ship venv (ensurepip) separately: say so instead of a bare traceback.
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV) || \
		{ echo "could not create $(VENV); on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## create the virtualenv (.venv, or VENV=...) and install AIQ with its dev dependencies

dev: $(STAMP) ## API, worker, Flower, LLM simulator, embedded servers, all on 127.0.0.1 (DEV_ARGS=--monitoring adds Prometheus; Ctrl-C stops)
	$(BIN)/aiq dev $(DEV_ARGS)

test: tools $(STAMP) ## ruff, mypy, then the whole test suite (alembic check and a chaos smoke run included)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy only
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP) ## format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## full benchmark, 20-25 minutes (writes bench/results/)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP) ## short benchmark for a smoke check, 5-8 minutes
	$(BIN)/python -m bench.run --quick

chaos: $(STAMP) ## fault-injection run (kills, restarts, LLM faults) on its own servers, 6-8 minutes
	$(BIN)/python -m bench.chaos.run

# Best effort: the ops tests use docker-compose (config validation) and promtool, the /docs browser test
# chromium and chromedriver, when present and skip otherwise, so a failed install must not fail the build. Only root on apt systems tries.
tools: ## install docker-compose, prometheus (promtool), chromium and chromedriver via apt when root and missing
	@missing=""; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "tools: missing$$missing (not root or no apt-get); the tests that need them will skip"; exit 0; fi; \
	echo "tools: installing$$missing (best effort)"; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } || \
		echo "tools: could not install$$missing; the tests that need them will skip"

clean: ## remove caches and build output (keeps .venv and the .aiq/ data)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## also remove .venv and the embedded servers' data in .aiq/ (stop `make dev` first)
	rm -rf $(VENV) .aiq
