"""ffi/quantization.h's EncodeFinite against Encode, as a C++ program.

The CUDA kernels encode a block whose absmax is finite with code-indexed
tables (``EncodeFinite``) and keep ``Encode`` for a block holding NaN or
infinity; the two must give the same code for every value such a block can
hold (|x| <= 1 + 2^-23), or the GPU's states would leave the CPU's. The
exhaustive check over every float32 is
benchmarks/experiments/encode_fast_path_check.cc (about a minute); this one
samples every 16th pattern and every threshold's neighbourhood.
"""

import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_finite_encode_gives_the_codes_of_encode(tmp_path):
  compiler = shutil.which('c++') or shutil.which('g++')
  assert compiler, 'a C++ compiler builds this package'
  binary = tmp_path / 'finite_encode_check'
  # The flags the extension's C++ is built with (CMakeLists.txt).
  build = subprocess.run(
      [compiler, '-O2', '-std=c++17', '-fno-math-errno', '-fno-trapping-math',
       '-ffp-contract=off', f'-I{ROOT / "ffi"}', '-o', str(binary),
       str(ROOT / 'tests' / 'data' / 'finite_encode_check.cc')],
      capture_output=True, text=True, check=False)
  assert build.returncode == 0, build.stderr[-3000:]
  result = subprocess.run([str(binary)], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'mismatches: 0' in result.stdout
  checked = int(result.stdout.split('checked: ')[1].split()[0])
  assert checked > 2 * 2**27, result.stdout
