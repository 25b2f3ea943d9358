"""The CUDA host source compiles against CUDA 12's headers, not only 13's.

The managed-memory calls changed signature in CUDA 13 (a cudaMemLocation
instead of a device number), and early CUDA 12 releases have only the old
one. CI has no CUDA toolkit, so this compiles ``ffi/state_memory_cuda.cc``
(the one source that differs by version) against CUDA 12.1's headers from
the package index (the ``test`` extra); the GPU check builds it with CUDA 13.
"""

import importlib.util
import pathlib
import re
import shutil
import subprocess

import jax.ffi
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _include_dir(package: str) -> pathlib.Path:
  spec = importlib.util.find_spec(f'nvidia.{package}')
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(f'nvidia.{package} is not installed (pip install ".[test]")')
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'include'


def test_state_memory_compiles_with_cuda_12_headers():
  runtime = _include_dir('cuda_runtime')
  version = re.search(r'#define CUDART_VERSION\s+(\d+)',
                      (runtime / 'cuda_runtime_api.h').read_text())
  assert version and int(version.group(1)) < 13000, version
  compiler = shutil.which('c++') or shutil.which('g++')
  assert compiler, 'a C++ compiler builds this package'
  result = subprocess.run(
      [compiler, '-std=c++17', '-fsyntax-only', '-Wall', '-Wextra', '-Werror',
       '-DOPTAX_PAGED_WITH_CUDA', f'-I{runtime}',
       f'-I{_include_dir("cuda_nvcc")}', f'-I{jax.ffi.include_dir()}',
       f'-I{ROOT / "ffi"}', str(ROOT / 'ffi' / 'state_memory_cuda.cc')],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
