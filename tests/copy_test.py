"""copy.deepcopy and pickle of optimizer states: independent, identical."""

import copy
import pickle

import flax.training.train_state as flax_train_state
import jax
import numpy as np
import optax
import pytest

import optax_paged
from tests.helpers import random_tree

SHAPES = [(300, 10), (4096,), (7,)]


def _grads(params, seed):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape) * 0.01,
      params,
  )


def _trained_state(tx, params, steps=3):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(steps):
    _, state = step(_grads(params, i), state, params)
  return state


def _assert_same_state(a, b):
  jax.tree.map(np.testing.assert_array_equal,
               optax_paged.state_dict(a), optax_paged.state_dict(b))


@pytest.mark.parametrize('duplicate', [
    copy.deepcopy,
    lambda state: pickle.loads(pickle.dumps(state)),
], ids=['deepcopy', 'pickle'])
def test_copy_is_identical_and_independent(duplicate):
  params = random_tree(SHAPES, seed=1)
  tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  original = _trained_state(tx, params)
  saved = optax_paged.state_dict(original)
  copied = duplicate(original)
  assert copied.buffers.state_id != original.buffers.state_id
  _assert_same_state(copied, original)
  # Updating the copy leaves the original alone, and the copy continues
  # exactly as the original does.
  step = jax.jit(tx.update)
  u_copy, copied = step(_grads(params, 7), copied, params)
  jax.tree.map(np.testing.assert_array_equal,
               optax_paged.state_dict(original), saved)
  u_orig, original = step(_grads(params, 7), original, params)
  jax.tree.map(np.testing.assert_array_equal, u_copy, u_orig)
  _assert_same_state(copied, original)


def test_copy_survives_donating_the_original():
  params = random_tree(SHAPES, seed=7)
  tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  original = _trained_state(tx, params)
  copied = copy.deepcopy(original)
  step = jax.jit(tx.update, donate_argnums=1)
  step(_grads(params, 8), original, params)
  assert int(copied.count) == 3
  step(_grads(params, 8), copied, params)


def test_deepcopy_of_a_flax_train_state_with_a_chain():
  params = random_tree(SHAPES, seed=2)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax_paged.paged_lion8bit(1e-3, min_8bit_size=256))
  state = flax_train_state.TrainState.create(
      apply_fn=None, params=params, tx=tx)
  state = state.apply_gradients(grads=_grads(params, 0))
  twin = copy.deepcopy(state)
  state = state.apply_gradients(grads=_grads(params, 1))
  twin = twin.apply_gradients(grads=_grads(params, 1))
  jax.tree.map(np.testing.assert_array_equal, twin.params, state.params)
  _assert_same_state(twin.opt_state, state.opt_state)


def test_shallow_copy_shares_the_buffers():
  params = random_tree(SHAPES, seed=3)
  state = optax_paged.paged_adamw8bit(1e-2).init(params)
  assert copy.copy(state).buffers is state.buffers


def test_released_state_cannot_be_copied():
  params = random_tree(SHAPES, seed=4)
  state = optax_paged.paged_adamw8bit(1e-2).init(params)
  optax_paged.release(state)
  with pytest.raises(ValueError, match='released'):
    copy.deepcopy(state)
  with pytest.raises(ValueError, match='released'):
    pickle.dumps(state)


def test_buffers_alone_are_refused_clearly():
  params = random_tree(SHAPES, seed=5)
  state = optax_paged.paged_adamw8bit(1e-2).init(params)
  with pytest.raises(TypeError, match='copy or pickle the optimizer state'):
    pickle.dumps(state.buffers)


def test_abstract_state_is_refused_by_pickle():
  params = random_tree(SHAPES, seed=6)
  tx = optax_paged.paged_adamw8bit(1e-2)
  abstract = jax.eval_shape(tx.init, params)
  assert copy.deepcopy(abstract).buffers.is_abstract
  with pytest.raises(TypeError, match='holds no buffers'):
    pickle.dumps(abstract)


def test_pickles_naming_the_old_entry_point_still_load():
  # Pickles made before state_io name checkpoint._unpickle_state(layout,
  # saved); it must keep building the same state.
  from optax_paged._src import checkpoint

  params = random_tree(SHAPES, seed=4)
  state = _trained_state(optax_paged.adamw8bit(1e-3, min_8bit_size=256),
                         params)
  _, (_, layout, saved) = state.__reduce__()
  _assert_same_state(checkpoint._unpickle_state(layout, saved), state)
