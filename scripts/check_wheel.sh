#!/usr/bin/env bash
# Checks the binary wheel as a user gets it (CI runs it after
# scripts/build_wheel.sh): a fresh venv, no nvcc on PATH and no CUDACXX,
# the wheel and its dependencies from the package index, run from a folder
# outside the source tree. It imports optax_paged, prints build_info(),
# checks that the CUDA kernels are in it for the expected architectures
# (scripts/wheel_architectures.sh) and that the extension links no CUDA
# library, and runs a few CPU steps of paged_adamw8bit against its jnp
# reference.
#   bash scripts/check_wheel.sh [wheelhouse/optax_paged-*.whl]
# PYTHON picks the interpreter (default: one the wheel's tag fits, 3.12 for
# an abi3 wheel).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
if (( $# )); then
  wheel=$(realpath "$1")
else
  wheel=$(ls -t wheelhouse/optax_paged-*.whl 2>/dev/null | head -1 || true)
  [[ -n "$wheel" ]] || {
    echo "check_wheel.sh: no wheel in wheelhouse/; run scripts/build_wheel.sh" >&2
    exit 1
  }
  wheel=$(realpath "$wheel")
fi
# Asked of nvcc before it leaves PATH (or given in the environment).
expected=$(bash scripts/wheel_architectures.sh)
if [[ -z "${PYTHON:-}" ]]; then
  # optax_paged-0.1.0-cp312-abi3-manylinux_2_34_x86_64.whl: cp312.
  python_tag=$(basename "$wheel" | cut -d- -f3)
  PYTHON=$(bash scripts/find_python.sh "3.${python_tag#cp3}")
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/optax_paged_wheel_check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# PATH without any folder that holds nvcc; no other way to the toolkit.
clean_path=$(tr ':' '\n' <<<"$PATH" | while read -r dir; do
  if [[ -n "$dir" && ! -e "$dir/nvcc" ]]; then echo "$dir"; fi; done | paste -sd:)
run_clean() {
  env -u CUDACXX -u CUDA_HOME -u CUDA_PATH PATH="$tmp/venv/bin:$clean_path" "$@"
}
echo "check_wheel.sh: $(basename "$wheel") into a fresh venv ($("$PYTHON" --version))"
"$PYTHON" -m venv "$tmp/venv"
run_clean python -m pip install --quiet "$wheel" 2>&1 | { grep -v '^WARNING: Location' || true; }
if run_clean bash -c 'command -v nvcc' >/dev/null; then
  echo "check_wheel.sh: nvcc is still on PATH" >&2
  exit 1
fi

cd "$tmp"
run_clean env JAX_PLATFORMS=cpu EXPECTED="$expected" SITE="$tmp/venv" python - <<'EOF'
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged
from optax_paged import _optax_paged_ext
from optax_paged import reference

module = pathlib.Path(optax_paged.__file__).resolve()
assert module.is_relative_to(pathlib.Path(os.environ['SITE']).resolve()), module
info = optax_paged.build_info()
print('optax_paged', module.parent)
for key, value in info.items():
  print(f'  {key}: {value}')
assert info['cuda'] is True, 'the wheel has no CUDA kernels'
assert info['cuda_architectures'] == os.environ['EXPECTED'].split(';'), (
    info['cuda_architectures'], os.environ['EXPECTED'])
assert info['gpu_missing'].startswith('JAX sees no CUDA GPU here'), info
# The runtime is linked in; the driver is opened when a GPU is used.
linked = subprocess.run(['ldd', _optax_paged_ext.__file__], check=True,
                        capture_output=True, text=True).stdout
print(linked.rstrip())
assert 'libcuda' not in linked and 'not found' not in linked, linked

# The kernel against its jnp reference (the quantized moments of 'w'; 'b'
# is under min_8bit_size and keeps fp32 ones).
params = {'w': jnp.linspace(-1.0, 1.0, 64 * 128).reshape(64, 128),
          'b': jnp.zeros(128)}
grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.1, params)
results = []
for tx in (optax_paged.paged_adamw8bit(learning_rate=1e-2, weight_decay=0.01),
           reference.adamw8bit(learning_rate=1e-2, weight_decay=0.01)):
  state, p = tx.init(params), params
  for _ in range(3):
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  results.append(p)
for name in params:
  moved = np.abs(np.asarray(results[0][name] - params[name])).max()
  error = np.abs(np.asarray(results[0][name] - results[1][name])).max()
  print(f'  {name}: moved {moved:.3g}, from the jnp reference {error:.2g}')
  assert moved > 1e-2 and error < 1e-6, (name, moved, error)
print('check_wheel.sh: the installed wheel imports and updates on the CPU')
EOF
echo "check_wheel.sh: done in $(( SECONDS - start )) s"
