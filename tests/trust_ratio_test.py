"""LAMB and LARS with optax's trust ratio (the default) or bitsandbytes'."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from tests.helpers import assert_trees_equal
from tests.helpers import jitted_step
from tests.helpers import random_grads
from tests.helpers import random_tree


def _parabola():
  """optax's alias_test parabola: from (-1, 10, 1) to (1, -1, 1)."""
  final = jnp.array([1.0, -1.0, 1.0])
  return (jnp.array([-1.0, 10.0, 1.0]), final,
          lambda p: jnp.sum(jnp.square(p - final)))


def _rosenbrock():
  """optax's alias_test Rosenbrock: from (0, 0) to (1, 1)."""
  return (jnp.zeros(2), jnp.ones(2),
          lambda p: jnp.square(1.0 - p[0]) + 100.0 * jnp.square(
              p[1] - jnp.square(p[0])))


def _minimize(tx, target, steps=10_000):
  params, _, objective = target()

  def step(carry, _):
    p, s = carry
    updates, s = tx.update(jax.grad(objective)(p), s, p)
    return (optax.apply_updates(p, updates), s), None

  # The steps in one jitted scan: 10000 dispatches of a jitted step cost
  # far more than the steps themselves.
  @jax.jit
  def minimize(p, s):
    return jax.lax.scan(step, (p, s), length=steps)[0]

  params, _ = minimize(params, tx.init(params))
  return np.asarray(params)


# optax's alias_test: lamb at 1e-3, lars at 1.0, 10000 steps, rtol = atol =
# 3e-2. The 8-bit factories keep fp32 state for these 2- and 3-element
# leaves (as bitsandbytes below 4096), the paged ones always.
OPTAX_TEST = {
    'lamb8bit': (optax_paged.lamb8bit, optax.lamb, 1e-3),
    'paged_lamb': (optax_paged.paged_lamb, optax.lamb, 1e-3),
    'lars8bit': (optax_paged.lars8bit, optax.lars, 1.0),
    'paged_lars': (optax_paged.paged_lars, optax.lars, 1.0),
}


@pytest.mark.parametrize('target', [_parabola, _rosenbrock],
                         ids=['parabola', 'rosenbrock'])
