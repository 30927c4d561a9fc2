# Corral: `make run` starts the server on the embedded default; `make test` runs every check.
# Both install what they need first (make install), and are quick when it is already there.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install system-deps run test lint typecheck test-sqlite test-postgres lock clean

AGENT := src/corral/node/agent/corral-init

install: $(STAMP) $(AGENT)

# Each sandbox's pid 1: a small static C program (reaps orphans, runs commands for the host).
$(AGENT): src/corral/node/agent/init.c
	scripts/system-deps
	gcc -O2 -static -Wall -Wextra -Werror -o $@ $<

$(STAMP): requirements.lock pyproject.toml scripts/python312
	@test -x $(VENV)/bin/python || "$$(scripts/python312)" -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Debian packages, then CRIU and crun with libcriu built from Debian trixie's sources (sandbox state; ~2 min
# the first time, cached in /opt/corral)
system-deps:
	scripts/system-deps
	scripts/build-state-tools

run: install system-deps
	$(VENV)/bin/corral serve --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck: install
	$(VENV)/bin/mypy

test-sqlite: install system-deps
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

test-postgres: install system-deps
	scripts/test-postgres $(VENV)/bin/pytest -q -p no:cacheprovider tests/integration

test: lint typecheck test-sqlite test-postgres

lock:
	rm -rf /tmp/corral-lock-venv && "$$(scripts/python312)" -m venv /tmp/corral-lock-venv
	/tmp/corral-lock-venv/bin/pip install --quiet -r requirements.in
	{ echo '# Pinned with `make lock` from requirements.in (python3.12).'; /tmp/corral-lock-venv/bin/pip freeze --all --exclude pip --exclude-editable; } > requirements.lock
	rm -rf /tmp/corral-lock-venv

clean:
	rm -rf $(VENV) build src/*.egg-info
