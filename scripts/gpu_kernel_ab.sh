#!/usr/bin/env bash
# A/B of builds of the kernels on one GPU, in one device call: the fused
# step of benchmarks/gpu_step.py and ncu's view of chosen launches, each
# build installed from its wheel in turn, the builds alternating round by
# round so that a drift of the machine falls on all of them.
#   AB_BUILDS="wheelhouse/a wheelhouse/b" bash scripts/gpu_kernel_ab.sh
# AB_BUILDS names two or more folders holding one optax_paged wheel each (the
# first is the baseline; the logs name each build by its folder), built on this
# machine before the call (no device time) and carried, e.g. for a kernel
# change kept as a patch (benchmarks/experiments/*.patch):
#   export OPTAX_PAGED_WHEEL_ARCHITECTURES=90-real   # H100 and H200 only: ~2 min
#   bash scripts/build_wheel.sh && mkdir -p wheelhouse/a && mv wheelhouse/*.whl wheelhouse/a/
#   git apply benchmarks/experiments/l2_prefetch.patch
#   bash scripts/build_wheel.sh && mkdir -p wheelhouse/b && mv wheelhouse/*.whl wheelhouse/b/
#   git apply -R benchmarks/experiments/l2_prefetch.patch
# then run with carry ["wheelhouse"]. flashoptim-jax's rows appear in the
# bf16 table where it is installed (pip install --no-deps its wheel first).
# AB_ROUNDS (default 2) alternations of the builds, each running
# gpu_step.py over AB_DTYPES (default float32,bfloat16) for AB_STEP_ROUNDS
# (default 5) rounds; then AB_PROFILE (default "fp32 adamw,bf16 adamw"), the
# launches for ncu as gpu_check.sh's PROFILE_RUNS, once a build (AB_PROFILE=""
# for none; AB_ROUNDS=0 for ncu alone). Logs and the ncu reports go to $OUT
# (default /tmp/gpu_kernel_ab). AB_SUITE=1: then the GPU suite
# (scripts/gpu_wheel_check.sh, about 5.5 minutes on an H100) on the wheel of
# the build that tools/ab_winner.py finds faster than the first by ncu, if
# one is, in the same call: the device machine goes back 30 s after a call,
# so a second call would pay for a new start. With jax 0.11.2 the suite and
# an A/B no longer fit one call: SUITE_PART=1/3 runs a third of it here
# (gpu_wheel_check.sh), 2/3 and 3/3 go in the next calls.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
read -ra builds <<<"${AB_BUILDS:?name the wheel folders, baseline first}"
(( ${#builds[@]} >= 2 )) || { echo "gpu_kernel_ab.sh: AB_BUILDS needs two folders or more" >&2; exit 1; }
IFS=, read -ra runs <<<"${AB_PROFILE-fp32 adamw,bf16 adamw}"
if [[ "${AB_SUITE:-0}" == 1 ]] && (( ${#runs[@]} == 0 )); then
  echo "gpu_kernel_ab.sh: AB_SUITE=1 picks its build by ncu: give AB_PROFILE" >&2
  exit 1
fi
OUT="${OUT:-/tmp/gpu_kernel_ab}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

install() {
  local wheel
  wheel=$(ls "$1"/optax_paged-*.whl | head -1)
  python3 -m pip install --no-deps --force-reinstall "$wheel" >"$OUT/install.log" 2>&1 \
    || { tail -20 "$OUT/install.log"; exit 1; }
}

for round in $(seq "${AB_ROUNDS:-2}"); do
  for folder in "${builds[@]}"; do
    build=$(basename "$folder")
    install "$folder"
    echo "== round $round, build $build ($folder)"
    (cd benchmarks && timeout 240 python3 gpu_step.py --rounds "${AB_STEP_ROUNDS:-5}" \
      --dtypes "${AB_DTYPES:-float32,bfloat16}") 2>&1 \
      | tee "$OUT/step_${build}_${round}.log" | grep -E "^\|" | grep -iE "optax.adamw|fused"
  done
done

(( ${#runs[@]} > 0 )) || exit 0
for folder in "${builds[@]}"; do
  build=$(basename "$folder")
  install "$folder"
  for run in "${runs[@]}"; do
    set -- $run
    bash scripts/ncu_fused.sh "$OUT/ncu_${build}_$2_$1${3:+_master$3}.txt" "ncu $build $*" "$@"
  done
done

if [[ "${AB_SUITE:-0}" == 1 ]]; then
  names=()
  for folder in "${builds[@]}"; do names+=("$(basename "$folder")"); done
  win=$(python3 tools/ab_winner.py "$OUT" "${names[@]}")
  if [[ -z "$win" ]]; then
    echo "gpu_kernel_ab.sh: no build beat ${names[0]} by ncu; the suite does not run"
    exit 0
  fi
  echo "gpu_kernel_ab.sh: $win beat ${names[0]} by ncu; the GPU suite on its wheel"
  # gpu_wheel_check.sh refuses to run beside an install in python3's own site.
  python3 -m pip uninstall -y optax_paged >/dev/null 2>&1
  for folder in "${builds[@]}"; do
    if [[ "$(basename "$folder")" == "$win" ]]; then
      cp "$folder"/optax_paged-*.whl wheelhouse/
    fi
  done
  touch wheelhouse/optax_paged-*.whl
  bash scripts/gpu_wheel_check.sh
fi