@pytest.mark.parametrize('name', sorted(OPTAX_TEST))
def test_optax_trust_ratio_reaches_optax_tests_optimum(name, target):
  factory, counterpart, lr = OPTAX_TEST[name]
  final = np.asarray(target()[1])
  np.testing.assert_allclose(_minimize(counterpart(lr), target), final,
                             rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(_minimize(factory(lr), target), final,
                             rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('name, target', [('lamb8bit', _parabola),
                                          ('lars8bit', _rosenbrock)])
def test_bitsandbytes_trust_ratio_stops_short_there(name, target):
  # Why the default is optax's: bitsandbytes' clip leaves Adam's (SGD's)
  # step alone where it is shorter than the limit, so the step never grows.
  # Measured: LAMB at (1.00, 1.28, 1.00) on both the CPU and an H200; LARS
  # still creeping, at (0.90, 0.81) on the CPU, (0.87, 0.77) on the H200.
  factory, _, lr = OPTAX_TEST[name]
  reached = _minimize(factory(lr, trust_ratio='bitsandbytes'), target)
  assert np.max(np.abs(reached - np.asarray(target()[1]))) > 0.1, reached


PARAMS = random_tree([(64, 80), (300,), (3,)], seed=5)
DECAY_MASK = {'leaf0': True, 'leaf1': False, 'leaf2': True}
TRUST_MASK = {'leaf0': True, 'leaf1': True, 'leaf2': False}
# () -> (ours, optax's), fp32 state, every option optax has.
TRACKED = {
    'lamb': lambda: (
        optax_paged.paged_lamb(1e-2, weight_decay=0.1, mask=DECAY_MASK,
                               eps_root=1e-8),
        optax.lamb(1e-2, weight_decay=0.1, mask=DECAY_MASK, eps_root=1e-8)),
    'lars': lambda: (
        optax_paged.paged_lars(1.0, weight_decay=0.1, mask=DECAY_MASK,
                               trust_ratio_mask=TRUST_MASK, nesterov=True),
        optax.lars(1.0, weight_decay=0.1, weight_decay_mask=DECAY_MASK,
                   trust_ratio_mask=TRUST_MASK, nesterov=True)),
    'lars-coefficient-eps': lambda: (
        optax_paged.paged_lars(1.0, 0.8, weight_decay=0.1,
                               trust_coefficient=0.01, eps=1e-3),
        optax.lars(1.0, weight_decay=0.1, trust_coefficient=0.01, eps=1e-3,
                   momentum=0.8)),
}


def _trajectories(ours, theirs, steps):
  p, s, rp, rs = PARAMS, ours.init(PARAMS), PARAMS, theirs.init(PARAMS)
  step, ref_step = jitted_step(ours), jitted_step(theirs)
  for i in range(steps):
    g = random_grads(PARAMS, 100 + i, 0.1)
    p, s = step(p, s, g)
    rp, rs = ref_step(rp, rs, g)
  return p, rp


@pytest.mark.parametrize('name', sorted(TRACKED))
def test_32bit_tracks_optax_step_by_step(name):
  """10 steps of the fp32 state against optax's, to 1e-6 absolute.

  Each step's update agrees to a few float32 roundings (reciprocal bias
  corrections in the kernel, norms summed in another order), and adding it
  rounds to the parameter's ulp (1.2e-7 at 1): measured at most 2.4e-7
  here. Parameters move by 0.02 to 2, so 1e-6 is 5e-5 of the smallest
  move; bitsandbytes' ratio is off by 30% to 10 times the move.
  """
  ours, theirs = TRACKED[name]()
  p, rp = _trajectories(ours, theirs, 10)
  for key in PARAMS:
    assert np.max(np.abs(np.asarray(rp[key]) - np.asarray(PARAMS[key]))) > 0.02
    np.testing.assert_allclose(np.asarray(p[key]), np.asarray(rp[key]),
                               rtol=0, atol=1e-6, err_msg=key)


def test_32bit_bitsandbytes_ratio_is_not_optax():
  # The control: the tolerance above tells the two ratios apart.
  ours = optax_paged.paged_lamb(1e-2, weight_decay=0.1, mask=DECAY_MASK,
                                eps_root=1e-8, trust_ratio='bitsandbytes')
  p, rp = _trajectories(ours, TRACKED['lamb']()[1], 10)
  assert not np.allclose(np.asarray(p['leaf0']), np.asarray(rp['leaf0']),
                         rtol=0, atol=1e-2)


def test_hyperparameters_change_without_recompiling():
  """Schedules and injected values reach the trust ratio as device scalars."""
  tx = optax.inject_hyperparams(optax_paged.lars8bit)(
      learning_rate=optax.linear_schedule(1.0, 0.5, 4), weight_decay=0.1,
      trust_coefficient=0.001, eps=0.0, min_8bit_size=256)
  ref = optax.inject_hyperparams(optax.lars)(
      learning_rate=optax.linear_schedule(1.0, 0.5, 4), weight_decay=0.1,
      trust_coefficient=0.001, eps=0.0)
  traces = []

  def counted(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step, ref_step = jax.jit(counted), jitted_step(ref)
  p, s, rp, rs = PARAMS, tx.init(PARAMS), PARAMS, ref.init(PARAMS)
  for i in range(4):
    for state in (s, rs):
      state.hyperparams['trust_coefficient'] = jnp.float32(0.001 * (i + 1))
    g = random_grads(PARAMS, i, 0.1)
    p, s = step(p, s, g)
    rp, rs = ref_step(rp, rs, g)
  assert len(traces) == 1
  # 8-bit momentum: a quantization step (about 1% near the block maximum).
  for key in PARAMS:
    move = np.max(np.abs(np.asarray(rp[key]) - np.asarray(PARAMS[key])))
    np.testing.assert_allclose(np.asarray(p[key]), np.asarray(rp[key]),
                               rtol=0, atol=0.03 * move, err_msg=key)


def test_checkpoint_restores_only_under_the_ratio_that_wrote_it():
  grads = random_grads(PARAMS, 0, 0.1)
  lars = optax_paged.lars8bit(1.0, min_8bit_size=256)
  lars_bnb = optax_paged.lars8bit(1.0, min_8bit_size=256,
                                  trust_ratio='bitsandbytes')
  written = jitted_step(lars_bnb)(PARAMS, lars_bnb.init(PARAMS), grads)[1]
  target = jitted_step(lars)(PARAMS, lars.init(PARAMS), grads)[1]
  before = optax_paged.state_dict(target)
  # optax's LARS momentum holds scaled gradients, bitsandbytes' raw ones:
  # restoring one as the other would take steps 1000 times too long.
  with pytest.raises(ValueError, match='lars_optax'):
    optax_paged.load_state_dict(target, optax_paged.state_dict(written))
  assert_trees_equal(optax_paged.state_dict(target), before)
  # LAMB's moments are Adam's under both ratios: either restores the other.
  lamb = optax_paged.lamb8bit(1e-2, min_8bit_size=256)
  lamb_bnb = optax_paged.lamb8bit(1e-2, min_8bit_size=256,
                                  trust_ratio='bitsandbytes')
  written = jitted_step(lamb_bnb)(PARAMS, lamb_bnb.init(PARAMS), grads)[1]
  restored = optax_paged.load_state_dict(lamb.init(PARAMS),
                                         optax_paged.state_dict(written))
  assert_trees_equal(optax_paged.state_dict(restored)['leaves'],
                     optax_paged.state_dict(written)['leaves'])


@pytest.mark.parametrize('factory', [optax_paged.lamb8bit,
                                     optax_paged.paged_lamb,
                                     optax_paged.lars8bit,
                                     optax_paged.paged_lars8bit])
def test_options_of_the_other_ratio_are_refused(factory):
  with pytest.raises(ValueError, match="trust_ratio must be 'optax' or"):
    factory(1e-3, trust_ratio='lamb')
  with pytest.raises(ValueError, match="trust_ratio='bitsandbytes'"):
    factory(1e-3, max_unorm=1.0)
  with pytest.raises(ValueError, match='max_unorm must be >= 0'):
    factory(1e-3, trust_ratio='bitsandbytes', max_unorm=-1.0)


@pytest.mark.parametrize('factory', [optax_paged.lars8bit,
                                     optax_paged.paged_lars])
def test_lars_options_of_optax_ratio_are_checked(factory):
  with pytest.raises(ValueError, match="trust_coefficient belong to optax"):
    factory(1.0, trust_ratio='bitsandbytes', trust_coefficient=0.01)
  with pytest.raises(ValueError, match='eps must be >= 0'):
    factory(1.0, eps=-1.0)
  with pytest.raises(ValueError, match='trust_coefficient must be >= 0'):
    factory(1.0, trust_coefficient=-0.001)


def test_lars_refuses_gradients_of_another_shape_before_scaling():
  tx = optax_paged.lars8bit(1.0)
  state = tx.init(PARAMS)
  grads = dict(random_grads(PARAMS, 0), leaf1=jnp.ones((299,)))
  with pytest.raises(ValueError, match=r"updates at \['leaf1'\] has shape"):
    tx.update(grads, state, PARAMS)
  assert int(state.count) == 0
  assert optax_paged.state_dict(state)['count'] == 0


def test_bitsandbytes_lars_takes_the_trust_ratio_mask():
  def run(**kwargs):
    tx = optax_paged.paged_lars(0.1, trust_ratio='bitsandbytes', **kwargs)
    p, s, step = PARAMS, tx.init(PARAMS), jitted_step(tx)
    for i in range(3):
      p, s = step(p, s, random_grads(PARAMS, i, 0.1))
    return p

  masked = run(trust_ratio_mask=TRUST_MASK)
  clipped, unclipped = run(), run(max_unorm=0.0)
  # Leaves inside the mask are clipped, the one outside takes SGD's step.
  assert_trees_equal([masked['leaf0'], masked['leaf1'], masked['leaf2']],
                     [clipped['leaf0'], clipped['leaf1'], unclipped['leaf2']])
  assert not np.allclose(clipped['leaf2'], unclipped['leaf2'])
