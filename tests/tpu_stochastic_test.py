"""The TPU path's fused step with ``stochastic_rounding``: the Pallas kernel
in Pallas' TPU interpreter (and small leaves in XLA) against the CPU
kernel's stochastic output mode, the same random bits (``tpu_rounding``).

The new parameter is ``p + update`` rounded from float32, so one ulp of
float32 in the update moves it across the random threshold with
probability 2^-16. XLA:CPU contracts ``a * b + c`` into FMA on a CPU with
one (the C++ kernel does not), so in the suite's session the parameters
agree but for an element in tens of thousands taking the neighbouring
bfloat16 value (and the 8-bit codes but for neighbours at a midpoint, as
tests/tpu_kernel_test.py); ``test_session`` runs the comparison again
without FMA (``--xla_cpu_max_isa=AVX``, as tests/tpu_kernel4_test.py),
where the parameters and states of both steps are the CPU kernel's bit
for bit.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from optax_paged._src import tpu_rounding
from optax_paged._src import tpu_transform
from tests import background
from tests import helpers

# On the CPU on any host: the comparisons hold as XLA:CPU rounds.
pytestmark = pytest.mark.usefixtures('on_cpu')

IN_SESSION = background.IN_NO_FMA_SESSION

# A native leaf, a flat one with a partial row, a small (float32-moment)
# one in XLA.
SHAPES = [(64, 256), (3000,), (100,)]


def fused_stochastic(tx):
  return jax.jit(lambda p, s, g: optax_paged.apply_gradients(
      tx, g, s, p, stochastic_rounding=True))


def run_both(check, steps=2):
  """Runs both paths' fused stochastic steps; ``check(tpu_params,
  cpu_params, tpu_state, cpu_state)`` after each (the registry's state is
  live: it holds the last step's moments only)."""
  params = helpers.random_tree(SHAPES, jnp.bfloat16)
  with tpu_transform.force('interpret'):
    tpu = optax_paged.paged_adamw8bit(1e-3, weight_decay=0.01)
  cpu = optax_paged.paged_adamw8bit(1e-3, weight_decay=0.01)
  tpu_state, cpu_state = tpu.init(params), cpu.init(params)
  tpu_step, cpu_step = fused_stochastic(tpu), fused_stochastic(cpu)
  tpu_params = cpu_params = params
  for i in range(steps):
    grads = helpers.random_grads(params, seed=i)
    tpu_params, tpu_state = tpu_step(tpu_params, tpu_state, grads)
    cpu_params, cpu_state = cpu_step(cpu_params, cpu_state, grads)
    check(tpu_params, cpu_params, tpu_state, cpu_state)


@pytest.mark.skipif(not IN_SESSION, reason='run without FMA by test_session')
def test_fused_stochastic_step_is_the_cpu_kernels_bit_for_bit():
  def check(tpu_params, cpu_params, tpu_state, cpu_state):
    helpers.assert_trees_equal(tpu_params, cpu_params)
    a = optax_paged.state_dict(tpu_state)
    b = optax_paged.state_dict(cpu_state)
    for x, y in zip(a['leaves'], b['leaves'], strict=True):
      helpers.assert_trees_equal(x['moments'], y['moments'])

  run_both(check)


def test_fused_stochastic_step_as_the_cpu_kernel():
  def check(tpu_params, cpu_params, *_):
    for name in tpu_params:
      a, b = tpu_params[name], cpu_params[name]
      assert a.dtype == jnp.bfloat16
      differ = helpers.as_f32(a) != helpers.as_f32(b)
      # A differing element is the neighbouring bfloat16 value.
      ulp = np.abs(helpers.as_f32(b)) * 2.0**-7
      assert np.all(np.abs(helpers.as_f32(a) - helpers.as_f32(b))
                    <= ulp + 1e-30), name
      assert np.sum(differ) <= max(1, differ.size // 1000), name

  run_both(check)


_run_session = background.no_fma_pytest(__file__, 'bit_for_bit')
BACKGROUND_JOBS = {
    'tpu-stochastic-session': (_run_session, ['test_session']),
}


def test_session():
  if IN_SESSION:
    pytest.skip('this is the session')
  background.assert_session_passed('tpu-stochastic-session', _run_session, 1)


def test_rounding_is_unbiased_and_not_nearest():
  # x a third of the way from 1 to the next bfloat16 (1 + 2^-7).
  x = jnp.full([1 << 16], 1.0 + 2.0**-7 / 3, jnp.float32)
  key = tpu_rounding.leaf_key(jnp.int32(1), 0)
  index = jnp.arange(x.size, dtype=jnp.int32)
  rounded = helpers.as_f32(tpu_rounding.new_param(
      x, jnp.zeros_like(x), jnp.bfloat16, tpu_rounding.bits(*key, index)))
  assert set(np.unique(rounded)) == {1.0, 1.0 + 2.0**-7}
  # Nearest would give 1.0 everywhere; a third round up.
  assert abs(rounded.mean() - float(x[0])) < 2e-5
  # Infinities and NaN as they are.
  special = jnp.array([jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  out = tpu_rounding.new_param(special, jnp.zeros_like(special),
                               jnp.bfloat16, jnp.full([3], 0xffff, jnp.int32))
  np.testing.assert_array_equal(helpers.as_f32(out), np.asarray(special))


def test_rounding_depends_on_the_step_and_reaches_the_small_updates():
  # Updates a tenth of an ulp: nearest rounding never moves the parameters;
  # stochastic rounding moves about a tenth, different ones at each step,
  # the registry's (p + update is exact here, FMA or not: bit for bit in
  # this session too).
  params = {'w': jnp.ones((32, 256), jnp.bfloat16),
            'b': jnp.ones((100,), jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, -1.0, p.dtype), params)
  with tpu_transform.force('interpret'):
    tx = optax_paged.sgd8bit(2.0**-7 / 10, momentum=0.0)
  cpu = optax_paged.sgd8bit(2.0**-7 / 10, momentum=0.0)
  state, cpu_state = tx.init(params), cpu.init(params)
  step, cpu_step = fused_stochastic(tx), fused_stochastic(cpu)
  nearest = jax.jit(lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p))
  np.testing.assert_array_equal(
      helpers.as_f32(nearest(params, state, grads)[0]['w']), 1.0)
  first, state = step(params, state, grads)
  second, _ = step(params, state, grads)
  cpu_first, cpu_state = cpu_step(params, cpu_state, grads)
  cpu_second, _ = cpu_step(params, cpu_state, grads)
  helpers.assert_trees_equal(first, cpu_first)
  helpers.assert_trees_equal(second, cpu_second)
  for name in params:
    a, b = helpers.as_f32(first[name]), helpers.as_f32(second[name])
    assert 0.03 < np.mean(a > 1) < 0.2, name
    assert np.any(a != b), name


def test_refusals():
  params = {'w': jnp.ones((16, 256), jnp.bfloat16)}
  with tpu_transform.force('interpret'):
    master = optax_paged.adamw8bit(1e-3, master_weight_bits=24)
    lamb = optax_paged.lamb8bit(1e-3)
  for tx, match in [(master, 'master weights'), (lamb, 'trust ratio')]:
    state = tx.init(params)
    with pytest.raises(ValueError, match=match):
      optax_paged.apply_gradients(tx, params, state, params,
                                  stochastic_rounding=True)
