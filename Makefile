# The README's two commands. Both install what they need first (Debian packages, .venv).
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: demo test bootstrap bench clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	@$(PY) -m vmwebd.demo

test: bootstrap
	@$(PY) -m pytest $(PYTEST_ARGS)

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
	rm -rf .demo .pytest_cache
