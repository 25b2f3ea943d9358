#!/usr/bin/env bash
# Creates .venv (if missing) and installs optax_paged with its test and
# example dependencies. Run by scripts/test.sh and scripts/demo.sh.
# Shows its progress: each stage, the packages pip downloads and the C++
# extension's compile steps ([n/N]); pip's whole output goes to a log, shown
# at the end if pip fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log=$(mktemp "${TMPDIR:-/tmp}/optax_paged_setup.XXXXXX")

# pip install "$@", printing only its progress lines as they come.
pip_install() {
  set +e
  .venv/bin/python -m pip install -v "$@" 2>&1 | tee -a "$log" |
    grep --line-buffered -E \
      '^(Collecting|Downloading|Installing collected|Successfully installed)|^ *\[[0-9]+/[0-9]+\] ' |
    sed -u 's/^ */    /'
  local status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
    echo "setup_venv.sh: pip failed (exit $status); its whole output: $log" >&2
    exit "$status"
  fi
}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
echo "==> updating pip (log: $log)"
.venv/bin/python -m pip install --quiet --upgrade pip
# Build requirements first, so the build can see the installed jaxlib's FFI
# headers without downloading jax a second time into an isolated env.
echo "==> build requirements: scikit-build-core, nanobind, jax"
pip_install "scikit-build-core>=0.10" "nanobind>=2.4" "jax>=0.5.3"
echo "==> optax_paged and its test and example dependencies; the C++ extension" \
  "compiles in the steps [n/N] (minutes on a few cores)"
pip_install --no-build-isolation --editable ".[test,examples]"
# libtpu, for the tests that compile the TPU kernels ahead of time (marker
# tpu_compile); they skip where it does not install (it has wheels for
# x86-64 Linux only).
jax_version=$(.venv/bin/python -c 'import jax; print(jax.__version__)')
echo "==> libtpu for the TPU compile tests (jax[tpu]==$jax_version)"
if ! .venv/bin/python -m pip install --quiet "jax[tpu]==$jax_version" >>"$log" 2>&1; then
  echo "    libtpu did not install here; the tpu_compile tests will skip" \
    "(pip's output: $log)"
else
  rm -f "$log"
fi
echo "==> .venv is ready"
