# One entry point for people and CI. `make test` installs what it needs from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
EXTRAS ?= router,inference,trainer,monitor,launcher,dev
PYTEST_ARGS ?=

.PHONY: setup test lint format protos protos-check bench demo up clean help

help:
	@echo "make setup   virtual environment .venv with every dependency (idempotent)"
	@echo "make test    protos check + the test suite (installs first when needed)"
	@echo "make lint    ruff check, ruff format --check, mypy --strict"
	@echo "make protos  regenerate Python stubs from protos/"
	@echo "make demo    the closed loop end to end (5-11 min here); report in .loopline/demo/"
	@echo "make up      the whole stack on this machine (loopline up) until Ctrl-C"
	@echo "make bench   worker, router and language benchmarks; figures in bench/results/"
	@echo "             (BENCH_ARGS=--package DIR for the worker, BENCH_ROUTER_ARGS for the router)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# The CPU build of torch first: with it in place nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

protos: setup
	PYTHON=$(PY) scripts/protos.sh

protos-check: setup
	PYTHON=$(PY) scripts/protos.sh --check

# tests/unit/test_compose.py checks docker-compose*.yml with `docker-compose config` (no engine).
.PHONY: compose-tool
compose-tool:
	scripts/ensure_compose.sh

test: setup protos-check compose-tool
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# BENCH_ARGS go to bench.inference (e.g. --package DIR), BENCH_ROUTER_ARGS to bench.router.
BENCH_ARGS ?=
BENCH_ROUTER_ARGS ?=
BENCH_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bench: setup
	$(BENCH_ENV) $(PY) -m bench.inference $(BENCH_ARGS)
	$(BENCH_ENV) $(PY) -m bench.router $(BENCH_ROUTER_ARGS)
	$(BENCH_ENV) $(PY) -m bench.experiments
	$(BENCH_ENV) $(PY) -m bench.language
	$(BENCH_ENV) $(PY) -m bench.monitor

# The closed loop end to end on embedded defaults (DEMO_ARGS=--profile quick for a short run);
# the report is written to .loopline/demo/report.html.
DEMO_ARGS ?=
demo: setup
	$(BENCH_ENV) $(VENV)/bin/loopline demo $(DEMO_ARGS)

# The whole stack on this machine until Ctrl-C (settings: LOOPLINE_UP_*, docs/operations.md).
up: setup
	$(VENV)/bin/loopline up

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .ruff_cache .pytest_cache
