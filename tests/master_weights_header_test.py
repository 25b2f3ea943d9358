"""ffi/master_weights.h's arithmetic on the host, as a C++ program.

Two shortcuts of the master-weight kernels, each against what it replaces:
``DivideByGap`` (a division by a power of two known only at run time, the
correction's gap, as a product) against IEEE division over every gap and
millions of values, subnormal gaps included; ``RoundTiesUp<BFloat16>`` (on
the bits) against round-to-nearest-even with the tie moved up, over every
tie and its neighbours and every 97th float32; and bf16's correction on the
bits (``DecodeMasterOnBits``, ``EncodeCorrectionOnBits``: integer counts of
float32 steps) against the gap arithmetic float16 keeps
(``DecodeMasterByGap``, ``EncodeCorrectionByGap``), over every parameter.
The GPU runs the same header functions (no sums in them to contract into an
FMA).
"""

import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_shortcuts_give_the_same_bits(tmp_path):
  compiler = shutil.which('c++') or shutil.which('g++')
  assert compiler, 'a C++ compiler builds this package'
  binary = tmp_path / 'master_weights_check'
  # The flags the extension's C++ is built with (CMakeLists.txt).
  build = subprocess.run(
      [compiler, '-O2', '-std=c++17', '-fno-math-errno', '-fno-trapping-math',
       '-ffp-contract=off', f'-I{ROOT / "ffi"}', '-o', str(binary),
       str(ROOT / 'tests' / 'data' / 'master_weights_check.cc')],
      capture_output=True, text=True, check=False)
  assert build.returncode == 0, build.stderr[-3000:]
  result = subprocess.run([str(binary)], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'division checked: 5520000 mismatches: 0' in result.stdout
  assert 'rounding checked: 44671230 mismatches: 0' in result.stdout
  assert 'correction decode checked: 348127232 mismatches: 0' in result.stdout
  assert 'correction encode checked: 27529728 mismatches: 0' in result.stdout
