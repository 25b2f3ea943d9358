"""What every public optimizer factory must do, as optax users call them."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import factories
from tests import helpers


def _parameters(name):
  return inspect.signature(getattr(optax_paged, name)).parameters


FACTORIES = sorted(factories.FACTORIES)
WITH_WEIGHT_DECAY = [n for n in FACTORIES if 'weight_decay' in _parameters(n)]
SHAPES = [(64, 80), (300,)]


def _problem():
  params = helpers.random_tree(SHAPES, seed=0)
  grads = [helpers.random_tree(SHAPES, seed=10 + i, scale=0.01)
           for i in range(3)]
  return params, grads


def _run(tx, params, grads, jit=True):
  step = helpers.update_and_apply(tx)
  step = jax.jit(step) if jit else step
  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return jax.device_get(params)


@functools.cache
def _plain_run(name):
  """``_run(factory(1e-3), *_problem())``: compiled and run once a factory.

  Four tests compare against this same run: read-only NumPy arrays, so no
  test can change what another reads.
  """
  return _run(getattr(optax_paged, name)(1e-3), *_problem())


def test_every_factory_of_the_table_is_exported():
  # A factory taking a learning rate that the table does not make would
  # miss these tests.
  exported = {name for name in optax_paged.__all__
              if callable(getattr(optax_paged, name))
              and 'learning_rate' in _parameters(name)}
  assert exported == set(FACTORIES)
  assert all(getattr(optax_paged, name) is factories.FACTORIES[name]
             for name in FACTORIES)


def _assert_same_moves(ours, theirs, start, fraction):
  """Parameters moved alike from ``start``, up to ``fraction`` of the move."""
  for a, b, p0 in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs),
                      jax.tree.leaves(jax.device_get(start)), strict=True):
    move = np.max(np.abs(np.asarray(b) - p0))
    assert move > 0
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= fraction * move


@pytest.mark.parametrize('name', FACTORIES)
def test_eager_and_jitted_steps_agree(name):
  params, grads = _problem()
  factory = getattr(optax_paged, name)
  # XLA fuses the jitted step's hyperparameter arithmetic (b ** count) and
  # parameter update differently from op-by-op dispatch: a few ulp apart,
  # which an 8-bit code near a rounding boundary can turn into one code step.
  _assert_same_moves(_run(factory(1e-3), params, grads, jit=False),
                     _plain_run(name), params, 1e-3)


@pytest.mark.parametrize('name', FACTORIES)
def test_inject_hyperparams_under_jit_runs_the_same_optimizer(name):
  params, grads = _problem()
  factory = getattr(optax_paged, name)
  injected = optax.inject_hyperparams(factory)(learning_rate=1e-3)
  # inject_hyperparams makes every numeric hyperparameter a float32 array,
  # so 1 - b2 and 1 - b2**t are rounded in float32 (as for optax.adamw),
  # not in float64 first; 8-bit codes can then differ by a step.
  _assert_same_moves(_run(injected, params, grads), _plain_run(name), params,
                     1e-2)


@pytest.mark.parametrize('name', FACTORIES)
def test_a_learning_rate_schedule_is_evaluated_at_the_step(name):
  params, grads = _problem()
  factory = getattr(optax_paged, name)
  # A schedule constant at the plain value: the same bits as the scalar.
  helpers.assert_trees_equal(
      _run(factory(optax.constant_schedule(1e-3)), params, grads),
      _plain_run(name))


@pytest.mark.parametrize('name', WITH_WEIGHT_DECAY)
def test_weight_decay_takes_a_schedule(name):
  params, grads = _problem()
  factory = getattr(optax_paged, name)
  constant = _run(factory(1e-3, weight_decay=0.05), params, grads)
  helpers.assert_trees_equal(
      _run(factory(1e-3, weight_decay=optax.constant_schedule(0.05)), params,
           grads),
      constant)
  # Decay only from the second step on: the first step is undecayed.
  later = optax.piecewise_constant_schedule(0.0, {1: 1e10})
  first_undecayed = _run(factory(1e-3, weight_decay=later), params,
                         grads[:1])
  helpers.assert_trees_equal(
      first_undecayed, _run(factory(1e-3, weight_decay=0.0), params,
                            grads[:1]))


@pytest.mark.parametrize('name', FACTORIES)
def test_state_dict_round_trip_continues_bit_for_bit(name):
  params, grads = _problem()
  tx = getattr(optax_paged, name)(1e-3)
  step = jax.jit(helpers.update_and_apply(tx))
  p, s = params, tx.init(params)
  p, s = step(p, s, grads[0])
  restored = optax_paged.load_state_dict(tx.init(params),
                                         optax_paged.state_dict(s))
  a, _ = step(p, s, grads[1])
  b, _ = step(p, restored, grads[1])
  helpers.assert_trees_equal(jax.device_get(a), jax.device_get(b))


@pytest.mark.parametrize('name', [n for n in FACTORIES if 'adam' in n
                                  and 'ademamix' not in n])
def test_adam_factories_take_optax_options(name):
  factory = getattr(optax_paged, name)
  params, grads = _problem()
  nesterov = _run(factory(1e-3, nesterov=True), params, grads)
  plain = _plain_run(name)
  assert not np.array_equal(nesterov[next(iter(nesterov))],
                            plain[next(iter(plain))])
  with pytest.raises(ValueError, match='mu_dtype'):
    factory(1e-3, mu_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match='eps_root'):
    factory(1e-3, eps_root=-1.0)


def test_sgd8bit_defaults_to_optax_sgd_without_momentum():
  params, grads = _problem()
  ours = _run(optax_paged.sgd8bit(0.1), params, grads)
  theirs = _run(optax.sgd(0.1), params, grads)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      ours, theirs)
  with pytest.raises(ValueError, match='accumulator_dtype'):
    optax_paged.sgd8bit(0.1, accumulator_dtype=jnp.bfloat16)


@pytest.mark.parametrize('made_by, stepped_by', [
    (optax_paged.lamb8bit, optax_paged.adamw8bit),
    (optax_paged.adamw8bit, optax_paged.lamb8bit),
    (optax_paged.lars8bit, optax_paged.sgd8bit),
])
def test_a_state_runs_only_with_its_own_optimizer(made_by, stepped_by):
  # LAMB runs Adam's kernel and LARS SGD's, but their states are their own:
  # another optimizer's update is refused and changes nothing.
  params, grads = _problem()
  state = made_by(1e-3).init(params)
  before = helpers.moments_of(state)
  with pytest.raises(ValueError, match='this state was made by'):
    stepped_by(1e-3).update(grads[0], state, params)
  helpers.assert_trees_equal(helpers.moments_of(state), before)
  assert int(state.count) == 0
