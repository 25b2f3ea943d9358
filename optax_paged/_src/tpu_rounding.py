"""Stochastic rounding of the new parameters on the TPU path, with the
registry's random bits.

The fused step's ``stochastic_rounding`` rounds a bfloat16 parameter's
``p + update`` (float32) up or down as ``StochasticRound<BFloat16>`` of
ffi/element_types.h: 16 random bits added below bfloat16's last bit, then
truncated. The bits are ``RandomBits(seed, leaf, index)``: the splitmix64
finaliser of ``index + (leaf << 40) + 0x9e3779b97f4a7c15 * (seed + 1)``,
the seed being the incremented step count's bits and the index the
element's in the whole leaf. Mosaic has no 64-bit integers, so the 64-bit
arithmetic runs on (high, low) pairs of int32 bits (wrapping products,
logical shifts); the same ``jax.numpy`` functions run in the Pallas kernel
and in XLA (small leaves). Indices are under 2^32 (the TPU path's leaves).
"""

import jax
import jax.numpy as jnp
import numpy as np

# splitmix64's constants (ffi/element_types.h, RandomBits).
_GOLDEN = 0x9e3779b97f4a7c15
_MIX1 = 0xbf58476d1ce4e5b9
_MIX2 = 0x94d049bb133111eb


def _int32(u: int) -> np.int32:
  """A uint32 constant's bits as int32."""
  return np.array(u % 2**32, np.uint32).view(np.int32)


def _srl(x: jax.Array, n: int) -> jax.Array:
  return jax.lax.shift_right_logical(x, jnp.int32(n))


def _mulhi(a: jax.Array, b: int) -> jax.Array:
  """The high 32 bits of the 64-bit product of uint32 bits ``a`` and the
  uint32 constant ``b``, from 16-bit halves."""
  a0, a1 = a & 0xffff, _srl(a, 16)
  b0, b1 = _int32(b & 0xffff), _int32(b >> 16)
  p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
  middle = _srl(p00, 16) + (p01 & 0xffff) + (p10 & 0xffff)
  return a1 * b1 + _srl(p01, 16) + _srl(p10, 16) + _srl(middle, 16)


def _multiply(high: jax.Array, low: jax.Array, c: int):
  """(high, low) times the uint64 constant ``c``, modulo 2^64."""
  c_high, c_low = c >> 32, c % 2**32
  return (_mulhi(low, c_low) + low * _int32(c_high) + high * _int32(c_low),
          low * _int32(c_low))


def _xor_shift(high: jax.Array, low: jax.Array, n: int):
  """(high, low) ^ (high, low) >> n, 0 < n < 32."""
  return high ^ _srl(high, n), low ^ (_srl(low, n) | (high << (32 - n)))


def leaf_key(seed: jax.Array, leaf: int) -> jax.Array:
  """int32[2]: the (high, low) bits of ``(leaf << 40) + 0x9e3779b97f4a7c15
  * (seed + 1)``, RandomBits' counter less the index, for leaf ``leaf`` of
  the state at step ``seed`` (the incremented count)."""
  # seed + 1 as uint64: the count is non-negative int32, so it fits 32 bits.
  s = jnp.asarray(seed).astype(jnp.int32) + 1
  high, low = _multiply(jnp.int32(0), s, _GOLDEN)
  return jnp.stack([high + (jnp.int32(leaf) << 8), low])


def bits(high: jax.Array, low: jax.Array, index: jax.Array) -> jax.Array:
  """int32 bits of ``RandomBits``: the leaf's key (``leaf_key``) and the
  elements' int32 index bits (uint32 indices)."""
  new_low = low + index
  # The carry of the unsigned addition: the sum below an addend, compared
  # as signed with the sign bits flipped.
  flip = _int32(0x80000000)
  carry = jnp.where((new_low ^ flip) < (low ^ flip), 1, 0)
  high, low = high + carry, new_low
  high, low = _multiply(*_xor_shift(high, low, 30), _MIX1)
  high, low = _multiply(*_xor_shift(high, low, 27), _MIX2)
  return _xor_shift(high, low, 31)[1]


def new_param(param: jax.Array, update: jax.Array, dtype,
              random: jax.Array | None) -> jax.Array:
  """``OutputValue``'s stochastic mode: float32 ``param + update`` as
  ``dtype``, rounded stochastically with int32 ``random`` bits for
  bfloat16 (to nearest for other dtypes, exactly as the registry)."""
  x = param + update
  if jnp.dtype(dtype) != jnp.bfloat16:
    return x.astype(dtype)
  x_bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  rounded = jax.lax.bitcast_convert_type(
      (x_bits + (random & 0xffff)) & _int32(0xffff0000), jnp.float32)
  # Infinities and NaN round to nearest; the truncated value is exact in
  # bfloat16.
  finite = (x_bits & 0x7f800000) != 0x7f800000
  return jnp.where(finite, rounded, x).astype(dtype)
