# serversync — every target does its own set-up on a fresh Debian machine.
#   make demo   the main job on the embedded default (SQLite) against loopback servers
#   make test   lint, types, import contracts and the whole test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv servers browser servers-stop lint typecheck contracts test unit demo bench bench-incoming bench-outgoing bench-act bench-scale clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Dovecot, Postfix and Radicale on loopback (see testservers/README.md).
servers: venv
	bash testservers/install.sh
	bash testservers/setup.sh
	bash testservers/start.sh

servers-stop:
	bash testservers/stop.sh

lint: venv
	$(BIN)/ruff check src tests bench

typecheck: venv
	$(BIN)/mypy

contracts: venv
	$(BIN)/lint-imports

# Debian's Chromium for the admin UI's Playwright tests (no browser downloads).
browser:
	bash testservers/install-browser.sh

test: lint typecheck contracts servers browser
	$(BIN)/pytest -q -p no:cacheprovider

unit: venv
	$(BIN)/pytest -q tests/unit

demo: servers
	$(BIN)/python -m serversync.demo

bench-incoming: servers
	$(BIN)/python bench/incoming.py

bench-outgoing: servers
	$(BIN)/python bench/outgoing.py

bench-act: servers
	$(BIN)/python bench/act.py

bench-scale: servers
	$(BIN)/python bench/scale.py

bench: bench-incoming bench-outgoing bench-act bench-scale

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-state
