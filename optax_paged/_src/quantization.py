"""Blockwise 8-bit and 4-bit quantization in plain ``jax.numpy``.

The same encoding as ``ffi/quantization.h``: per block of 256 values (128 for
4-bit codes), an fp32 absmax and, per value, the code of the map entry
nearest to ``x * (1 / absmax)`` (ties to the smaller magnitude, NaN to the
zero code; the 4-bit unsigned map has no zero and sends NaN to code 0).
Codes here are one uint8 per value; the registry packs 4-bit codes two a
byte (``pack_nibbles``). Used by the reference optimizer and as a portable
fallback.
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


@functools.cache
def map_values(signed: bool, code_bits: int = 8) -> np.ndarray:
  """The float32 map of ``code_bits``-bit codes (256 or 16 entries)."""
  if code_bits == 4:
    return (dynamic_map.four_bit_signed_map() if signed
            else dynamic_map.four_bit_unsigned_map())
  return tables(signed).values


def _pad_to_blocks(x: jax.Array, code_bits: int = 8) -> jax.Array:
  n = x.shape[0]
  size = base.block_size(code_bits)
  blocks = -(-n // size)
  return jnp.pad(x, (0, blocks * size - n)).reshape(blocks, size)


def block_absmax(x: jax.Array, code_bits: int = 8) -> jax.Array:
  """Per-block max |x| of a flat float32 array; NaN if the block has one."""
  blocks = _pad_to_blocks(jnp.abs(x.astype(jnp.float32)), code_bits)
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


def encode_four_bit(scaled: jax.Array, signed: bool) -> jax.Array:
  """4-bit codes (one uint8 each) of the entries nearest to scaled values."""
  if signed:
    t = MapTables(map_values(True, 4))
    up = jnp.searchsorted(jnp.asarray(t.positive), scaled, side='left')
    down = jnp.searchsorted(jnp.asarray(t.negative), -scaled, side='left')
    codes = jnp.where(scaled < 0, t.zero_code - down, t.zero_code + up)
    codes = jnp.where(jnp.isnan(scaled), t.zero_code, codes)
  else:
    values = map_values(False, 4)
    midpoints = (np.float32(0.5) * (values[:-1] + values[1:])).astype(
        np.float32)
    codes = jnp.searchsorted(jnp.asarray(midpoints), scaled, side='left')
    codes = jnp.where(jnp.isnan(scaled), 0, codes)
  return codes.astype(jnp.uint8)


def _mix32(x: jax.Array) -> jax.Array:
  """``Mix32`` of ffi/quantization.h: a bijective 32-bit hash."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7feb352d)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846ca68b)
  return x ^ (x >> 16)


def state_rounding_bits(seed: jax.Array, leaf: int, size: int) -> jax.Array:
  """The kernels' random bits for stochastic 4-bit codes of one leaf.

  ``seed`` is the step's seed (the incremented count), ``leaf`` the leaf's
  index in its state; one uint32 per element (leaves under 2^32 elements).
  """
  seed = jnp.asarray(seed).astype(jnp.uint32)
  key = _mix32(_mix32(seed * jnp.uint32(0x9e3779b9) + jnp.uint32(0x7f4a7c15))
               ^ (jnp.uint32(leaf) * jnp.uint32(0x85ebca6b)))
  return _mix32(jnp.arange(size, dtype=jnp.uint32) ^ key)


def encode_four_bit_stochastic(scaled: jax.Array,
                               random: jax.Array) -> jax.Array:
  """4-bit signed codes of scaled values, rounded stochastically.

  Between the entries below and above a value, the upper one when the
  distance from the lower exceeds ``u`` times the gap, with ``u`` in [0, 1)
  built exactly from the top 23 random bits (``EncodeFourBitStochastic``).
  """
  values = jnp.asarray(map_values(True, 4))
  nearest = encode_four_bit(scaled, True).astype(jnp.int32)
  low = jnp.where(values[nearest] > scaled, nearest - 1, nearest)
  low = jnp.clip(low, 0, 14)
  gap = values[low + 1] - values[low]
  into = scaled - values[low]
  u = jax.lax.bitcast_convert_type(
      (random >> 9) | jnp.uint32(0x3f800000), jnp.float32) - 1.0
  return jnp.where(into > u * gap, low + 1, low).astype(jnp.uint8)


