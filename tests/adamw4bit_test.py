"""4-bit AdamW: kernels against the reference, state, checkpoints, quality."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged import quantization
from optax_paged._src import quantization as jnp_quantization
from optax_paged._src import reference
from tests.helpers import DTYPES
from tests.helpers import FOUR_BIT_EDGE_SHAPES
from tests.helpers import compare_one_step_exactly
from tests.helpers import jitted_step
from tests.helpers import random_grads
from tests.helpers import random_tree
from tests.helpers import reference_state_from
from tests.helpers import teacher_problem
from tests.helpers import train


@pytest.mark.parametrize('dtype', DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize('shape', FOUR_BIT_EDGE_SHAPES, ids=str)
def test_kernel_equals_reference(shape, dtype):
  """Each step from the same moments, bit for bit (on the CPU kernel)."""
  params = random_tree([shape], dtype, seed=1)
  kwargs = dict(learning_rate=1e-3, weight_decay=0.01, min_8bit_size=1)
  tx = optax_paged.adamw4bit(**kwargs)
  ref_tx = reference.adamw8bit(**kwargs, code_bits=4)
  state = tx.init(params)
  for i in range(4):
    ref_state = reference_state_from(state, params)
    grads = random_grads(params, i, scale=10.0 ** -i)
    state, _ = compare_one_step_exactly(state, ref_state, params, grads, tx,
                                        ref_tx)


def _moments_of(state, params):
  """The moments of the state's only leaf, codes unpacked."""
  (moments,) = reference_state_from(state, params).moments.values()
  return moments


def test_state_is_about_one_byte_a_parameter():
  params = {'w': jnp.zeros((1024, 4096)), 'bias': jnp.zeros((4096,)),
            'tiny': jnp.zeros((10,))}
  report = optax_paged.memory_report(
      optax_paged.adamw4bit(1e-3).init(params))
  rows = {row.path: row for row in report.rows}
  assert rows["['w']"].bits == 4 and rows["['tiny']"].bits == 32
  # Codes: half a byte; absmax: 4 bytes a block of 128; two moments.
  assert rows["['w']"].bytes / (1024 * 4096) <= 1.07
  assert rows["['w']"].bytes / (1024 * 4096) >= 1.0625


def test_second_moment_is_never_decoded_as_zero():
  # One huge gradient in a block: 8-bit codes would round the small second
  # moments beside it to zero; the linear 4-bit map's smallest entry is
  # 1/16 of the block's absmax.
  params = {'w': jnp.zeros((256,))}
  tx = optax_paged.adamw4bit(1e-3, min_8bit_size=1)
  state = tx.init(params)
  grads = {'w': jnp.full((256,), 1e-4).at[0].set(10.0)}
  _, state = jax.jit(tx.update)(grads, state, params)
  moments = _moments_of(state, params)
  v = jnp_quantization.dequantize_blockwise(
      moments[1].codes, moments[1].absmax, signed=False, code_bits=4)
  assert float(jnp.min(v)) > 0.0
  np.testing.assert_allclose(float(jnp.min(v[:128])), float(v[0]) / 16,
                             rtol=1e-6)


def test_state_dict_round_trip_and_bits_mismatch_refused():
  params = random_tree([(64, 80), (7,)], seed=3)
  tx = optax_paged.adamw4bit(1e-2, min_8bit_size=1000)
  state = tx.init(params)
  for i in range(2):
    _, state = jax.jit(tx.update)(random_grads(params, i), state, params)
  saved = optax_paged.state_dict(state)
  assert int(saved['code_bits']) == 4 and int(saved['block_size']) == 128
  assert saved['leaves'][0]['moments'][0]['codes'].shape == (64 * 80 // 2,)
  assert saved['leaves'][0]['moments'][0]['absmax'].shape == (40,)
  restored = optax_paged.load_state_dict(tx.init(params), saved)
  for a, b in zip(jax.tree.leaves(optax_paged.state_dict(restored)),
                  jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  eight = optax_paged.adamw8bit(1e-2, min_8bit_size=1000)
  target = eight.init(params)
  before = optax_paged.state_dict(target)
  with pytest.raises(ValueError, match='4-bit moments, the state 8-bit'):
    optax_paged.load_state_dict(target, saved)
  for a, b in zip(jax.tree.leaves(optax_paged.state_dict(target)),
                  jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _dequantized(state, shape):
  leaf = optax_paged.state_dict(state)['leaves'][0]
  size = int(np.prod(shape))
  return [
      jnp_quantization.dequantize_blockwise(
          jnp.asarray(quantization.unpack_nibbles(m['codes'], size)),
          m['absmax'], signed=signed, code_bits=4).reshape(shape)
      for m, signed in zip(leaf['moments'], (True, False), strict=True)
  ]


@pytest.mark.parametrize('shape', [
    (256, 4097),
    # bitsandbytes' size, 4 times the default run's: a longer run (-m slow).
    pytest.param((1024, 4097), marks=pytest.mark.slow),
], ids=str)
def test_stays_close_to_optax_adam_over_50_steps(shape):
  """The 8-bit test's trajectory (bitsandbytes' test) at 4 bits.

  optax.adam continues from our parameters and dequantized moments every 10
  steps, so the quantization error of up to 10 steps accumulates between
  syncs. Measured here (CPU, 2026-11-26): the mean absolute error peaks at
  5.3e-4 for 4 bits against 3.8e-5 for 8 bits on the same run (the 8-bit
  test's bound is 6e-5): 14 times larger, as 16 levels against 256 (7 on the
  negative side of the first moment's map) lead one to expect. The bound is
  the measured peak with a margin of 1.5. The error is a mean over
  elements of one distribution: a quarter of the rows (the default run)
  peaks at the same 5.3e-4 (measured, CPU).
  """
  p0 = jax.random.normal(jax.random.PRNGKey(0), shape) * 0.1
  ours = optax_paged.paged_adamw4bit(1e-3, weight_decay=0.0)
  theirs = optax.adam(1e-3)
  step_ours, step_theirs = jitted_step(ours), jitted_step(theirs)
  p1, s1 = p0, ours.init(p0)
  p2, s2 = p0, theirs.init(p0)
  for i in range(50):
    g = jax.random.normal(jax.random.PRNGKey(100 + i), shape) * 0.01
    p1, s1 = step_ours(p1, s1, g)
    p2, s2 = step_theirs(p2, s2, g)
    err = np.abs(np.asarray(p1) - np.asarray(p2))
    assert err.mean() < 8e-4, (i, err.mean())
    if (i + 1) % 10 == 0:
      m, v = _dequantized(s1, shape)
      p2, s2 = p1, (s2[0]._replace(mu=m, nu=v),) + tuple(s2[1:])


def test_training_reaches_optax_adamw_loss():
  params, loss_fn = teacher_problem()
  kwargs = dict(learning_rate=3e-3, weight_decay=1e-4)
  ours, first = train(
      optax_paged.paged_adamw4bit(**kwargs, min_8bit_size=1024),
      params, loss_fn, 300,
  )
  theirs, _ = train(optax.adamw(**kwargs), params, loss_fn, 300)
  assert ours < 0.5 * first  # it trained
  # Measured (CPU, 2026-11-26): 0.417 against optax.adamw's 0.348 after 300
  # steps (+20%; +13% after 1000), where 8 bits reach 0.343. On this small
  # MLP 4-bit moments cost loss; the bound is the measured gap plus 10
  # points. The LM example measures the larger model (RESULTS.md).
  assert abs(ours - theirs) <= 0.3 * theirs, (ours, theirs)
