"""Blockwise 8-bit quantization in plain ``jax.numpy``.

The same encoding as ``ffi/quantization.h``: per block of 256 values, an fp32
absmax and, per value, the code of the map entry nearest to
``x * (1 / absmax)`` (ties to the smaller magnitude, NaN to the zero code).
Used by the reference optimizer and as a portable fallback.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import dynamic_map


class MapTables:
  """A quantization map and the midpoints that decide nearest entries."""

  def __init__(self, values: np.ndarray):
    values = np.asarray(values, dtype=np.float32)
    self.values = values
    self.zero_code = int(np.flatnonzero(values == 0)[0])
    up = values[self.zero_code:]
    down = values[: self.zero_code + 1][::-1]
    half = np.float32(0.5)
    self.positive = np.abs(half * (up[:-1] + up[1:])).astype(np.float32)
    self.negative = np.abs(half * (down[:-1] + down[1:])).astype(np.float32)


@functools.cache
def tables(signed: bool) -> MapTables:
  return MapTables(dynamic_map.create_dynamic_map(signed=signed))


def _pad_to_blocks(x: jax.Array) -> jax.Array:
  n = x.shape[0]
  blocks = -(-n // base.BLOCK_SIZE)
  return jnp.pad(x, (0, blocks * base.BLOCK_SIZE - n)).reshape(
      blocks, base.BLOCK_SIZE
  )


def block_absmax(x: jax.Array) -> jax.Array:
  """Per-block max |x| of a flat float32 array; NaN if the block has one."""
  blocks = _pad_to_blocks(jnp.abs(x.astype(jnp.float32)))
  return jnp.max(blocks, axis=1)


def inverse_scale(absmax: jax.Array) -> jax.Array:
  f32 = np.finfo(np.float32)
  finite_positive = (absmax >= f32.tiny) & (absmax <= f32.max)
  safe = jnp.where(finite_positive, absmax, 1.0)
  return jnp.where(finite_positive, 1.0 / safe, 0.0).astype(jnp.float32)


def encode(scaled: jax.Array, signed: bool) -> jax.Array:
  """Codes of the map entries nearest to already scaled values."""
  t = tables(signed)
  zero = t.zero_code
  up = jnp.searchsorted(jnp.asarray(t.positive), scaled, side='left')
  down = jnp.searchsorted(jnp.asarray(t.negative), -scaled, side='left')
  codes = jnp.where(scaled < 0, zero - down, zero + up)
  codes = jnp.where(jnp.isnan(scaled), zero, codes)
  return codes.astype(jnp.uint8)


def quantize_blockwise(
    x: jax.Array, signed: bool = True
) -> tuple[jax.Array, jax.Array]:
  """Quantizes a flat array: (uint8 codes of len(x), fp32 absmax per block)."""
  x = jnp.ravel(x).astype(jnp.float32)
  absmax = block_absmax(x)
  scale = jnp.repeat(inverse_scale(absmax), base.BLOCK_SIZE)[: x.shape[0]]
  return encode(x * scale, signed), absmax


def dequantize_blockwise(
    codes: jax.Array, absmax: jax.Array, signed: bool = True
) -> jax.Array:
  """Float32 values of codes; ``absmax`` has one entry per block of 256."""
  values = jnp.asarray(tables(signed).values)[codes.astype(jnp.int32)]
  scale = jnp.repeat(absmax, base.BLOCK_SIZE)[: codes.shape[0]]
  return values * scale


