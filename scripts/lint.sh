#!/usr/bin/env bash
# The static gates, in the order they are quickest to read: ruff (pyflakes, pycodestyle errors,
# sorted imports, bugbear; and the formatting), mypy --strict on the pure cores, import-linter's layer contracts.
# All configured in pyproject.toml. Exits non-zero if any gate fails; runs them all first.
# VENV: the virtualenv with the `lint` extra (default .venv, made by scripts/bootstrap.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

# The modules mypy checks strictly: protocol cores and the helpers they use.
STRICT=(vmwebd/dom vmwebd/gossip/core.py vmwebd/lease/paxos.py vmwebd/migrate/balancer.py
        vmwebd/migrate/phases.py vmwebd/placement.py vmwebd/xmlsafe.py vmwebd/ids.py
        vmwebd/atomicfile.py vmwebd/reconcile_plan.py)

failed=()
echo "== ruff check"
"$BIN/ruff" check --output-format concise . || failed+=(ruff)
echo "== ruff format --check"
"$BIN/ruff" format --check . || failed+=(ruff-format)
echo "== mypy --strict ${STRICT[*]}"
"$BIN/mypy" "${STRICT[@]}" || failed+=(mypy)
echo "== import-linter"
"$BIN/lint-imports" || failed+=(import-linter)

if [ ${#failed[@]} -gt 0 ]; then
  echo "lint: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "lint: all gates pass"
