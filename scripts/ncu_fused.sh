#!/usr/bin/env bash
# One fused launch of tools/profile_fused.py under ncu, its report written to
# REPORT and a one-line summary (duration, DRAM throughput, executed
# instructions, registers, occupancy) printed after LABEL:
#   bash scripts/ncu_fused.sh REPORT LABEL DTYPE OPTIMIZER [MASTER_BITS]
# For scripts/gpu_check.sh's profile step and scripts/gpu_kernel_ab.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
report=$1
label=$2
shift 2
timeout 120 ncu --clock-control none --kernel-name regex:UpdateKernel \
  --launch-skip 4 --launch-count 1 --section SpeedOfLight \
  --section InstructionStats --section LaunchStats --section Occupancy \
  --section MemoryWorkloadAnalysis --section WarpStateStats \
  python3 tools/profile_fused.py "$@" >"$report" 2>&1
echo "$label: $(grep -E '^ +(Duration|DRAM Throughput|Executed Instructions|Registers Per Thread|Achieved Occupancy) ' \
  "$report" | awk '{print $1" "$NF}' | paste -sd' ')"
