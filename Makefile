# The README's quick start: `make demo` and `make test` set up what they need, then run.
# Idempotent: the virtual environment is created once, and `pip install` runs again only when
# pyproject.toml or constraints.txt is newer than the last successful install ($(VENV)/.installed).
#
#   make demo                        # creates .venv if missing, installs if needed, runs `deadscan demo`
#   make demo ARGS=--lm              # extra arguments for `deadscan demo`
#   make test                        # same setup + Debian's chromium if missing, then pytest
#   make test PYTEST_ARGS='-k strip' # extra arguments for pytest
#   make test VENV=/tmp/other-venv   # any other environment (CI uses a fresh one)
#   make install                     # only the setup

VENV ?= .venv
PYTHON ?= python3
ARGS ?=
PYTEST_ARGS ?=
# 1: fail when chromium is missing and cannot be installed (CI); otherwise the browser tests skip.
REQUIRE_CHROMIUM ?= 0

STAMP := $(VENV)/.installed

.PHONY: demo test install chromium

demo: $(STAMP)
	$(VENV)/bin/deadscan demo $(ARGS)

test: $(STAMP) chromium
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || { echo "$(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/python -m pip install -c constraints.txt -e '.[test]'
	@touch $@

# Headless Chromium for tests/test_browser.py: Debian's package (Playwright's own browser
# downloads are never used). Skipped when /usr/bin/chromium is already there.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	    if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	    elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	    else sudo="none"; fi; \
	    if [ "$$sudo" != none ] && $$sudo apt-get update && $$sudo apt-get install -y chromium; then :; \
	    elif [ "$(REQUIRE_CHROMIUM)" = 1 ]; then \
	        echo "chromium: /usr/bin/chromium missing and could not be installed" >&2; exit 1; \
	    else \
	        echo "chromium: not installed (needs root or sudo); the browser tests will be skipped" >&2; \
	    fi; \
	fi
