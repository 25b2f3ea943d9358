#!/usr/bin/env bash
# Sets up .venv and runs the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh
source scripts/jax_platforms.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
