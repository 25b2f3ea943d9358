#!/usr/bin/env bash
# Creates .venv (if missing) and installs optax_paged with its test and
# example dependencies. Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Build requirements first, so the build can see the installed jaxlib's FFI
# headers without downloading jax a second time into an isolated env.
.venv/bin/python -m pip install --quiet "scikit-build-core>=0.10" "nanobind>=2.4" "jax>=0.5.3"
.venv/bin/python -m pip install --quiet --no-build-isolation --editable ".[test,examples]"
