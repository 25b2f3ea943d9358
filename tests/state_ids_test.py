"""State ids are reused, so a jitted step compiles once per structure."""

import copy
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from optax_paged._src import registry
from tests import helpers


def _params(seed=0):
  return helpers.random_tree([(96, 80), (80,)], seed=seed)


def _grads():
  return helpers.random_tree([(96, 80), (80,)], seed=1, scale=0.1)


def _counting_step(tx):
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(jnp.add, params, updates), state

  return step, traces


def _drop_everything():
  gc.collect()
  registry.REGISTRY.free_orphans()


def test_states_made_one_after_another_share_one_compiled_step():
  tx = optax_paged.adamw8bit(1e-2)
  step, traces = _counting_step(tx)
  results = []
  for _ in range(6):
    params, state = _params(), tx.init(_params())
    for _ in range(3):
      params, state = step(params, state, _grads())
    results.append(jax.device_get(params))
    del state
    _drop_everything()
  assert len(traces) == 1
  for result in results[1:]:
    helpers.assert_trees_equal(result, results[0])


def test_states_alive_at_once_have_their_own_ids_and_moments():
  tx = optax_paged.adamw8bit(1e-2)
  step, _ = _counting_step(tx)
  first, second = tx.init(_params()), tx.init(_params())
  assert first.buffers.state_id != second.buffers.state_id
  before = helpers.moments_of(second)
  _, first = step(_params(), first, _grads())
  helpers.assert_trees_equal(helpers.moments_of(second), before)


def test_a_released_state_in_hand_keeps_its_id_and_fails_as_released():
  tx = optax_paged.adamw8bit(1e-2)
  step, _ = _counting_step(tx)
  released = tx.init(_params())
  step(_params(), released, _grads())  # compiled for this id
  optax_paged.release(released)
  _drop_everything()
  newer = tx.init(_params())
  assert newer.buffers.state_id != released.buffers.state_id
  before = helpers.moments_of(newer)
  with pytest.raises(Exception, match='released'):
    jax.block_until_ready(step(_params(), released, _grads()))
  helpers.assert_trees_equal(helpers.moments_of(newer), before)


def test_a_tree_rebuilt_from_a_freed_state_keeps_its_id_from_new_states():
  tx = optax_paged.adamw8bit(1e-2)
  state = tx.init(_params())
  leaves, treedef = jax.tree.flatten(state)
  old_id = state.buffers.state_id
  del state
  _drop_everything()
  rebuilt = jax.tree.unflatten(treedef, leaves)
  newer = tx.init(_params())
  assert newer.buffers.state_id != old_id
  with pytest.raises(ValueError, match='released'):
    tx.update(_grads(), rebuilt, _params())


def test_copies_and_other_structures_never_take_a_live_id():
  tx = optax_paged.adamw8bit(1e-2)
  params = helpers.random_tree([(97, 83)])  # a structure of this test alone
  state = tx.init(params)
  copied = copy.deepcopy(state)
  ids = {state.buffers.state_id, copied.buffers.state_id}
  assert len(ids) == 2
  del state, copied
  _drop_everything()
  other_shapes = tx.init(helpers.random_tree([(97, 84)]))
  other_optimizer = optax_paged.lion8bit(1e-3).init(params)
  assert not ids & {other_shapes.buffers.state_id,
                    other_optimizer.buffers.state_id}
  assert tx.init(params).buffers.state_id in ids


def test_a_count_restored_without_moments_is_refused_on_a_reused_id():
  tx = optax_paged.adamw8bit(1e-2)
  step, _ = _counting_step(tx)
  state = tx.init(_params())
  step(_params(), state, _grads())
  state_id = state.buffers.state_id
  del state
  _drop_everything()
  fresh = tx.init(_params())
  assert fresh.buffers.state_id == state_id
  leaves, treedef = jax.tree.flatten(fresh)
  leaves[0] = np.int32(7)  # the count; the moments were never written
  with pytest.raises(ValueError, match='without its moments'):
    jax.tree.unflatten(treedef, leaves)


def test_the_old_name_of_the_state_id_still_reads_it_with_a_warning():
  state = optax_paged.adamw8bit(1e-2).init(_params())
  with pytest.warns(DeprecationWarning, match='StateBuffers.key'):
    assert state.buffers.key == state.buffers.state_id
