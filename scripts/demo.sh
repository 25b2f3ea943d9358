#!/usr/bin/env bash
# Sets up .venv and trains the demo model with paged_adamw8bit and
# optax.adamw side by side (the README's demo command, about a minute on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh
source scripts/jax_platforms.sh
echo "==> training the demo model (the losses print as they fall)"
# Unbuffered, so that the losses show as they come through a pipe too.
exec .venv/bin/python -u examples/train_demo.py "$@"
