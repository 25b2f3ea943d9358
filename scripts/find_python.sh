#!/usr/bin/env bash
# Prints the path of a Python of the given minor version (3.12 by default),
# from PATH or from pyenv's versions (whose shim answers for a version only
# where it is selected); exits 1 where there is none.
#   bash scripts/find_python.sh [3.12]
set -euo pipefail
version="${1:-3.12}"
if path=$(command -v "python$version") && "$path" -c '' 2>/dev/null; then
  # pyenv's shim is a script: the interpreter's own path survives a PATH
  # without the shims.
  "$path" -c 'import sys; print(sys.executable)'
  exit 0
fi
if command -v pyenv >/dev/null; then
  match=$(pyenv versions --bare | grep -E "^${version//./\\.}(\.[0-9]+)?$" | sort -V | tail -1 || true)
  if [[ -n "$match" && -x "$(pyenv root)/versions/$match/bin/python$version" ]]; then
    echo "$(pyenv root)/versions/$match/bin/python$version"
    exit 0
  fi
fi
echo "find_python.sh: no Python $version (on PATH or in pyenv)" >&2
exit 1
