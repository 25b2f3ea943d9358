#!/usr/bin/env bash
# Prints the CMAKE_CUDA_ARCHITECTURES of the binary wheel, one line:
# OPTAX_PAGED_WHEEL_ARCHITECTURES where set, else machine code (SASS) for
# every sm_XY from sm_80 up that this nvcc builds and PTX for the newest
# ("80-real;86-real;...;120-real;121"), which the driver compiles for GPUs
# newer than the toolkit. sm_80 is the floor: the kernels' bf16 arithmetic
# wants it (JAX's CUDA 13 plugin itself starts at sm_75).
# scripts/build_wheel.sh builds for it and scripts/check_wheel.sh checks it.
#   bash scripts/wheel_architectures.sh [path/to/nvcc]
set -euo pipefail
if [[ -n "${OPTAX_PAGED_WHEEL_ARCHITECTURES:-}" ]]; then
  echo "$OPTAX_PAGED_WHEEL_ARCHITECTURES"
  exit 0
fi
nvcc="${1:-${CUDACXX:-$(command -v nvcc || true)}}"
[[ -n "$nvcc" && -x "$nvcc" ]] || {
  echo "wheel_architectures.sh: no nvcc; put CUDA 12 or 13's nvcc on PATH," \
    "set CUDACXX to it, or set OPTAX_PAGED_WHEEL_ARCHITECTURES" >&2
  exit 1
}
mapfile -t codes < <("$nvcc" --list-gpu-code | sed -n 's/^sm_\([0-9]\+\)$/\1/p' \
  | sort -n | awk '$1 >= 80')
(( ${#codes[@]} )) || {
  echo "wheel_architectures.sh: $nvcc lists no sm_80 or newer" >&2
  exit 1
}
entries=()
for code in "${codes[@]::${#codes[@]}-1}"; do
  entries+=("$code-real")
done
entries+=("${codes[-1]}")
(IFS=';'; echo "${entries[*]}")
