"""The TPU path's 4-bit codec (``tpu_codec4``) against the CPU codec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from optax_paged import quantization
from optax_paged._src import ffi
from optax_paged._src import quantization as quantization_lib
from optax_paged._src import tpu_codec
from optax_paged._src import tpu_codec4

# On the CPU on any host: the comparisons hold as XLA:CPU rounds.
pytestmark = pytest.mark.usefixtures('on_cpu')

BLOCK = 128  # 4-bit blocks


def midpoints(signed: bool) -> np.ndarray:
  values = quantization_lib.map_values(signed, 4)
  return (np.float32(0.5) * (values[:-1] + values[1:])).astype(np.float32)


def boundary_values(signed: bool) -> np.ndarray:
  """Every map entry, every midpoint and its float32 neighbours, on both
  sides of zero, zeros of both signs and random values: |x| <= 1."""
  values = quantization_lib.map_values(signed, 4)
  mids = np.abs(midpoints(signed))
  near = np.concatenate([mids, np.nextafter(mids, np.float32(0)),
                         np.nextafter(mids, np.float32(2))])
  x = np.concatenate([values, -values, near, -near, [0.0, -0.0],
                      np.random.default_rng(0).uniform(-1, 1, 2000)])
  x = x.astype(np.float32)
  return x[np.abs(x) <= 1]


def in_blocks(scaled: np.ndarray) -> np.ndarray:
  """Blocks of 128 whose first value is 1.0 (absmax 1, scale 1), then 127
  of the values: what the CPU codec encodes unscaled."""
  blocks = -(-scaled.size // (BLOCK - 1))
  padded = np.zeros(blocks * (BLOCK - 1), np.float32)
  padded[:scaled.size] = scaled
  return np.concatenate([np.ones((blocks, 1), np.float32),
                         padded.reshape(blocks, BLOCK - 1)], axis=1).reshape(-1)


def cpu_codes(x: np.ndarray, signed: bool, key: int | None = None,
              first_index: int = 0) -> np.ndarray:
  """The compiled CPU codec's codes (one a byte) of blocks with absmax 1;
  ``key``: stochastic rounding with that key."""
  packed, absmax = ffi.extension().testing.quantize_four_bit(
      x, signed, key is not None, 0 if key is None else key, first_index)
  assert np.all(np.asarray(absmax) == 1)
  return quantization.unpack_nibbles(np.asarray(packed), x.size)


def lanes(x: np.ndarray) -> np.ndarray:
  """x as (rows, 128), padded with zeros."""
  rows = -(-x.size // 128)
  out = np.zeros(rows * 128, x.dtype)
  out[:x.size] = x
  return out.reshape(rows, 128)


@pytest.mark.parametrize('signed', [True, False])
def test_encode_equals_cpu_codec_on_every_boundary(signed):
  x = in_blocks(boundary_values(signed))
  ours = jax.jit(lambda s: tpu_codec4.encode(s, signed))(lanes(x))
  np.testing.assert_array_equal(np.asarray(ours).reshape(-1)[:x.size],
                                cpu_codes(x, signed))


@pytest.mark.parametrize('signed', [True, False])
def test_encode_out_of_range_as_reference(signed):
  # |x| > 1, infinities and NaN, which a block's absmax hides from the CPU
  # codec's input: the jnp reference's answer (quantization_test proves it
  # the CPU codec's where the CPU sees them).
  x = np.array([1.5, -1.5, np.inf, -np.inf, 3e38, -3e38, 1.0000001, np.nan,
                -np.nan], np.float32)
  ours = np.asarray(tpu_codec4.encode(jnp.asarray(lanes(x)), signed))
  expected = np.asarray(quantization_lib.encode_four_bit(jnp.asarray(x),
                                                         signed))
  np.testing.assert_array_equal(ours.reshape(-1)[:x.size], expected)


@pytest.mark.parametrize('signed', [True, False])
def test_decode_every_code(signed):
  codes = np.tile(np.arange(16, dtype=np.int32), 8).reshape(1, 128)
  ours = np.asarray(tpu_codec4.decode(
      jnp.asarray(codes), jnp.asarray(tpu_codec4.signed_values()), signed))
  cpu = ffi.extension().testing.dequantize_four_bit(
      quantization.pack_nibbles(codes.reshape(-1)), np.ones(1, np.float32),
      signed, 128)
  np.testing.assert_array_equal(ours.reshape(-1), np.asarray(cpu))


def test_stochastic_encode_equals_cpu_codec():
  """Signed codes rounded with the leaf's hashed bits, as the CPU's
  ``EncodeFourBitStochastic``, from an element index past 2^31."""
  x = in_blocks(np.concatenate([boundary_values(True)] * 3))
  key, first = 0x9e3779b9, 2**31 + 5
  index = (np.arange(x.size, dtype=np.int64) + first).astype(np.uint32)

  def encode(scaled, index):
    random = tpu_codec4.mix32(index ^ tpu_codec4._int32(key))  # noqa: SLF001
    return tpu_codec4.encode_stochastic(
        scaled, random, jnp.asarray(tpu_codec4.signed_values()))

  ours = jax.jit(encode)(lanes(x), lanes(index.view(np.int32)))
  np.testing.assert_array_equal(np.asarray(ours).reshape(-1)[:x.size],
                                cpu_codes(x, True, key, first))


def test_rounding_bits_are_the_reference_bits():
  seed, leaf, n = jnp.int32(7), 3, 1000
  key = tpu_codec4.rounding_key(seed, leaf)
  ours = tpu_codec4.mix32(jnp.arange(n, dtype=jnp.int32) ^ key)
  expected = quantization_lib.state_rounding_bits(seed, leaf, n)
  np.testing.assert_array_equal(np.asarray(ours).view(np.uint32),
                                np.asarray(expected))


def test_nibble_layout_converts_to_the_registry_order():
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 16, 1000).astype(np.uint8)
  packed = tpu_codec4.from_registry_order(codes, fill=7)
  assert packed.size == 512  # two groups of 256
  # Byte j of a group: element j (low nibble) and j + 128 (high nibble).
  assert packed[3] == codes[3] | (codes[131] << 4)
  np.testing.assert_array_equal(
      tpu_codec4.to_registry_order(packed, codes.size), codes)
  np.testing.assert_array_equal(
      tpu_codec4.to_registry_order(packed, 1024)[1000:], 7)


@pytest.mark.parametrize('signed', [True, False])
def test_codec_in_a_pallas_tpu_kernel(signed):
  """Unpack, decode, encode and pack inside a Pallas TPU kernel (TPU
  interpreter): every code of both nibbles comes back."""
  values = tpu_codec4.signed_values()

  def kernel(packed_ref, values_ref, out_ref):
    halves = [tpu_codec4.encode(tpu_codec4.decode(c, values_ref[...], signed),
                                signed)
              for c in tpu_codec4.unpack(packed_ref[...])]
    out_ref[...] = tpu_codec4.pack(*halves).astype(jnp.uint8)

  rng = np.random.default_rng(2)
  packed = rng.integers(0, 256, (32, 256)).astype(np.uint8)
  packed[0, :256] = np.arange(256)
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(packed.shape, jnp.uint8),
      interpret=pltpu.InterpretParams())(packed, values)
  np.testing.assert_array_equal(np.asarray(out), packed)


def test_tables():
  # The negative side's midpoints are the positive side's first 7.
  mids = tpu_codec4.signed_midpoints()
  assert len(mids) == 8 and mids[-1] < 1
  assert tpu_codec.LANES == tpu_codec4.LANES
