"""The quantization maps against the ones bitsandbytes builds."""

import pathlib

import numpy as np
import pytest

from optax_paged import quantization
from optax_paged._src import ffi

DATA = pathlib.Path(__file__).parent / 'data'


@pytest.fixture(scope='module')
def bitsandbytes_data():
  return np.load(DATA / 'bitsandbytes_0_50_2_blockwise.npz')


@pytest.mark.parametrize('signed', [True, False])
class TestDynamicMap:

  def test_numpy_construction_equals_bitsandbytes(
      self, signed, bitsandbytes_data
  ):
    recorded = bitsandbytes_data['signed_map' if signed else 'unsigned_map']
    built = quantization.create_dynamic_map(signed=signed)
    np.testing.assert_array_equal(
        built.view(np.uint32), recorded.view(np.uint32)
    )

  def test_compiled_map_equals_bitsandbytes(self, signed, bitsandbytes_data):
    recorded = bitsandbytes_data['signed_map' if signed else 'unsigned_map']
    compiled = quantization.dynamic_map(signed=signed)
    np.testing.assert_array_equal(
        compiled.view(np.uint32), recorded.view(np.uint32)
    )

  def test_map_shape(self, signed):
    values = quantization.dynamic_map(signed=signed)
    assert values.shape == (256,) and values.dtype == np.float32
    assert np.all(np.diff(values) > 0), 'map must be strictly increasing'
    assert values[-1] == 1.0
    assert np.count_nonzero(values == 0) == 1
    if signed:
      assert values[0] < 0
    else:
      assert values[0] == 0

  def test_lookup_buckets_hold_at_most_one_midpoint(self, signed):
    # Encode does one comparison after the bucket lookup; that is exact only
    # if no bucket holds two midpoints.
    assert ffi.extension().testing.max_midpoints_per_bucket(signed=signed) <= 1


def test_create_dynamic_map_rejects_impossible_layout():
  with pytest.raises(ValueError, match='max_exponent_bits'):
    quantization.create_dynamic_map(signed=True, max_exponent_bits=9)
