"""Blockwise quantization: compiled kernels, the jnp reference, bitsandbytes."""

import pathlib

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from optax_paged import quantization
from optax_paged._src import ffi

DATA = pathlib.Path(__file__).parent / 'data'
BLOCK = quantization.BLOCK_SIZE


def nearest_distance(values: np.ndarray, scaled: np.ndarray) -> np.ndarray:
  """Distance from each scaled value to its nearest map entry (brute force)."""
  return np.min(np.abs(scaled[:, None] - values[None, :]), axis=1)


def scaled_inputs(x: np.ndarray, absmax: np.ndarray) -> np.ndarray:
  inverse = np.where(absmax > 0, 1 / np.where(absmax > 0, absmax, 1), 0)
  return x * np.repeat(inverse.astype(np.float32), BLOCK)[: x.size]


def random_values(seed: int, n: int, signed: bool) -> np.ndarray:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(n) * np.exp(rng.uniform(-14, 3, n))
  x = x.astype(np.float32)
  return x if signed else np.abs(x)


@pytest.mark.parametrize('signed', [True, False])
class TestQuantizeBlockwise:

  @pytest.mark.parametrize('n', [1, 255, 256, 257, 4095, 4096, 10_000])
  def test_codes_are_nearest_map_entries(self, signed, n):
    x = random_values(n, n, signed)
    codes, absmax = quantization.quantize_blockwise(x, signed=signed)
    assert codes.shape == (n,) and codes.dtype == np.uint8
    assert absmax.shape == (-(-n // BLOCK),) and absmax.dtype == np.float32
    blocks = np.pad(np.abs(x), (0, absmax.size * BLOCK - n)).reshape(-1, BLOCK)
    np.testing.assert_array_equal(absmax, blocks.max(axis=1))
    values = quantization.dynamic_map(signed)
    scaled = scaled_inputs(x, absmax)
    chosen = np.abs(values[codes] - scaled)
    best = nearest_distance(values, scaled)
    # Nearest is decided by float32 midpoints: at most half an ulp of slack.
    slack = np.spacing(np.abs(scaled).astype(np.float32))
    assert np.all(chosen <= best + slack)

  @pytest.mark.parametrize('n', [1, 257, 4096, 70_001])
  def test_compiled_equals_reference(self, signed, n):
    x = random_values(7 * n, n, signed)
    codes, absmax = quantization.quantize_blockwise(x, signed=signed)
    ref_codes, ref_absmax = quantization.reference_quantize_blockwise(
        jnp.asarray(x), signed=signed
    )
    np.testing.assert_array_equal(codes, np.asarray(ref_codes))
    np.testing.assert_array_equal(absmax, np.asarray(ref_absmax))
    np.testing.assert_array_equal(
        quantization.dequantize_blockwise(codes, absmax, signed=signed),
        np.asarray(
            quantization.reference_dequantize_blockwise(
                ref_codes, ref_absmax, signed=signed
            )
        ),
    )

  def test_round_trip_error_within_map_resolution(self, signed):
    x = random_values(3, 64 * BLOCK, signed)
    codes, absmax = quantization.quantize_blockwise(x, signed=signed)
    y = quantization.dequantize_blockwise(codes, absmax, signed=signed)
    values = quantization.dynamic_map(signed)
    # Error of each element is at most half the gap around its code, scaled.
    gaps = np.diff(values)
    upper = np.append(gaps, 0)[codes]
    lower = np.insert(gaps, 0, 0)[codes]
    scale = np.repeat(absmax, BLOCK)
    half_gap = 0.5 * np.maximum(upper, lower) * scale
    # The signed map ends at -0.993, not -1: values below it clamp to it.
    below_map = x < values[0] * scale
    np.testing.assert_array_equal(y[below_map], (values[0] * scale)[below_map])
    inside = ~below_map
    assert np.all(
        np.abs(x - y)[inside] <= half_gap[inside] * (1 + 1e-6) + 1e-30
    )
    # And the block's largest magnitude survives exactly (up to sign).
    for b in range(absmax.size):
      block = x[b * BLOCK:(b + 1) * BLOCK]
      i = np.argmax(np.abs(block))
      if signed and block[i] < 0:
        continue  # -1.0 is not in the signed map; its nearest is -0.993
      assert y[b * BLOCK + i] == block[i]

  def test_zeros(self, signed):
    codes, absmax = quantization.quantize_blockwise(
        np.zeros(300, np.float32), signed=signed
    )
    np.testing.assert_array_equal(absmax, [0, 0])
    zero_code = int(np.flatnonzero(quantization.dynamic_map(signed) == 0)[0])
    np.testing.assert_array_equal(codes, zero_code)
    np.testing.assert_array_equal(
        quantization.dequantize_blockwise(codes, absmax, signed), 0
    )

  def test_tiny_and_huge_magnitudes(self, signed):
    x = np.array([1e-38, 1e-30, 3e38, 1e-45, 2e-7, 1.0], np.float32)
    if signed:
      x[1::2] *= -1
    codes, absmax = quantization.quantize_blockwise(x, signed=signed)
    y = quantization.dequantize_blockwise(codes, absmax, signed)
    assert absmax[0] == np.float32(3e38)
    # 3e38 survives exactly; everything far below absmax * 5.5e-7 becomes 0.
    assert abs(y[2]) == np.float32(3e38)
    np.testing.assert_array_equal(y[[0, 1, 3, 4, 5]], 0)
    assert np.all(np.isfinite(y))


def test_negative_values_in_unsigned_map_encode_as_zero():
  codes, absmax = quantization.quantize_blockwise(
      np.array([-1.0, 0.5, 1.0], np.float32), signed=False
  )
  y = quantization.dequantize_blockwise(codes, absmax, signed=False)
  assert y[0] == 0 and y[2] == 1.0


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_input_poisons_only_its_block(bad):
  x = random_values(0, 3 * BLOCK, True)
  x[BLOCK + 5] = bad
  codes, absmax = quantization.quantize_blockwise(x, signed=True)
  y = quantization.dequantize_blockwise(codes, absmax, signed=True)
  assert np.all(np.isfinite(y[:BLOCK])) and np.all(np.isfinite(y[2 * BLOCK:]))
  assert not np.isfinite(absmax[1])
  assert np.all(~np.isfinite(y[BLOCK:2 * BLOCK]))
  ref_codes, ref_absmax = quantization.reference_quantize_blockwise(
      jnp.asarray(x), signed=True
  )
  np.testing.assert_array_equal(codes, np.asarray(ref_codes))
  np.testing.assert_array_equal(absmax, np.asarray(ref_absmax))


def test_never_worse_than_bitsandbytes_cpu_quantizer():
  # bitsandbytes 0.50.2's native CPU quantizer does not always pick the
  # nearest entry for tiny values; ours must be at least as close everywhere.
  data = np.load(DATA / 'bitsandbytes_0_50_2_blockwise.npz')
  for signed, prefix in ((True, 'signed'), (False, 'unsigned')):
    x = data[f'{prefix}_x']
    codes, absmax = quantization.quantize_blockwise(x, signed=signed)
    np.testing.assert_array_equal(absmax, data[f'{prefix}_absmax'])
    ours = quantization.dequantize_blockwise(codes, absmax, signed)
    theirs = quantization.dequantize_blockwise(
        data[f'{prefix}_codes'], data[f'{prefix}_absmax'], signed
    )
    slack = np.spacing(np.repeat(absmax, BLOCK)[: x.size])
    assert np.all(np.abs(ours - x) <= np.abs(theirs - x) + slack)


def test_dequantize_rejects_wrong_absmax_length():
  with pytest.raises(ValueError, match='absmax'):
    quantization.dequantize_blockwise(
        np.zeros(300, np.uint8), np.zeros(1, np.float32)
    )


def test_dequantize_rejects_non_uint8_codes():
  with pytest.raises(TypeError, match='uint8'):
    quantization.dequantize_blockwise(
        np.zeros(10, np.int32), np.zeros(1, np.float32)
    )


_FINITE_ARRAYS = hnp.arrays(
    np.float32,
    st.integers(1, 700),
    # XLA's CPU code flushes subnormals to zero, so the reference cannot
    # say what a subnormal encodes as, nor a block whose absmax is above
    # 8.5e37 (its reciprocal is subnormal).
    elements=st.floats(
        -float(np.float32(1e37)), float(np.float32(1e37)),
        allow_subnormal=False, width=32,
    ),
)


# The reference as one compiled program: a new length then costs one
# compilation instead of one per operation. (test_compiled_equals_reference
# runs it op by op.) A max, a reciprocal, one multiply and compares leave
# fusion nothing to reassociate or contract.
_jitted_reference = jax.jit(quantization.reference_quantize_blockwise,
                            static_argnames=('signed', 'code_bits'))


def _assert_compiled_equals_reference(x, signed):
  if not signed:
    x = np.abs(x)
  codes, absmax = quantization.quantize_blockwise(x, signed=signed)
  ref_codes, ref_absmax = _jitted_reference(jnp.asarray(x), signed=signed)
  np.testing.assert_array_equal(codes, np.asarray(ref_codes))
  np.testing.assert_array_equal(absmax, np.asarray(ref_absmax))


# Each new length compiles the reference again: 10 examples here, 40 in the
# fuzz run (-m fuzz).
@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(x=_FINITE_ARRAYS, signed=st.booleans())
def test_compiled_and_reference_agree_on_any_finite_input(x, signed):
  _assert_compiled_equals_reference(x, signed)


@pytest.mark.fuzz
@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(x=_FINITE_ARRAYS, signed=st.booleans())
def test_compiled_and_reference_agree_on_many_finite_inputs(x, signed):
  _assert_compiled_equals_reference(x, signed)


def _bit_pattern_sweep(signed: bool) -> np.ndarray:
  """Floats around every bucket edge and every midpoint of the map.

  Every exponent from far below the smallest code to far above 1, every
  value of the 7 mantissa bits that pick a bucket, and low bits at both ends
  of the bucket and in between; the midpoints themselves and their
  neighbours; zeros, subnormals, infinities and NaN; both signs.
  """
  rng = np.random.default_rng(0)
  exponent = np.arange(70, 140, dtype=np.uint32)[:, None, None]
  bucket = np.arange(128, dtype=np.uint32)[None, :, None]
  low = np.concatenate([[0, 1, 0x7fff, 0x8000, 0xfffe, 0xffff],
                        rng.integers(0, 1 << 16, 10)]).astype(np.uint32)
  bits = (exponent << 23) | (bucket << 16) | low[None, None, :]
  values = quantization.dynamic_map(signed).astype(np.float32)
  midpoints = np.sort((values[1:] + values[:-1]) / np.float32(2))
  around = midpoints.view(np.uint32)[:, None] + np.arange(-2, 3).astype(
      np.int64)[None, :]
  special = np.array([0.0, 1e-45, 1e-40, 1.1754942e-38, np.inf, np.nan],
                     np.float32)
  x = np.concatenate([
      bits.ravel().view(np.float32),
      around.astype(np.uint32).ravel().view(np.float32),
      values, special,
  ])
  return np.concatenate([x, -x])


def _assert_same_codes(x, scalar, other):
  mismatch = np.flatnonzero(scalar != other)
  assert mismatch.size == 0, (x[mismatch[:5]], scalar[mismatch[:5]],
                              other[mismatch[:5]])


@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('inverse', [1.0, 0.37, 3.0e-8])
def test_vector_codec_equals_scalar_encode_bit_for_bit(signed, inverse):
  ext = ffi.extension().testing
  x = _bit_pattern_sweep(signed)
  _assert_same_codes(x, ext.encode_scaled(x, inverse, signed, False),
                     ext.encode_scaled(x, inverse, signed, True))
  # Unscaled, the sweep reaches (nearly) every code.
  assert len(np.unique(ext.encode_scaled(x, 1.0, signed, False))) >= 250


@pytest.mark.skipif(not ffi.extension().testing.has_avx512(),
                    reason='this CPU has no AVX-512 (the encode never uses it)')
@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('inverse', [1.0, 0.37, 3.0e-8])
def test_avx512_codec_equals_scalar_encode_bit_for_bit(signed, inverse):
  ext = ffi.extension().testing
  x = _bit_pattern_sweep(signed)
  _assert_same_codes(x, ext.encode_scaled(x, inverse, signed, False),
                     ext.encode_scaled_avx512(x, inverse, signed))


@pytest.mark.parametrize('length', [1, 7, 8, 9, 255, 256, 1000])
def test_block_absmax_vector_equals_scalar_and_numpy(length):
  # The kernel's absmax: the largest magnitude, NaN when the block has one
  # (its bit pattern, sign cleared: the largest pattern), whatever the
  # vector width and the position of the special values.
  ext = ffi.extension().testing
  rng = np.random.default_rng(length)
  specials = np.array([np.inf, -np.inf, np.nan, -0.0, 1e-45, -3e38],
                      np.float32)
  for trial in range(20):
    x = (rng.standard_normal(length) * np.exp(
        rng.uniform(-30, 30, length))).astype(np.float32)
    if trial % 2:
      at = rng.integers(0, length, size=min(length, 2))
      x[at] = rng.choice(specials, size=at.size)
    scalar = ext.block_absmax(x, False)
    vector = ext.block_absmax(x, True)
    expected = np.max(np.abs(x))
    assert np.float32(scalar).view(np.uint32) == np.float32(vector).view(
        np.uint32)
    if np.isnan(expected):
      assert np.isnan(scalar)
    else:
      assert scalar == expected


@pytest.mark.parametrize('size', [0, 1, 2, 7, 256])
def test_nibbles_round_trip(size):
  codes = np.random.default_rng(size).integers(0, 16, size).astype(np.uint8)
  packed = quantization.pack_nibbles(codes)
  assert packed.shape == (-(-size // 2),)
  np.testing.assert_array_equal(quantization.unpack_nibbles(packed, size),
                                codes)


@pytest.mark.parametrize('codes', [[16, 3], [-1, 3], [255]])
def test_pack_nibbles_refuses_values_outside_four_bits(codes):
  with pytest.raises(ValueError, match=r'\[0, 15\]'):
    quantization.pack_nibbles(codes)


def test_pack_nibbles_refuses_fractions_and_matrices():
  with pytest.raises(TypeError, match='integers'):
    quantization.pack_nibbles(np.array([1.7, 3.0]))
  with pytest.raises(TypeError, match='flat'):
    quantization.pack_nibbles(np.zeros((2, 2), np.uint8))


@pytest.mark.parametrize('size', [1000, 49, 46, -1])
def test_unpack_nibbles_refuses_a_size_the_bytes_do_not_hold(size):
  # 24 bytes hold 47 or 48 codes: more would be invented, fewer dropped.
  with pytest.raises(ValueError, match='24 bytes hold the codes of 47 or 48'):
    quantization.unpack_nibbles(np.zeros(24, np.uint8), size)


def test_unpack_nibbles_refuses_bytes_that_are_not_uint8():
  with pytest.raises(TypeError, match='uint8'):
    quantization.unpack_nibbles(np.zeros(24, np.int32), 48)
