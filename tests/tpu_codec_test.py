"""The TPU codec (lane gathers, binary search) against the CPU codec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from optax_paged import quantization
from optax_paged._src import quantization as quantization_lib
from optax_paged._src import tpu_codec

# On the CPU on any host: the comparisons hold as XLA:CPU rounds.
pytestmark = pytest.mark.usefixtures('on_cpu')

BLOCK = quantization.BLOCK_SIZE


def boundary_values(signed: bool) -> np.ndarray:
  """Every map entry, every midpoint and its float32 neighbours, on both
  sides of zero and zeros of both signs: |x| <= 1."""
  t = quantization_lib.tables(signed)
  mids = np.concatenate([t.positive, t.negative])
  near = np.concatenate([mids, np.nextafter(mids, np.float32(0)),
                         np.nextafter(mids, np.float32(2))])
  x = np.concatenate([t.values, near, -near, [0.0, -0.0],
                      np.random.default_rng(0).uniform(-1, 1, 3000)])
  x = x.astype(np.float32)
  return x[np.abs(x) <= 1]


def cpu_codes(scaled: np.ndarray, signed: bool) -> np.ndarray:
  """The compiled CPU codec's codes of already scaled values: each block
  of 255 of them gets a leading 1.0, so its absmax is 1 and its scale 1."""
  blocks = -(-scaled.size // (BLOCK - 1))
  padded = np.zeros(blocks * (BLOCK - 1), np.float32)
  padded[:scaled.size] = scaled
  x = np.concatenate([np.ones((blocks, 1), np.float32),
                      padded.reshape(blocks, BLOCK - 1)], axis=1)
  codes, absmax = quantization.quantize_blockwise(x.reshape(-1), signed=signed)
  assert np.all(np.asarray(absmax) == 1)
  return np.asarray(codes).reshape(blocks, BLOCK)[:, 1:].reshape(-1)[
      :scaled.size]


def lanes(x: np.ndarray, fill) -> np.ndarray:
  """x padded to whole rows of 128 lanes, as (rows, 128)."""
  rows = -(-x.size // 128)
  out = np.full(rows * 128, fill, x.dtype)
  out[:x.size] = x
  return out.reshape(rows, 128)


@pytest.mark.parametrize('signed', [True, False])
def test_encode_equals_cpu_codec_on_every_boundary(signed):
  x = boundary_values(signed)
  _, midpoints = tpu_codec.tables(signed)
  ours = jax.jit(lambda s: tpu_codec.encode(s, jnp.asarray(midpoints), signed))(
      lanes(x, np.float32(0))).reshape(-1)[:x.size]
  np.testing.assert_array_equal(np.asarray(ours), cpu_codes(x, signed))


@pytest.mark.parametrize('signed', [True, False])
def test_encode_out_of_range_as_reference(signed):
  # |x| > 1 (a negative absmax block's -1 scaled, infinities) and NaN,
  # which a block's absmax hides from the CPU codec's input: the jnp
  # reference's answer, proven equal to the CPU codec's in
  # quantization_test (NaN: the zero code, as ffi/quantization.h's Encode).
  x = np.array([1.5, -1.5, np.inf, -np.inf, 3e38, -3e38, 1.0000001, np.nan,
                -np.nan], np.float32)
  _, midpoints = tpu_codec.tables(signed)
  ours = np.asarray(tpu_codec.encode(jnp.asarray(lanes(x, np.float32(0))),
                                     jnp.asarray(midpoints), signed))
  expected = np.asarray(quantization_lib.encode(jnp.asarray(x), signed))
  np.testing.assert_array_equal(ours.reshape(-1)[:x.size], expected)


@pytest.mark.parametrize('signed', [True, False])
def test_decode_every_code(signed):
  codes = np.arange(256, dtype=np.int32).reshape(2, 128)
  values, _ = tpu_codec.tables(signed)
  ours = np.asarray(tpu_codec.decode(jnp.asarray(codes), jnp.asarray(values)))
  absmax = np.ones(1, np.float32)
  cpu = quantization.dequantize_blockwise(
      np.arange(256, dtype=np.uint8), absmax, signed=signed)
  np.testing.assert_array_equal(ours.reshape(-1), np.asarray(cpu))


@pytest.mark.parametrize('signed', [True, False])
def test_codec_in_a_pallas_tpu_kernel(signed):
  """The same functions inside a Pallas TPU kernel (TPU interpreter):
  decode then encode gives every code back."""
  values, midpoints = tpu_codec.tables(signed)

  def kernel(codes_ref, values_ref, mids_ref, out_ref):
    decoded = tpu_codec.decode(codes_ref[...], values_ref[...])
    out_ref[...] = tpu_codec.encode(decoded, mids_ref[...], signed)

  codes = np.tile(np.arange(256, dtype=np.int32).reshape(2, 128), (4, 1))
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(codes.shape, jnp.int32),
      interpret=pltpu.InterpretParams())(codes, values, midpoints)
  # The map's entries are distinct: each decodes and encodes to itself.
  np.testing.assert_array_equal(np.asarray(out), codes)
