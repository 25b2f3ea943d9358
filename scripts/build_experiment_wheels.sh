#!/usr/bin/env bash
# Builds, on this machine (nvcc, no GPU), one wheel of the tree as it is and
# one per kernel patch in benchmarks/experiments/, for scripts/gpu_kernel_ab.sh:
#   bash scripts/build_experiment_wheels.sh
# Each lands in wheelhouse/<name>/ (base, then each patch's file name without
# .patch), and the base wheel also in wheelhouse/ itself, where
# `GPU_CHECK_WHEEL=1 scripts/gpu_check.sh` and scripts/gpu_wheel_check.sh take
# it. Architectures: OPTAX_PAGED_WHEEL_ARCHITECTURES, default 90-real (H100
# and H200; about 2 minutes a wheel after the first, which also makes the
# build's venv). Each patch is applied to the tree for its build and taken
# off again (also when the build fails), so leave ffi/ and tests/ alone while
# it runs; it refuses to start over uncommitted changes there. It prints the
# AB_BUILDS line to pass to gpu_kernel_ab.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! git diff --quiet HEAD -- ffi tests; then
  echo "build_experiment_wheels.sh: ffi/ or tests/ has uncommitted changes;" \
    "commit them first (the patches are applied to the tree)" >&2
  exit 1
fi
export OPTAX_PAGED_WHEEL_ARCHITECTURES="${OPTAX_PAGED_WHEEL_ARCHITECTURES:-90-real}"

build() {
  echo "== $1"
  bash scripts/build_wheel.sh | grep -E "^build_wheel.sh: wheelhouse/" || {
    echo "build_experiment_wheels.sh: the $1 build failed (build/wheel-build.log)" >&2
    return 1
  }
  mkdir -p "wheelhouse/$1"
  rm -f "wheelhouse/$1"/optax_paged-*.whl
  mv wheelhouse/optax_paged-*.whl "wheelhouse/$1/"
}

folders=(wheelhouse/base)
build base
shopt -s nullglob  # no patch waiting: the base wheel alone
for patch in benchmarks/experiments/*.patch; do
  name=$(basename "$patch" .patch)
  git apply "$patch"
  trap 'git apply -R "$patch"' EXIT
  build "$name"
  git apply -R "$patch"
  trap - EXIT
  folders+=("wheelhouse/$name")
done
cp wheelhouse/base/optax_paged-*.whl wheelhouse/
echo "AB_BUILDS=\"${folders[*]}\""
