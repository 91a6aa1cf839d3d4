# `make up` and `make test` create or refresh .venv themselves; both are no-ops to set up the second time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: up test bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/tollgate up

test: $(STAMP)
	# Real speech for the speech-to-text tests comes from Debian's espeak-ng.
	@command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null)
	# The console's test (tests/test_console.py) drives Debian's chromium: Playwright cannot download its own here.
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/hot_path.py

clean:
	rm -rf .tollgate
