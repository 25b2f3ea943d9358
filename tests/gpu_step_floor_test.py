"""benchmarks/gpu_step.py's traffic floor: issue 26's yardstick for a step."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent
                       / 'benchmarks'))
import gpu_step  # noqa: E402

PARAMS = 308_281_344  # the benchmark's 24 layers


def test_the_floor_is_the_issue_s_figure_on_the_h200():
  # Issue 26: at 90% of the H200's 4.8 TB/s the fused fp32 step (16 B a
  # parameter) floors at 1.14 ms, the bf16 one (10 B) at 0.71 ms.
  fp32 = gpu_step.traffic_bytes('paged_adamw8bit, fused', 4)
  bf16 = gpu_step.traffic_bytes('paged_adamw8bit, fused', 2)
  assert (fp32, bf16) == (16, 10)
  assert gpu_step.floor_seconds(fp32, PARAMS, 'NVIDIA H200') == pytest.approx(
      1.142e-3, rel=1e-3)
  assert gpu_step.floor_seconds(bf16, PARAMS, 'NVIDIA H200') == pytest.approx(
      0.714e-3, rel=1e-3)


def test_the_h100_floor_scales_with_its_peak():
  h100 = gpu_step.floor_seconds(16, PARAMS, 'NVIDIA H100 80GB HBM3')
  h200 = gpu_step.floor_seconds(16, PARAMS, 'NVIDIA H200')
  assert h100 / h200 == pytest.approx(4.8 / 3.35)


def test_a_card_without_a_known_peak_has_no_floor():
  assert gpu_step.floor_seconds(16, PARAMS, 'NVIDIA A100-SXM4-80GB') is None
