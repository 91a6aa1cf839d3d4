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

# The demo stack serves Prometheus /metrics (edge 9464, billing 9469, workers from 9470) unless the
# environment says otherwise (0: off). `tollgate up` alone takes them from the settings (off by default).
up: $(STAMP)
	TOLLGATE_EDGE_METRICS_PORT=$${TOLLGATE_EDGE_METRICS_PORT-9464} \
	TOLLGATE_METER_METRICS_PORT=$${TOLLGATE_METER_METRICS_PORT-9469} \
	TOLLGATE_WORKER_METRICS_PORT=$${TOLLGATE_WORKER_METRICS_PORT-9470} \
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
