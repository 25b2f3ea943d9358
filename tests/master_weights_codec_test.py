"""The master-weight codec in jax.numpy (what the kernels compute)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_paged._src import master_weights

SIXTEEN_BIT = [jnp.bfloat16, jnp.float16]


def _masters(n: int, seed: int) -> np.ndarray:
  """float32 values over many binades, with powers of two, the values just
  below them, exact ties of bf16 and fp16, and zeros."""
  rng = np.random.default_rng(seed)
  magnitude = 2.0 ** rng.uniform(-20, 15, n)
  values = (rng.choice([-1, 1], n) * magnitude).astype(np.float32)
  powers = (2.0 ** np.arange(-20, 15)).astype(np.float32)
  below = np.nextafter(powers, np.float32(0))
  bf16_ties = (np.asarray(values[:64], np.float32).view(np.uint32)
               & 0xffff0000 | 0x8000).view(np.float32)
  fp16_ties = (np.asarray(values[:64], np.float16).astype(np.float32)
               + np.spacing(np.asarray(values[:64], np.float16)).astype(
                   np.float32) / 2)
  return np.concatenate([values, powers, -powers, below, -below, bf16_ties,
                         fp16_ties, np.zeros(4, np.float32)])


def _nearest_ties_up(x: np.ndarray, dtype) -> np.ndarray:
  """The rounding in float64, from the two neighbours, as the docs say."""
  low = np.asarray(x, dtype)
  low_f = low.astype(np.float64)
  # Round down first: the nearest below or at x.
  down = np.where(low_f > x, np.nextafter(low, np.asarray(-np.inf, dtype)),
                  low)
  up = np.nextafter(down, np.asarray(np.inf, dtype))
  d_down = x.astype(np.float64) - down.astype(np.float64)
  d_up = up.astype(np.float64) - x.astype(np.float64)
  return np.where(d_down == 0, down, np.where(d_up <= d_down, up, down))


@pytest.mark.parametrize('dtype', SIXTEEN_BIT, ids=lambda d: d.__name__)
def test_rounding_is_to_nearest_with_ties_up(dtype):
  x = _masters(4096, 0)
  x = x[np.abs(x) < 60000]
  got = np.asarray(master_weights.round_ties_up(jnp.asarray(x), dtype))
  np.testing.assert_array_equal(got.view(np.uint16),
                                _nearest_ties_up(x, dtype).view(np.uint16))


def test_sixteen_bits_keep_a_bf16_parameter_s_float32_master_exactly():
  x = jnp.asarray(_masters(8192, 1))
  param = master_weights.round_ties_up(x, jnp.bfloat16)
  correction = master_weights.encode(x, param, 16)
  assert int(jnp.min(correction)) >= -32768
  assert int(jnp.max(correction)) <= 32767
  decoded = master_weights.decode(param, correction.astype(jnp.int16), 16)
  np.testing.assert_array_equal(np.asarray(decoded).view(np.uint32),
                                np.asarray(x).view(np.uint32))


def test_sixteen_bits_keep_an_fp16_parameter_s_master_in_its_normal_range():
  x = _masters(8192, 2)
  x = jnp.asarray(x[(np.abs(x) >= 2.0 ** -14) & (np.abs(x) < 65000)])
  param = master_weights.round_ties_up(x, jnp.float16)
  decoded = master_weights.decode(
      param, master_weights.encode(x, param, 16).astype(jnp.int16), 16)
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(x))


@pytest.mark.parametrize('dtype', SIXTEEN_BIT, ids=lambda d: d.__name__)
def test_eight_bits_are_within_half_a_unit_of_the_gap(dtype):
  x = _masters(8192, 3)
  x = jnp.asarray(x[np.abs(x) < 60000])
  param = master_weights.round_ties_up(x, dtype)
  correction = master_weights.encode(x, param, 8)
  decoded = master_weights.decode(param, correction.astype(jnp.int8), 8)
  up = np.asarray(x) > np.asarray(param.astype(jnp.float32))
  gap = np.asarray(master_weights.gap_toward(param, jnp.asarray(up)))
  error = np.abs(np.asarray(decoded, np.float64) - np.asarray(x, np.float64))
  # Half a unit of gap / 256, plus the one unit a clamped offset loses.
  assert np.all(error <= gap / 256 + np.spacing(np.abs(np.asarray(x))))
  # Never farther than the parameter, and closer wherever the parameter is
  # off by a unit or more.
  param_error = np.abs(np.asarray(param.astype(jnp.float32), np.float64)
                       - np.asarray(x, np.float64))
  assert np.all(error <= param_error)
  off = (param_error >= gap / 256) & (param_error > 0)
  assert off.sum() > len(off) // 2
  assert np.all(error[off] < param_error[off])


def test_non_finite_parameters_keep_no_correction():
  param = jnp.asarray([np.inf, -np.inf, np.nan, 65504.0], jnp.float16)
  master = jnp.asarray([np.inf, -np.inf, np.nan, 65519.0], jnp.float32)
  correction = master_weights.encode(master, param, 16)
  np.testing.assert_array_equal(np.asarray(correction)[:3], 0)
  # The largest finite fp16 has no neighbour above: nothing to reach.
  assert int(correction[3]) == 0


def test_a_changed_element_changes_its_block_s_fingerprint():
  param = jax.random.normal(jax.random.PRNGKey(0), (300,)).astype(
      jnp.bfloat16)
  before = master_weights.fingerprints(param)
  assert before.shape == (3,)
  for index in (0, 127, 128, 299):
    changed = param.at[index].set(param[index] + 1)
    after = master_weights.fingerprints(changed)
    block = index // 128
    assert int(after[block]) != int(before[block])
    np.testing.assert_array_equal(np.delete(np.asarray(after), block),
                                  np.delete(np.asarray(before), block))
  swapped = param.at[0].set(param[1]).at[1].set(param[0])
  assert int(master_weights.fingerprints(swapped)[0]) != int(before[0])


@pytest.mark.parametrize('value', [16, 64, 24.0, True, '24'])
def test_master_weight_bits_must_be_24_or_32(value):
  with pytest.raises((TypeError, ValueError), match='master_weight_bits'):
    master_weights.check_bits('master_weight_bits', value)
