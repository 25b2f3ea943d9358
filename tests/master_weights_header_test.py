"""ffi/master_weights.h's arithmetic on the host, as a C++ program.

``DivideByGap`` replaces a division by a power of two known only at run time
(the correction's gap) with a product; the check compares it with IEEE
division over every gap and millions of values, subnormal gaps included.
The GPU runs the same header function (multiplications only: nothing to
contract into an FMA).
"""

import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_divide_by_gap_rounds_as_the_division(tmp_path):
  compiler = shutil.which('c++') or shutil.which('g++')
  assert compiler, 'a C++ compiler builds this package'
  binary = tmp_path / 'divide_by_gap_check'
  # The flags the extension's C++ is built with (CMakeLists.txt).
  build = subprocess.run(
      [compiler, '-O2', '-std=c++17', '-fno-math-errno', '-fno-trapping-math',
       '-ffp-contract=off', f'-I{ROOT / "ffi"}', '-o', str(binary),
       str(ROOT / 'tests' / 'data' / 'divide_by_gap_check.cc')],
      capture_output=True, text=True, check=False)
  assert build.returncode == 0, build.stderr[-3000:]
  result = subprocess.run([str(binary)], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'checked: 5520000 mismatches: 0' in result.stdout, result.stdout
