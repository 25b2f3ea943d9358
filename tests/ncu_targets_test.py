"""tools/ncu_targets.py on ncu reports stored from earlier GPU runs."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOGS = ROOT / 'benchmarks' / 'logs'
_SPEC = importlib.util.spec_from_file_location(
    'ncu_targets', ROOT / 'tools' / 'ncu_targets.py')
ncu_targets = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ncu_targets)


@pytest.mark.parametrize('name, kernel, dram, duration, target', [
    ('ncu_fused_adamw_bf16_master24_2026-12-06_h200.txt',
     'AdamW 8-bit, BFloat16, 24-bit master', 22.56, 3.44, 80.0),
    ('ncu_fused_adamw4bit_fp32_2026-11-26.txt', 'AdamW 4-bit, float', 70.16,
     1.86, 85.0),
])
def test_reads_the_kernel_and_its_metrics(name, kernel, dram, duration,
                                          target):
  launch = ncu_targets.parse((LOGS / name).read_text())
  assert launch.name == kernel
  assert launch.dram_percent == pytest.approx(dram, abs=0.01)
  assert launch.duration_ms == pytest.approx(duration, abs=0.005)
  assert launch.target == target


def test_issue_slots_busy_is_issued_over_active_cycles():
  text = (LOGS / 'ab_2026-12-07_h100' / 'ncu_base_bf16_adamw.txt').read_text()
  # Avg. Issued Instructions Per Scheduler 1,754,117.21 over SM Active
  # Cycles 2,523,102.87.
  assert ncu_targets.parse(text).issue_percent == pytest.approx(69.52,
                                                                abs=0.01)
  report, _ = ncu_targets.table([('r.txt', ncu_targets.parse(text))])
  # At 85% of DRAM the same instructions a byte keep 69.52 * 85 / 71.17 =
  # 83% of the issue slots busy.
  assert '| 1.29 | 69.5% | 71.2% | >= 85% | 83% | MISSED |' in report


def test_issue_at_target_over_100_percent_says_instructions_bind():
  text = (LOGS / 'ab_2026-12-07_h100' /
          'ncu_base_bf16_adamw4bit.txt').read_text()
  launch = ncu_targets.parse(text)
  # 2,041,500.62 issued per scheduler over 2,681,150.07 active cycles at
  # 54.53% of DRAM.
  assert launch.issue_at(85.0) == pytest.approx(
      100 * 2041500.62 / 2681150.07 * 85 / 54.53, rel=1e-4)
  assert launch.issue_at(85.0) > 100
  assert launch.issue_at(None) is None


def test_a_report_without_instruction_stats_leaves_issue_blank():
  text = (LOGS / 'ab_2026-12-07_h100' / 'ncu_base_fp32_adamw.txt').read_text()
  stripped = '\n'.join(line for line in text.splitlines()
                       if 'Issued Instructions Per Scheduler' not in line)
  launch = ncu_targets.parse(stripped)
  assert launch.issue_percent is None
  assert launch.dram_percent == pytest.approx(76.70, abs=0.01)
  report, _ = ncu_targets.table([('r.txt', launch)])
  assert '| 1.67 |  | 76.7% | >= 85% |  | MISSED |' in report


def test_a_failed_run_is_reported_not_read():
  with pytest.raises(ValueError, match='no UpdateKernel'):
    ncu_targets.parse('==PROF== Connected to process 1\nTraceback ...\n')


def test_strict_fails_on_a_missed_target_and_the_default_reports():
  report = LOGS / 'ncu_fused_adamw_bf16_master24_2026-12-06_h200.txt'
  command = [sys.executable, str(ROOT / 'tools' / 'ncu_targets.py'),
             str(report)]
  plain = subprocess.run(command, capture_output=True, text=True, check=False)
  assert plain.returncode == 0, plain.stderr
  assert '| 22.6% | >= 80% | 244% | MISSED |' in plain.stdout
  assert '1 target(s) missed' in plain.stdout
  strict = subprocess.run(command + ['--strict'], capture_output=True,
                          text=True, check=False)
  assert strict.returncode == 1
