#!/usr/bin/env bash
# Prints the path of a working Python interpreter of version $1 (e.g. 3.13): under pyenv
# (~/.pyenv/versions/3.13.*, newest first) or on PATH as python3.13. Exits 1 with a line on
# stderr when there is none.
set -euo pipefail
want=${1:?usage: find-python.sh X.Y}
root=${PYENV_ROOT:-$HOME/.pyenv}
candidates=()
for d in $(ls -d "$root"/versions/"$want".* 2>/dev/null | sort -V -r); do
  candidates+=("$d/bin/python$want")
done
if p=$(command -v "python$want" 2>/dev/null); then candidates+=("$p"); fi
for p in "${candidates[@]}"; do
  if [ -x "$p" ] && "$p" -c 'import sys, venv' >/dev/null 2>&1; then echo "$p"; exit 0; fi
done
echo "find-python.sh: no working Python $want under $root/versions or on PATH" >&2
exit 1
