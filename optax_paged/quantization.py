"""Blockwise 8-bit quantization with bitsandbytes' dynamic tree maps.

``quantize_blockwise`` / ``dequantize_blockwise`` run the compiled kernels of
``ffi/quantization.h`` on NumPy arrays; ``reference_quantize_blockwise`` /
``reference_dequantize_blockwise`` are the same encoding in ``jax.numpy``.

Example:
  >>> import numpy as np
  >>> from optax_paged import quantization
  >>> x = np.linspace(-1, 1, 1000, dtype=np.float32)
  >>> codes, absmax = quantization.quantize_blockwise(x)
  >>> y = quantization.dequantize_blockwise(codes, absmax)
  >>> bool(np.max(np.abs(x - y)) < 0.01)
  True
"""

import numpy as np

from optax_paged._src import ffi as _ffi
from optax_paged._src import quantization as _quantization
from optax_paged._src.base import BLOCK_SIZE
from optax_paged._src.dynamic_map import create_dynamic_map
from optax_paged._src.quantization import (
  dequantize_blockwise as reference_dequantize_blockwise,
)
from optax_paged._src.quantization import pack_nibbles
from optax_paged._src.quantization import (
  quantize_blockwise as reference_quantize_blockwise,
)
from optax_paged._src.quantization import unpack_nibbles


def dynamic_map(signed: bool = True) -> np.ndarray:
  """The 256-entry map the compiled kernels use (a float32 copy)."""
  return _ffi.extension().dynamic_map(signed=signed)


def four_bit_map(signed: bool = True) -> np.ndarray:
  """The 16-entry map of 4-bit moments (``adamw4bit``; a float32 copy).

  Signed: torchao's dynamic map of first moments; unsigned: ``1/16, ...,
  1``, the second moments' linear map without zero. A ``state_dict`` of a
  4-bit state holds its codes packed two a byte (``unpack_nibbles``).
  """
  return _quantization.map_values(signed, 4).copy()


def quantize_blockwise(
    x: np.ndarray, signed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Quantizes ``x`` (flattened) in blocks of 256.

  Args:
    x: values to encode; converted to a flat float32 array.
    signed: use the signed map (values in any sign) or the unsigned one.

  Returns:
    ``(codes, absmax)``: uint8 codes, one per value, and float32 absmax, one
    per block of 256 values.
  """
  flat = np.ascontiguousarray(np.ravel(x), dtype=np.float32)
  return _ffi.extension().quantize_blockwise(flat, signed=signed)


def dequantize_blockwise(
    codes: np.ndarray, absmax: np.ndarray, signed: bool = True
) -> np.ndarray:
  """Decodes ``codes`` with one ``absmax`` per block of 256; float32, flat."""
  codes = np.ascontiguousarray(np.ravel(codes))
  if codes.dtype != np.uint8:
    raise TypeError(f'codes must be uint8, got {codes.dtype}.')
  absmax = np.ascontiguousarray(np.ravel(absmax), dtype=np.float32)
  return _ffi.extension().dequantize_blockwise(codes, absmax, signed=signed)


__all__ = [
    'BLOCK_SIZE',
    'create_dynamic_map',
    'dequantize_blockwise',
    'dynamic_map',
    'four_bit_map',
    'pack_nibbles',
    'unpack_nibbles',
    'quantize_blockwise',
    'reference_dequantize_blockwise',
    'reference_quantize_blockwise',
]
