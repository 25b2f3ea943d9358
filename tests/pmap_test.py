"""``jax.pmap`` is refused at the call, with one message that says what to use.

pmap's replicated copies cannot address per-device registry entries. Every
way in is refused at the call itself, before anything is allocated or
stepped: ``tx.init`` under pmap (which would return a state with no
buffers, whose ``allocate_state`` then failed on the stacked shapes), and a
state made outside stepped under pmap, by ``tx.update`` or
``apply_gradients``, whatever pmap's ``axis_name`` (one device suffices:
pmap over one device is still pmap; tests/multi_device has a mesh state).
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state

import optax_paged
from optax_paged._src import sharding
from tests.helpers import assert_trees_equal

N = jax.local_device_count()
AXIS_NAMES = [None, 'batch']


def _tx():
  return optax_paged.adamw8bit(1e-3, min_8bit_size=256)


def _stacked(value=1.0):
  return {'w': jnp.full((N, 64, 64), value)}


def _refused(call):
  with pytest.raises(ValueError) as error:
    jax.block_until_ready(call())
  assert str(error.value) == sharding.PMAP_MSG
  assert 'jax.jit' in str(error.value) and 'shard_map' in str(error.value)


@pytest.mark.parametrize('axis_name', AXIS_NAMES)
def test_init_under_pmap_is_refused(axis_name):
  tx = _tx()
  _refused(lambda: jax.pmap(tx.init, axis_name=axis_name)(_stacked()))
  # A jitted init inside pmap, and pmap inside jit, too.
  _refused(lambda: jax.pmap(jax.jit(tx.init), axis_name=axis_name)(
      _stacked()))
  _refused(lambda: jax.jit(jax.pmap(tx.init, axis_name=axis_name))(
      _stacked()))
  # Flax's TrainState.create calls tx.init.
  _refused(lambda: jax.pmap(
      lambda p: train_state.TrainState.create(apply_fn=None, params=p, tx=tx),
      axis_name=axis_name)(_stacked()))


@pytest.mark.parametrize('axis_name', AXIS_NAMES)
@pytest.mark.parametrize('how', ['update', 'apply_gradients', 'chain'])
def test_a_state_made_outside_is_refused_under_pmap(how, axis_name):
  tx = _tx() if how != 'chain' else optax.chain(
      optax.clip_by_global_norm(1.0), _tx())
  params = {'w': jnp.ones((64, 64))}
  state = tx.init(params)
  before = optax_paged.state_dict(state)
  if how == 'apply_gradients':
    step = lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p)[0]  # noqa
  else:
    step = lambda g, s, p: tx.update(g, s, p)[0]  # noqa: E731
  # The state passed unmapped, and mapped (each replica a copy of it).
  _refused(lambda: jax.pmap(step, in_axes=(0, None, 0),
                            axis_name=axis_name)(_stacked(), state,
                                                 _stacked()))
  replicated = jax.tree.map(lambda x: jnp.stack([x] * N), state)
  _refused(lambda: jax.pmap(step, axis_name=axis_name)(
      _stacked(), replicated, _stacked()))
  assert_trees_equal(optax_paged.state_dict(state), before)
  # The refusal changed nothing: the state steps as if it never happened.
  updates, _ = jax.jit(tx.update)(params, state, params)
  fresh = tx.init(params)
  expected, _ = jax.jit(tx.update)(params, fresh, params)
  assert_trees_equal(updates, expected)


def test_a_state_made_for_pmapped_parameters_is_refused_under_pmap():
  # Parameters that a pmap returned (sharded over pmap's own mesh) make a
  # state that jax.jit steps; pmap still may not.
  tx = _tx()
  params = jax.pmap(lambda x: x)(_stacked())
  state = tx.init(params)
  _refused(lambda: jax.pmap(lambda g, s, p: tx.update(g, s, p)[0],
                            in_axes=(0, None, 0))(params, state, params))
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert updates['w'].shape == (N, 64, 64)

