"""optax_paged.build_info: what the extension was built with."""

import jax

import optax_paged
from optax_paged._src import ffi
from optax_paged._src import optimizer_table


def test_build_info_describes_the_extension():
  info = optax_paged.build_info()
  assert info['cuda'] is bool(ffi.extension().WITH_CUDA)
  if info['cuda']:
    assert info['cuda_version'].split('.')[0].isdigit()
    # CMake's forms: 90, 90-real, 90-virtual, 90a, native, all, all-major.
    assert info['cuda_architectures'] and all(
        a[:2].isdigit() or a.startswith(('native', 'all'))
        for a in info['cuda_architectures'])
  else:
    assert info['cuda_version'] is None
    assert info['cuda_architectures'] is None
    assert info['gpu_missing'].startswith(
        'optax_paged was built without its CUDA kernels because ')
  # What a GPU state's error would say (tests/cuda_support_test.py).
  assert info['gpu_missing'] == ffi.gpu_missing()
  assert info['cuda_usable'] is (info['gpu_missing'] is None)
  assert info['cuda_usable'] <= ffi.has_cuda_backend() <= info['cuda']
  assert set(info['optimizers']) == set(optimizer_table.table())
  assert info['block_size'] == 256 and info['format_version'] == 5
  assert info['jax'] == jax.__version__
