"""tools/ab_winner.py on ncu reports stored from the A/B of 2026-12-07."""

import importlib.util
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOGS = ROOT / 'benchmarks' / 'logs' / 'ab_2026-12-07_h100'
_SPEC = importlib.util.spec_from_file_location(
    'ab_winner', ROOT / 'tools' / 'ab_winner.py')
ab_winner = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ab_winner)

# The 24-bit master kernel before (2.53 ms) and after (2.19 ms) the master
# shortcuts, and the 32-bit one, which they did not change (2.52 / 2.53 ms).
BEFORE = {'adamw_bf16_master24': 'ncu_base_bf16_adamw_24.txt'}
AFTER = {
    'adamw_bf16_master24':
        'master_shortcuts_ncu_fused_adamw_bf16_master24.txt',
    'adamw_bf16_master32':
        'master_shortcuts_ncu_fused_adamw_bf16_master32.txt',
}


def _lay_out(folder, build, reports):
  for run, name in reports.items():
    shutil.copy(LOGS / name, folder / f'ncu_{build}_{run}.txt')


def test_the_faster_build_wins(tmp_path):
  _lay_out(tmp_path, 'base', BEFORE)
  _lay_out(tmp_path, 'shortcuts', {'adamw_bf16_master24':
                                   AFTER['adamw_bf16_master24']})
  _lay_out(tmp_path, 'same', BEFORE)
  best, lines = ab_winner.winner(tmp_path, 'base', ['same', 'shortcuts'],
                                 0.02)
  assert best == 'shortcuts'
  assert lines[0] == 'same: geometric mean 1.000 of base; ' \
      'adamw_bf16_master24 1.000'
  assert lines[1].startswith('shortcuts: geometric mean 0.866')
  assert lines[1].endswith('(wins)')


def test_a_build_slower_on_one_kernel_loses(tmp_path):
  # 0.866 of the base on one kernel, 1.054 on the other: the geometric mean
  # (0.955) is under the margin, the slower kernel is not.
  _lay_out(tmp_path, 'base', {'one': 'ncu_base_bf16_adamw_24.txt',
                              'two': 'ncu_base_bf16_adamw.txt'})
  _lay_out(tmp_path, 'mixed', {
      'one': 'master_shortcuts_ncu_fused_adamw_bf16_master24.txt',
      'two': 'ncu_base_bf16_adamw4bit.txt'})
  best, lines = ab_winner.winner(tmp_path, 'base', ['mixed'], 0.02)
  assert best is None
  assert 'geometric mean 0.955' in lines[0], lines
  assert 'one 0.866, two 1.054' in lines[0], lines


def test_a_missing_or_unfinished_run_decides_nothing(tmp_path):
  _lay_out(tmp_path, 'base', {'one': 'ncu_base_bf16_adamw_24.txt',
                              'two': 'ncu_base_bf16_adamw.txt'})
  _lay_out(tmp_path, 'partial', {
      'one': 'master_shortcuts_ncu_fused_adamw_bf16_master24.txt'})
  _lay_out(tmp_path, 'broken', {
      'one': 'master_shortcuts_ncu_fused_adamw_bf16_master24.txt'})
  (tmp_path / 'ncu_broken_two.txt').write_text('==PROF== Connected\nKilled\n')
  best, lines = ab_winner.winner(tmp_path, 'base', ['partial', 'broken'],
                                 0.02)
  assert best is None
  assert all('missing or unfinished' in line for line in lines), lines


def test_the_command_prints_only_the_winner(tmp_path):
  _lay_out(tmp_path, 'base', BEFORE)
  _lay_out(tmp_path, 'shortcuts', {'adamw_bf16_master24':
                                   AFTER['adamw_bf16_master24']})
  done = subprocess.run(
      [sys.executable, str(ROOT / 'tools' / 'ab_winner.py'), str(tmp_path),
       'base', 'shortcuts'], capture_output=True, text=True, check=True)
  assert done.stdout == 'shortcuts\n'
  assert '(wins)' in done.stderr


def test_a_folder_without_the_baseline_is_refused(tmp_path):
  _lay_out(tmp_path, 'shortcuts', {'adamw_bf16_master24':
                                   AFTER['adamw_bf16_master24']})
  done = subprocess.run(
      [sys.executable, str(ROOT / 'tools' / 'ab_winner.py'), str(tmp_path),
       'base', 'shortcuts'], capture_output=True, text=True, check=False)
  assert done.returncode == 2
  assert done.stdout == ''
  assert 'no ncu report of base' in done.stderr
