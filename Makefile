# The README's two commands. Both install what they need first (Debian packages, .venv).
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: demo test test-py313 test-fast lint bootstrap bench clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	@$(PY) -m vmwebd.demo

test: bootstrap
	@$(PY) -m pytest $(PYTEST_ARGS)

# The fast tier (everything not marked slow) on Python 3.13, in its own virtualenv .venv-3.13,
# from pyenv or PATH (scripts/find-python.sh).
test-py313: bootstrap
	@py=$$(scripts/find-python.sh 3.13) && VENV=.venv-3.13 PYTHON=$$py bash scripts/bootstrap.sh
	@.venv-3.13/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The in-process tier: no real processes, real hosts or browsers, and not the property tests of
# seconds each (see the markers in tests/conftest.py and pyproject.toml); `make test` runs them.
# One worker per core (pytest-xdist): each is its own process with its own reactor; ports are
# bound as port 0 or reserved under a lock (tests/procs.py), so workers never collide.
test-fast: bootstrap
	@$(PY) -m pytest -m "not slow and not process and not realhost and not property" -q -n auto $(PYTEST_ARGS)

# The static gates: ruff, mypy --strict on the pure cores, import-linter's contracts (pyproject.toml).
lint: bootstrap
	@bash scripts/lint.sh

bench: bootstrap
	@$(PY) bench/provision.py
	@$(PY) bench/soap.py
	@$(PY) bench/gossip_sim.py
	@$(PY) bench/leases.py
	@$(PY) bench/validate.py
	@$(PY) bench/gc.py
	@$(PY) bench/migrate.py
	@$(PY) bench/network.py

clean:
	rm -rf .demo .pytest_cache .venv-3.13
