"""What this installation of optax_paged was built with."""

from typing import Any

import jax

from optax_paged._src import base
from optax_paged._src import ffi
from optax_paged._src import optimizer_table


def build_info() -> dict[str, Any]:
  """Describes the compiled extension and what it can run here.

  Returns:
    A dict with ``cuda`` (whether the CUDA kernels were built),
    ``cuda_version`` and ``cuda_architectures`` (the toolkit and the
    ``CMAKE_CUDA_ARCHITECTURES`` they were built for; None without CUDA),
    ``cuda_usable`` (the kernels run on every CUDA GPU JAX sees, and it
    sees one), ``gpu_missing`` (None where they are usable, else what is
    missing, in the words a GPU state's error uses), ``avx2`` (the CPU
    codec's AVX2 path is used on this machine), ``optimizers`` (the compiled
    optimizer table's names), ``block_size`` and ``format_version`` (of
    ``state_dict``), and ``jax`` (the running JAX version).

  Example:
    >>> import optax_paged
    >>> info = optax_paged.build_info()
    >>> 'adamw' in info['optimizers'] and info['block_size'] == 256
    True
  """
  extension = ffi.extension()
  gpu_missing = ffi.gpu_missing()
  return {
      'cuda': bool(extension.WITH_CUDA),
      'cuda_version': extension.CUDA_VERSION,
      'cuda_architectures': ffi.cuda_architectures(),
      'cuda_usable': gpu_missing is None,
      'gpu_missing': gpu_missing,
      'avx2': bool(extension.has_avx2()),
      'optimizers': sorted(optimizer_table.table()),
      'block_size': int(extension.BLOCK_SIZE),
      'format_version': base.FORMAT_VERSION,
      'jax': jax.__version__,
  }
