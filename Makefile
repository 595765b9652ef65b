# agentmesh: `make up` runs the mesh, `make test` runs every check. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
SETUP := $(VENV)/.installed
BENCH_SETUP := $(VENV)/.installed-bench
PYTEST_ARGS ?=

.PHONY: up test lint protos bench setup clean lock

## up: run the embedded mesh (SQLite, in-process bus, Envoy as a child) on :8080
up: $(SETUP)
	$(VENV)/bin/agentmesh up

## test: lint, then the whole test suite against a real Envoy, PostgreSQL and Redis
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: ruff, mypy, buf lint, generated/ freshness, envoy.yaml validation
lint: $(SETUP) $(BUF)
	$(VENV)/bin/ruff check servers gateway tests bench scripts
	$(VENV)/bin/ruff format --check servers gateway tests bench scripts
	$(VENV)/bin/mypy
	$(PY) scripts/genprotos.py --check
	$(BUF) lint
	$(VENV)/bin/agentmesh envoy-config --validate

## protos: regenerate generated/ (Python stubs and Envoy's descriptor set) from protos/
protos: $(SETUP) $(BUF)
	$(PY) scripts/genprotos.py
	$(BUF) lint

## bench: the benchmarks of bench/, each against its baseline in the same run
bench: $(BENCH_SETUP)
	@command -v wrk >/dev/null || echo "note: without wrk (apt-get install wrk) REST cases use a slower Python client"
	$(PY) -m bench.run

setup: $(SETUP) $(BUF)

$(SETUP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# The bench extra (Celery, the baseline of bench/dispatch.py) on top of the dev install.
$(BENCH_SETUP): $(SETUP) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $@

$(BUF): package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

## lock: refresh constraints.txt from the current virtualenv
lock: $(SETUP)
	{ echo '# Versions CI and `make` install; regenerate with `make lock` after changing pyproject.toml.'; \
	  $(PY) -m pip freeze --exclude-editable; } > constraints.txt

clean:
	rm -rf $(VENV) node_modules build .pytest_cache .mypy_cache .ruff_cache
