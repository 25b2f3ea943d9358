"""A state's count and its moments' step must agree, or the step is refused.

The moments know the step they are at; a count from another point of
training (restored without its moments, reset by ``jax.tree.map``, an older
copy of the state) is refused by the step, before any moment changes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import serialization

import optax_paged
from optax_paged._src import state_io
from tests.helpers import assert_trees_equal
from tests.helpers import jitted_step
from tests.helpers import refusal_of

PARAMS = {'w': jnp.ones((64, 80)), 'b': jnp.zeros((80,))}
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.1), PARAMS)
STALE = 'moments are at step'


def _stepped(steps=2, tx=None):
  tx = tx or optax_paged.adamw8bit(1e-3, min_8bit_size=256)
  step = jitted_step(tx)
  state = tx.init(PARAMS)
  for _ in range(steps):
    _, state = step(PARAMS, state, GRADS)
  return tx, step, state


@pytest.mark.parametrize('jit', [True, False], ids=['jit', 'eager'])
def test_a_state_reset_by_tree_map_is_refused_and_changes_nothing(jit):
  tx, step, state = _stepped()
  before = optax_paged.state_dict(state)
  reset = jax.tree.map(jnp.zeros_like, state)  # resets only the count
  run = step if jit else lambda p, s, g: tx.update(g, s, p)[0]
  assert STALE in refusal_of(lambda: run(PARAMS, reset, GRADS),
                             lambda: optax_paged.state_dict(state))
  assert_trees_equal(optax_paged.state_dict(state), before)


def test_an_older_copy_stepped_again_is_refused():
  _, step, older = _stepped(1)
  _, newer = step(PARAMS, older, GRADS)
  assert 'count is 1' in refusal_of(lambda: step(PARAMS, older, GRADS),
                                    lambda: optax_paged.state_dict(newer))
  _, newest = step(PARAMS, newer, GRADS)  # the newer one steps on
  assert int(optax_paged.state_dict(newest)['count']) == 3


def test_exporting_a_state_behind_its_moments_is_refused():
  tx, step, older = _stepped(1)
  step(PARAMS, older, GRADS)
  with pytest.raises(ValueError, match=STALE):
    optax_paged.state_dict(older)
  # Flax exports the count and the moments as separate fields, so the
  # mismatch travels with the export and the first step refuses it.
  exported = serialization.to_state_dict(older)
  restored = serialization.from_state_dict(tx.init(PARAMS), exported)
  assert 'count is 1' in refusal_of(
      lambda: step(PARAMS, restored, GRADS),
      lambda: optax_paged.state_dict(restored))


def _slow_step(tx):
  """A jitted update whose matmuls keep it running a while before the
  update itself, compiled and warmed up: (params, state, grads) -> state."""
  big = jnp.ones((1000, 1000))

  @jax.jit
  def step(params, state, grads, big):
    for _ in range(4):
      big = jnp.tanh(big @ big / 1000.0)
    grads = jax.tree.map(lambda g: g + 0.0 * big[0, 0], grads)
    return tx.update(grads, state, params)[1]

  warm = tx.init(PARAMS)
  jax.block_until_ready(step(PARAMS, warm, GRADS, big))
  optax_paged.release(warm)
  return lambda params, state, grads: step(params, state, grads, big)


def test_an_export_waits_for_a_step_still_running_on_its_buffers():
  # The step on the older copy is dispatched and its result dropped; the
  # export must read the moments after that step, not before it.
  tx, _, older = _stepped(1)
  _slow_step(tx)(PARAMS, older, GRADS)
  with pytest.raises(ValueError, match=STALE):
    optax_paged.state_dict(older)


def test_a_load_waits_for_a_step_still_running_on_its_buffers():
  # Written before that step ran, the loaded moments would be stepped on
  # by it, and the restored state found stale at its next step.
  tx, step, state = _stepped(1)
  saved = optax_paged.state_dict(state)
  _slow_step(tx)(PARAMS, state, GRADS)
  restored = optax_paged.load_state_dict(state, saved)
  assert_trees_equal(optax_paged.state_dict(restored), saved)
  _, after = step(PARAMS, restored, GRADS)
  assert int(optax_paged.state_dict(after)['count']) == 2


class _Model(nnx.Module):

  def __init__(self):
    self.linear = nnx.Linear(64, 80, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.linear(x)


@nnx.jit
def _nnx_step(model, optimizer, x):
  grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
  optimizer.update(model, grads)


def _nnx_refusal(model, optimizer, x):
  """How the next NNX step on ``optimizer`` is refused (any backend)."""

  def run():
    _nnx_step(model, optimizer, x)
    return nnx.state(model)

  return refusal_of(run, lambda: optax_paged.state_dict(optimizer.opt_state))


def _nnx_pair():
  model = _Model()
  tx = optax_paged.adamw8bit(1e-3, min_8bit_size=256)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def test_nnx_update_with_an_older_optimizer_state_is_refused():
  # nnx.state / nnx.update round trips carry the count, never the moments.
  model, optimizer = _nnx_pair()
  x = jnp.ones((4, 64))
  _nnx_step(model, optimizer, x)
  older = nnx.clone(nnx.state(optimizer))
  _nnx_step(model, optimizer, x)
  nnx.update(optimizer, older)
  assert 'count is 1' in _nnx_refusal(model, optimizer, x)


def test_nnx_count_restored_without_its_moments_is_refused():
  # What Orbax restored from nnx.state(optimizer) before it refused to save
  # one (orbax_test.py): the count alone, put back into a fresh optimizer.
  model, optimizer = _nnx_pair()
  x = jnp.ones((4, 64))
  for _ in range(3):
    _nnx_step(model, optimizer, x)
  fresh_model, fresh = _nnx_pair()
  fresh.opt_state.count.set_value(optimizer.opt_state.count.get_value())
  assert 'count is 3' in _nnx_refusal(fresh_model, fresh, x)


def test_a_flax_export_of_format_2_still_resumes():
  # Format 2 stored the buffers field with count 0; the state's own count,
  # restored beside it, says which step the moments are at.
  tx, step, state = _stepped(2)
  exported = serialization.to_state_dict(state)
  old = exported['1']['buffers'] if '1' in exported else exported['buffers']
  assert int(old['count']) == 2
  old['format_version'] = np.asarray(2, np.int32)
  old['count'] = np.asarray(0, np.int32)
  old['checksum'] = np.asarray(
      state_io._checksum(old['leaves'], 0), np.uint32)
  restored = serialization.from_state_dict(tx.init(PARAMS), exported)
  p_restored, _ = step(PARAMS, restored, GRADS)
  p_straight, _ = step(PARAMS, state, GRADS)
  assert_trees_equal(p_restored, p_straight)
