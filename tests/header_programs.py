"""Builds and runs the C++ programs in tests/data/ that check ffi/ headers."""

import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_header_program(source: str, tmp_path: pathlib.Path) -> str:
  """Compiles ``tests/data/<source>`` as the extension's C++ and runs it.

  Args:
    source: the program's file name in tests/data/.
    tmp_path: a folder for the binary.

  Returns:
    What the program printed; it must have exited with 0.
  """
  compiler = shutil.which('c++') or shutil.which('g++')
  assert compiler, 'a C++ compiler builds this package'
  binary = tmp_path / pathlib.Path(source).stem
  # The flags the extension's C++ is built with (CMakeLists.txt).
  build = subprocess.run(
      [compiler, '-O2', '-std=c++17', '-fno-math-errno', '-fno-trapping-math',
       '-ffp-contract=off', f'-I{ROOT / "ffi"}', '-o', str(binary),
       str(ROOT / 'tests' / 'data' / source)],
      capture_output=True, text=True, check=False)
  assert build.returncode == 0, build.stderr[-3000:]
  result = subprocess.run([str(binary)], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout
