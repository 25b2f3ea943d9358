#!/usr/bin/env bash
# The whole GPU check in one call, for the GPU machine (no package registry
# there: it builds against the image's packages). Logs go to $OUT (or ./gpu_logs).
#   bash scripts/gpu_check.sh [tests|sanitizer|bench|all]...
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_logs}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
steps=("${@:-all}")
want() { [[ " ${steps[*]} " == *" $1 "* || " ${steps[*]} " == *" all "* ]]; }
status=0

nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | head -6
python3 -c "import optax_paged, jax; from optax_paged._src import ffi; print('cuda build:', ffi.extension().WITH_CUDA, 'backend:', jax.default_backend(), 'cuda:', ffi.has_cuda_backend())"

if want tests; then
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -25
  status=$((status | ${PIPESTATUS[0]}))
fi
if want sanitizer; then
  for tool in memcheck racecheck; do
    timeout 120 compute-sanitizer --tool "$tool" --kernel-name kns=UpdateKernel \
      python3 tools/sanitizer_workload.py >"$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
  done
fi
if want bench; then
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  timeout 500 python3 benchmarks/gpu_step.py --write "$OUT/RESULTS.md" 2>&1 | tee "$OUT/bench.log" | tail -30
fi
exit $status
