#!/usr/bin/env bash
# The GPU suite against the installed binary wheel, for the GPU machine (no
# package registry there; Python 3.12, jax with the CUDA 13 plugin and nvcc
# in the image). Logs go to $OUT (or ./gpu_logs).
#   bash scripts/gpu_wheel_check.sh [pytest arguments]
#   # default: tests, without the TPU path's tests/tpu_*
#   SUITE_PART=1/3 bash scripts/gpu_wheel_check.sh   # a third of the files
#
# 1. The wheel: the newest wheelhouse/optax_paged-*.whl that this Python
#    and glibc accept (carried with the tree: the device call's carry names
#    wheelhouse, as scripts/build_wheel.sh left it); where there is none,
#    scripts/build_wheel.sh builds one here from the image's packages
#    (OPTAX_PAGED_WHEEL_OFFLINE=1; plain linux_x86_64 tag, no auditwheel).
#    That build and the suite may not fit one 600 s device call: build in a
#    call of its own first (wheelhouse/ stays while the machine is warm).
# 2. A venv made with --system-site-packages (jax, its CUDA plugin, optax,
#    pytest... come from the image), the wheel installed into it without
#    dependencies.
# 3. nvcc leaves PATH (every folder holding it) and CUDACXX, CUDA_HOME and
#    CUDA_PATH are unset; the tests run from a copy of the tree without
#    optax_paged/ in a temporary folder, so the package they import is the
#    wheel's (checked before they start). The one test that compiles a CUDA
#    program with nvcc (cuda_test's four-bit codec check) is left out: it
#    needs the toolkit, not the wheel; scripts/gpu_check.sh runs it.
# From this session's machine: the device tool's run with command
# "bash scripts/gpu_wheel_check.sh" and carry ["wheelhouse"] (24 MiB).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_logs}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
start=$SECONDS
# The suite's files, without the TPU path's (SUITE_PART=K/N: a share of
# them; scripts/gpu_suite_files.sh), chosen first so that a bad SUITE_PART
# costs no setup.
if (( $# == 0 )); then
  suite_files=$(bash scripts/gpu_suite_files.sh) || exit 1
elif [[ -n "${SUITE_PART:-}" ]]; then
  # Both would run the arguments' tests alone, not the part asked for.
  echo "gpu_wheel_check.sh: SUITE_PART picks the suite's files; pytest" \
    "arguments name their own: give one or the other" >&2
  exit 1
fi

nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv \
  | tee "$OUT/gpu.txt"
ldd --version | head -1 | tee -a "$OUT/gpu.txt"
if "$PYTHON" -m pip show optax_paged >/dev/null 2>&1; then
  # Its editable finder would be imported before the venv's wheel.
  echo "gpu_wheel_check.sh: optax_paged is installed in $PYTHON's own" \
    "site-packages (scripts/gpu_check.sh installs it); run this on a fresh" \
    "machine or uninstall it first" >&2
  exit 1
fi

# The newest wheel whose tags this interpreter accepts.
wheel=""
for candidate in $(ls -t wheelhouse/optax_paged-*.whl 2>/dev/null); do
  if "$PYTHON" - "$candidate" <<'EOF'
import os, sys
from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename
tags = parse_wheel_filename(os.path.basename(sys.argv[1]))[3]
sys.exit(0 if tags & set(sys_tags()) else 1)
EOF
  then
    wheel=$(realpath "$candidate")
    break
  fi
done
if [[ -z "$wheel" ]]; then
  echo "gpu_wheel_check.sh: no wheel in wheelhouse/ fits $("$PYTHON" --version)" \
    "and this glibc; building one here (log: $OUT/wheel_build.log)"
  OPTAX_PAGED_WHEEL_OFFLINE=1 PYTHON="$PYTHON" bash scripts/build_wheel.sh \
    >"$OUT/wheel_build.log" 2>&1 || { tail -40 "$OUT/wheel_build.log"; exit 1; }
  tail -3 "$OUT/wheel_build.log"
  wheel=$(realpath "$(ls -t wheelhouse/optax_paged-*.whl | head -1)")
fi
echo "gpu_wheel_check.sh: wheel $(basename "$wheel") ($(( $(stat -c %s "$wheel") / 1048576 )) MiB)" \
  | tee -a "$OUT/gpu.txt"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/optax_paged_gpu_wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# --without-pip: the image's pip (a system site package) installs into it,
# and a Python without ensurepip (Debian's without python3-venv) makes one.
"$PYTHON" -m venv --without-pip --system-site-packages "$tmp/venv" || exit 1
# Where $PYTHON is itself a venv's (the GPU image's /opt/torch/.venv), the new
# venv's system site is the base interpreter's, without jax: a .pth file adds
# the parent venv's site-packages behind the new venv's own.
"$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")' \
  >"$tmp/venv/lib/python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages/_parent_venv.pth" \
  || exit 1
"$tmp/venv/bin/python" -m pip install --no-deps --no-index --quiet "$wheel" \
  || exit 1
# The tree without the package: tests, docs, examples, README...
mkdir "$tmp/run"
tar --exclude=./optax_paged --exclude=./build --exclude=./.venv \
  --exclude=./wheelhouse --exclude=./.git --exclude=./gpu_logs -cf - . \
  | tar -C "$tmp/run" -xf -
clean_path=$(tr ':' '\n' <<<"$PATH" | while read -r dir; do
  if [[ -n "$dir" && ! -e "$dir/nvcc" ]]; then echo "$dir"; fi; done | paste -sd:)
run_clean() {
  (cd "$tmp/run" && env -u CUDACXX -u CUDA_HOME -u CUDA_PATH \
    PATH="$tmp/venv/bin:$clean_path" "$@")
}
if run_clean bash -c 'command -v nvcc' >/dev/null; then
  echo "gpu_wheel_check.sh: nvcc is still on PATH" >&2
  exit 1
fi
run_clean env SITE="$tmp/venv" python - <<'EOF' 2>&1 | tee "$OUT/wheel_build_info.txt"
import os, pathlib, shutil, subprocess
import jax
import optax_paged
from optax_paged import _optax_paged_ext
module = pathlib.Path(optax_paged.__file__).resolve()
assert module.is_relative_to(pathlib.Path(os.environ['SITE']).resolve()), (
    f'optax_paged is imported from {module}, not from the wheel')
print('optax_paged from', module.parent, '; jax', jax.__version__,
      jax.devices())
print('nvcc:', shutil.which('nvcc'), '; ptxas:', shutil.which('ptxas'))
linked = subprocess.run(['ldd', _optax_paged_ext.__file__], check=True,
                        capture_output=True, text=True).stdout
print(linked.rstrip())
assert 'libcudart' not in linked and 'libcuda.so' not in linked, linked
info = optax_paged.build_info()
print(info)
assert info['cuda_usable'], info['gpu_missing']
EOF
(( PIPESTATUS[0] == 0 )) || exit 1

if (( $# )); then
  tests=("$@")
else
  mapfile -t tests <<<"$suite_files"
  echo "gpu_wheel_check.sh: ${SUITE_PART:-1/1} of the suite, ${#tests[@]} test files" | tee -a "$OUT/gpu.txt"
fi
# As scripts/gpu_check.sh: inside the device call's 600 s with the setup.
run_clean timeout 480 python -m pytest -q -p no:cacheprovider --durations=8 \
  --deselect tests/cuda_test.py::test_four_bit_codec_on_the_device_matches_its_definition \
  "${tests[@]}" 2>&1 | tee "$OUT/wheel_tests.log" | tail -25
status=${PIPESTATUS[0]}
echo "gpu_wheel_check.sh: pytest exit $status, $(( SECONDS - start )) s in all"
exit "$status"