def quantize_blockwise(
    x: jax.Array, signed: bool = True, code_bits: int = 8,
    random: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Quantizes a flat array: (uint8 codes of len(x), fp32 absmax per block).

  With ``code_bits=4`` the codes are 4-bit (one a uint8, unpacked) and the
  blocks 128 values long; ``random`` (uint32 per element, signed 4-bit codes
  only) rounds them stochastically.
  """
  x = jnp.ravel(x).astype(jnp.float32)
  absmax = block_absmax(x, code_bits)
  scale = jnp.repeat(inverse_scale(absmax),
                     base.block_size(code_bits))[: x.shape[0]]
  if random is not None:
    if code_bits != 4 or not signed:
      raise ValueError('stochastic codes are 4-bit signed codes only')
    return encode_four_bit_stochastic(x * scale, random), absmax
  if code_bits == 4:
    return encode_four_bit(x * scale, signed), absmax
  return encode(x * scale, signed), absmax


def dequantize_blockwise(
    codes: jax.Array, absmax: jax.Array, signed: bool = True,
    code_bits: int = 8
) -> jax.Array:
  """Float32 values of (unpacked) codes, one ``absmax`` per block."""
  values = jnp.asarray(map_values(signed, code_bits))[codes.astype(jnp.int32)]
  scale = jnp.repeat(absmax, base.block_size(code_bits))[: codes.shape[0]]
  return values * scale


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
  """4-bit codes, one a byte, packed two a byte as the registry holds them.

  Args:
    codes: a flat array of integer codes in [0, 15].

  Returns:
    ``ceil(len(codes) / 2)`` uint8 bytes, element ``2i`` in the low nibble.
  """
  codes = np.asarray(codes)
  if codes.ndim != 1 or not (
      codes.size == 0 or np.issubdtype(codes.dtype, np.integer)):
    raise TypeError(
        'pack_nibbles: codes must be a flat array of integers, got '
        f'{codes.dtype} of shape {codes.shape}.')
  if codes.size and not 0 <= int(codes.min()) <= int(codes.max()) <= 15:
    raise ValueError(
        'pack_nibbles: 4-bit codes are in [0, 15], got values in '
        f'[{int(codes.min())}, {int(codes.max())}].')
  codes = codes.astype(np.uint8)
  padded = np.pad(codes, (0, codes.shape[0] % 2))
  return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, size: int) -> np.ndarray:
  """The inverse of ``pack_nibbles`` for ``size`` codes.

  Args:
    packed: the flat uint8 bytes ``pack_nibbles`` returned for ``size``
      codes: exactly ``ceil(size / 2)`` of them.
    size: how many codes they hold.

  Returns:
    ``size`` uint8 codes in [0, 15].
  """
  packed = np.asarray(packed)
  if packed.ndim != 1 or packed.dtype != np.uint8:
    raise TypeError(
        'unpack_nibbles: packed must be a flat uint8 array, got '
        f'{packed.dtype} of shape {packed.shape}.')
  n = packed.shape[0]
  if (isinstance(size, bool) or not isinstance(size, (int, np.integer))
      or size < 0 or n != -(-int(size) // 2)):
    held = f'{2 * n - 1} or {2 * n}' if n else '0'
    raise ValueError(
        f'unpack_nibbles: {n} bytes hold the codes of {held} values, not '
        f'size={size!r}; pass the number of values they were packed from.')
  codes = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)
  return codes[:size].astype(np.uint8)
