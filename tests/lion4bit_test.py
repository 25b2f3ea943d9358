"""4-bit Lion: kernels against the reference, state, checkpoints, quality."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import families
from optax_paged._src import quantization
from optax_paged._src import reference
from tests.helpers import DTYPES
from tests.helpers import FOUR_BIT_EDGE_SHAPES
from tests.helpers import compare_one_step_exactly
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
  tx = optax_paged.lion4bit(1e-3, weight_decay=0.01, min_8bit_size=1)
  ref_tx = reference.reference_transformation(
      families.spec('lion', 1e-3, weight_decay=0.01), min_8bit_size=1,
      code_bits=4)
  state = tx.init(params)
  for i in range(4):
    state, _ = compare_one_step_exactly(
        state, reference_state_from(state, params), params,
        random_grads(params, i, 10.0 ** -i), tx, ref_tx)


def test_state_is_about_half_a_byte_a_parameter():
  params = {'w': jnp.zeros((1024, 4096)), 'tiny': jnp.zeros((10,))}
  report = optax_paged.memory_report(optax_paged.lion4bit(1e-3).init(params))
  rows = {row.path: row for row in report.rows}
  assert rows["['w']"].bits == 4 and rows["['tiny']"].bits == 32
  # Half a byte of codes and 4 bytes of absmax a block of 128: 0.53125.
  assert 0.53125 <= rows["['w']"].bytes / (1024 * 4096) <= 0.535


def test_checkpoint_resume_is_bit_identical():
  tx = optax_paged.lion4bit(1e-3, min_8bit_size=256)
  params = random_tree([(64, 80), (301,), (3,)], seed=3)
  step = jax.jit(lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p))
  p_full, s_full = params, tx.init(params)
  for i in range(5):
    p_full, s_full = step(p_full, s_full, random_grads(params, i))
  p, s = params, tx.init(params)
  for i in range(2):
    p, s = step(p, s, random_grads(params, i))
  saved = optax_paged.state_dict(s)
  assert int(saved['code_bits']) == 4
  restored = optax_paged.load_state_dict(tx.init(params), saved)
  for i in range(2, 5):
    p, restored = step(p, restored, random_grads(params, i))
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_full), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='4-bit moments, the state 8-bit'):
    optax_paged.load_state_dict(
        optax_paged.lion8bit(1e-3, min_8bit_size=256).init(params), saved)


def test_training_reaches_optax_lion_loss():
  params, loss_fn = teacher_problem()
  kwargs = dict(learning_rate=3e-4, weight_decay=0.01)
  ours, first = train(optax_paged.paged_lion4bit(**kwargs, min_8bit_size=1024),
                      params, loss_fn, 300)
  theirs, _ = train(optax.lion(**kwargs), params, loss_fn, 300)
  assert ours < 0.8 * first  # it trained
  # Measured (CPU, 2026-11-26): 0.499 against optax.lion's 0.496 (+0.7%;
  # 8-bit Lion, rounded to nearest, +6.0%). Rounded to nearest, 4-bit codes
  # ended at 0.608 (+23%, +51% after 1000 steps): the momentum froze. The
  # bound is the measured gap plus 4 points, under 8-bit Lion's 8.
  assert abs(ours - theirs) <= 0.05 * theirs, (ours, theirs)


def test_momentum_codes_are_rounded_without_bias():
  # One large gradient a block sets its absmax; the rest put the momentum
  # at 0.3 of it, between the map's 0.2125 and 0.4375. Nearest rounding
  # would store 0.2125 for all of them (and a momentum moving by 1% a step
  # would never leave it); stochastic rounding stores 0.4375 for 39% of them,
  # so that the mean is 0.3.
  n = 128 * 64
  params = {'w': jnp.zeros((n,))}
  grads = {'w': jnp.full((n,), 0.3).at[::128].set(1.0)}
  tx = optax_paged.lion4bit(1e-3, min_8bit_size=1)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  (moment,) = reference_state_from(state, params).moments['w']
  values = np.asarray(quantization.dequantize_blockwise(
      moment.codes, moment.absmax, signed=True, code_bits=4), np.float64)
  absmax = np.repeat(np.asarray(moment.absmax), 128)
  scaled = np.delete(values / absmax, np.s_[::128])
  assert set(np.round(scaled, 4).tolist()) == {0.2125, 0.4375}
  # 8128 draws: the mean's standard deviation is 0.225 * 0.0054 = 0.0012.
  assert abs(scaled.mean() - 0.3) < 0.006, scaled.mean()
