#!/usr/bin/env bash
# Sets up .venv and trains the demo model with paged_adamw8bit and
# optax.adamw side by side (the README's demo command, about a minute on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python examples/train_demo.py "$@"
