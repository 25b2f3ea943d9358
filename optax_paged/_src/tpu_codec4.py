"""The 4-bit maps' decode and encode for TPU kernels, and their nibbles.

The 4-bit states (``ffi/quantization.h``: blocks of 128, torchao's maps)
have 16-entry maps, small enough that every operation here is a few
elementwise vector instructions:

- signed decode: ``values[code]`` is one lane gather from a row whose first
  16 lanes hold the map (``tpu_codec``'s lookup, which Mosaic lowers as
  ``tpu.dynamic_gather``): one instruction a vector register, where a select
  chain over the 16 entries would take 15 selects and 15 compares;
- unsigned decode: the linear map's ``(code + 1) / 16``, computed exactly
  (two operations), as ``DecodeFourBit`` does;
- signed encode: a compare-and-count of ``|x|`` against the 8 midpoints of
  the map's positive side, which are constants of the kernel: 16 vector
  operations, no table and no gather. A binary search would need three
  dependent lane gathers and as many selects for 8 entries; the count is as
  short and has no cross-lane work. The map is symmetric but for its entry
  1.0, so the negative side's 7 midpoints are the positive side's first 7
  (the same float32 sums, negated) and a negative value's count is clipped
  to 7, as ``tpu_codec`` does for the 8-bit map;
- unsigned encode: ``EncodeLinear16``'s closed form, ``ceil(clamp((32 x -
  3) / 2, 0, 15))``, every step exact in float32;
- stochastic signed encode (Lion's momentum): ``EncodeFourBitStochastic``
  step for step, with the same hashed random bits (``Mix32`` of the
  element's index in the leaf and the leaf's key) in int32 arithmetic,
  which wraps as the C++ uint32 arithmetic does.

Nibbles: the registry packs elements ``2i`` and ``2i + 1`` into one byte,
neighbouring lanes, which a TPU could only pair by shuffling lanes. The TPU
layout packs, within each group of 256 consecutive elements of a row (two
blocks of 128), element ``j`` into the low nibble and element ``j + 128``
into the high nibble of byte ``j``: the first block's codes and the second
block's are two whole vector registers, packed and unpacked with a shift, a
mask and an or, and the packed codes stay lane-dense (128 bytes a group).
``tpu_state`` converts to and from the registry's order.

``tests/tpu_codec4_test.py`` proves these functions equal to the CPU codec
on every code and on both sides of every midpoint.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import quantization
from optax_paged._src import tpu_codec

LANES = tpu_codec.LANES
# The signed map's zero entry (7 entries below it, 8 above).
SIGNED_ZERO = 7
# Elements a packed group holds: two blocks of 128, one in each nibble.
GROUP = 2 * LANES


@functools.cache
def signed_values() -> np.ndarray:
  """float32[1, 128]: the signed map in lanes 0-15 (the gather's row)."""
  out = np.zeros((1, LANES), np.float32)
  out[0, :16] = quantization.map_values(True, 4)
  return out


@functools.cache
def signed_midpoints() -> tuple[np.float32, ...]:
  """The 8 ascending midpoints of the signed map's positive side; the
  negative side's 7 are their first 7 (checked here)."""
  t = quantization.MapTables(quantization.map_values(True, 4))
  assert t.zero_code == SIGNED_ZERO
  assert np.array_equal(t.negative, t.positive[:SIGNED_ZERO])
  return tuple(np.float32(m) for m in t.positive)


def _srl(x: jax.Array, n: int) -> jax.Array:
  return jax.lax.shift_right_logical(x, jnp.int32(n))


def _int32(u: int) -> np.int32:
  """A uint32 constant's bits as int32."""
  return np.array(u, np.uint32).view(np.int32)


def decode(codes: jax.Array, values: jax.Array, signed: bool) -> jax.Array:
  """Map entries (float32) of int32 codes in [0, 15], shaped (rows, 128 k);
  ``values`` is ``signed_values()`` as an array (unused when unsigned)."""
  if signed:
    return tpu_codec._lookup(values, codes)  # noqa: SLF001 - one gather
  return (codes.astype(jnp.float32) + 1.0) * np.float32(0.0625)


def encode(scaled: jax.Array, signed: bool) -> jax.Array:
  """int32 codes of the entries nearest to scaled float32 values, as the
  CPU's ``EncodeFourBit``: ties to the smaller magnitude; NaN to the zero
  code (signed) or 0 (unsigned); the sign from the sign bit."""
  if not signed:
    half = (scaled * np.float32(32.0) - np.float32(3.0)) * np.float32(0.5)
    # where(t > 0) drops NaN as fmaxf does.
    clamped = jnp.minimum(jnp.where(half > 0, half, np.float32(0.0)),
                          np.float32(15.0))
    return jnp.ceil(clamped).astype(jnp.int32)
  negative = jax.lax.bitcast_convert_type(scaled, jnp.int32) < 0
  magnitude = jnp.abs(scaled)
  count = sum(jnp.where(magnitude > m, 1, 0) for m in signed_midpoints())
  codes = jnp.where(negative, SIGNED_ZERO - jnp.minimum(count, SIGNED_ZERO),
                    SIGNED_ZERO + count)
  return jnp.where(jnp.isnan(scaled), SIGNED_ZERO, codes)


def encode_stochastic(scaled: jax.Array, random: jax.Array,
                      values: jax.Array) -> jax.Array:
  """Signed int32 codes rounded stochastically with int32 ``random`` bits,
  as ``EncodeFourBitStochastic``: up when the distance from the entry below
  exceeds ``u`` times the gap, ``u = (random >>> 9) / 2^23``."""
  nearest = encode(scaled, True)
  low = jnp.where(decode(nearest, values, True) > scaled, nearest - 1,
                  nearest)
  low = jnp.clip(low, 0, 14)
  below = decode(low, values, True)
  gap = decode(low + 1, values, True) - below
  into = scaled - below
  u = jax.lax.bitcast_convert_type(
      _srl(random, 9) | _int32(0x3f800000), jnp.float32) - np.float32(1.0)
  return jnp.where(into > u * gap, low + 1, low)


def mix32(x: jax.Array) -> jax.Array:
  """``Mix32`` of ffi/quantization.h on int32 bits (wrapping products)."""
  x = x ^ _srl(x, 16)
  x = x * _int32(0x7feb352d)
  x = x ^ _srl(x, 15)
  x = x * _int32(0x846ca68b)
  return x ^ _srl(x, 16)


def rounding_key(seed: jax.Array, leaf: int) -> jax.Array:
  """int32 bits of ``StateRoundingKey(seed, leaf)``: the step's seed (the
  incremented count) and the leaf's index in the state."""
  seed = jnp.asarray(seed).astype(jnp.int32)
  inner = mix32(seed * _int32(0x9e3779b9) + _int32(0x7f4a7c15))
  return mix32(inner ^ (jnp.int32(leaf) * _int32(0x85ebca6b)))


def unpack(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(low, high) int32 codes of packed bytes (any int type)."""
  packed = packed.astype(jnp.int32)
  return packed & 15, _srl(packed, 4) & 15


def pack(low: jax.Array, high: jax.Array) -> jax.Array:
  """int32 bytes of two int32 codes in [0, 15]."""
  return low | (high << 4)


def to_registry_order(packed: np.ndarray, size: int) -> np.ndarray:
  """The first ``size`` element codes (uint8, one a byte) of packed bytes
  in the TPU layout (NumPy): groups of 128 bytes, low nibbles first."""
  groups = np.asarray(packed, np.uint8).reshape(-1, LANES)
  return np.concatenate([groups & 15, groups >> 4], axis=1).reshape(-1)[
      :size]


def from_registry_order(codes: np.ndarray, fill: int) -> np.ndarray:
  """Packed bytes in the TPU layout of element codes (NumPy), padded with
  ``fill`` to whole groups of 256."""
  padded = np.full(-(-codes.size // GROUP) * GROUP, fill, np.uint8)
  padded[:codes.size] = codes
  groups = padded.reshape(-1, GROUP)
  return (groups[:, :LANES] | (groups[:, LANES:] << 4)).reshape(-1)
