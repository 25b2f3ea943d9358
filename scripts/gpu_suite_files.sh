#!/usr/bin/env bash
# Prints the GPU suite's test files, one a line: tests/*_test.py without the
# TPU path's tests/tpu_* (those run in CI on the CPU, with no CUDA code in
# them). With SUITE_PART=K/N, only the K-th of N shares: every N-th file in
# name order, from the K-th. On jax 0.11.2 the whole suite takes about 10
# minutes on an H100, past one device call's 600 s, so scripts/gpu_check.sh's
# tests step and scripts/gpu_wheel_check.sh run it in calls on the warm
# machine: in halves on 2026-12-07 (SUITE_PART=1/2 in 261 s, then 2/2 in
# 346 s), but later that day the first half no longer fitted a call with the
# wheel's setup (cut at 79% by a 300 s limit), so use thirds (1/3, 2/3, 3/3).
# Exits 2 on a malformed SUITE_PART, printing nothing.
#   SUITE_PART=1/3 bash scripts/gpu_suite_files.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
part="${SUITE_PART:-1/1}"
if ! [[ "$part" =~ ^([0-9]+)/([0-9]+)$ ]] \
    || (( BASH_REMATCH[1] < 1 || BASH_REMATCH[1] > BASH_REMATCH[2] )); then
  echo "gpu_suite_files.sh: SUITE_PART is K/N with 1 <= K <= N, not '$part'" >&2
  exit 2
fi
LC_ALL=C ls tests/*_test.py | grep -v '^tests/tpu_' \
  | awk -v k="${BASH_REMATCH[1]}" -v n="${BASH_REMATCH[2]}" '(NR - 1) % n == k - 1'
