"""Gradient accumulation and other wrappers that may discard an update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import transform
from tests.helpers import assert_trees_equal
from tests.helpers import jitted_step
from tests.helpers import random_tree
from tests.helpers import refusal_of

SHAPES = [(64, 80), (300,)]


def _grads(params, seed):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape) * 0.1,
      params,
  )


@pytest.mark.parametrize('every_k', [1, 3])
def test_k_micro_steps_equal_one_step_on_the_mean_gradient(every_k):
  params = random_tree(SHAPES, seed=0)
  inner_kwargs = dict(learning_rate=1e-2, weight_decay=0.1, min_8bit_size=256)
  accumulated = optax_paged.accumulate_gradients(
      optax_paged.paged_adamw8bit(**inner_kwargs), every_k)
  plain = optax_paged.paged_adamw8bit(**inner_kwargs)
  p_acc, s_acc = params, accumulated.init(params)
  p_one, s_one = params, plain.init(params)
  step_acc, step_one = jitted_step(accumulated), jitted_step(plain)

  @jax.jit
  def mean_of(grads):
    total = jax.tree.map(lambda g: g.astype(jnp.float32), grads[0])
    for g in grads[1:]:
      total = jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total, g)
    return jax.tree.map(lambda t: t / every_k, total)

  for update in range(2):
    micro = [_grads(params, 10 * update + i) for i in range(every_k)]
    for i, g in enumerate(micro):
      before = p_acc
      p_acc, s_acc = step_acc(p_acc, s_acc, g)
      if i < every_k - 1:
        assert_trees_equal(p_acc, before)  # nothing applied yet
    p_one, s_one = step_one(p_one, s_one, mean_of(micro))
    assert_trees_equal(p_acc, p_one)
    assert_trees_equal(optax_paged.state_dict(s_acc.inner_state),
                       optax_paged.state_dict(s_one))


def test_optax_multisteps_is_refused_with_a_pointer_to_the_fix():
  params = random_tree(SHAPES, seed=1)
  tx = optax.MultiSteps(optax_paged.paged_adamw8bit(1e-3), every_k_schedule=2)
  state = tx.init(params)
  before = optax_paged.state_dict(state.inner_opt_state)
  with pytest.raises(TypeError, match='accumulate_gradients'):
    jax.jit(tx.update)(_grads(params, 0), state, params)
  assert_trees_equal(optax_paged.state_dict(state.inner_opt_state), before)


def test_any_wrapper_that_discards_an_update_is_refused_by_the_step_stamps(
    monkeypatch):
  # The trace-time check recognises optax.MultiSteps by its code; without it
  # (a future optax, or any wrapper that runs the update and keeps the old
  # state) the moments' step stamp refuses the next micro-step.
  monkeypatch.setattr(transform, '_inside_optax_multisteps', lambda: False)
  params = random_tree(SHAPES, seed=1)
  tx = optax.MultiSteps(optax_paged.paged_adamw8bit(1e-3), every_k_schedule=2)
  step = jax.jit(tx.update)
  state = tx.init(params)
  _, state = step(_grads(params, 0), state, params)  # micro-step 1 runs
  message = refusal_of(
      lambda: step(_grads(params, 1), state, params)[0],
      lambda: optax_paged.state_dict(state.inner_opt_state))
  assert 'discards its result' in message


def test_apply_if_finite_skips_non_finite_steps_without_touching_state():
  params = random_tree(SHAPES, seed=2)
  inner = dict(learning_rate=1e-2, min_8bit_size=256)
  guarded = optax.apply_if_finite(optax_paged.paged_adamw8bit(**inner), 3)
  plain = optax_paged.paged_adamw8bit(**inner)
  p_g, s_g = params, guarded.init(params)
  p_p, s_p = params, plain.init(params)
  step_g, step_p = jitted_step(guarded), jitted_step(plain)
  for i in range(4):
    g = _grads(params, i)
    if i == 1:
      bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g)
      before = optax_paged.state_dict(s_g.inner_state)
      p_before = p_g
      p_g, s_g = step_g(p_g, s_g, bad)
      assert_trees_equal(p_g, p_before)
      assert_trees_equal(optax_paged.state_dict(s_g.inner_state), before)
      continue
    p_g, s_g = step_g(p_g, s_g, g)
    p_p, s_p = step_p(p_p, s_p, g)
  assert_trees_equal(p_g, p_p)


def test_optax_masked_and_multi_transform_around_paged_optimizers():
  params = {'w': jnp.ones((64, 64)), 'b': jnp.ones((64,))}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
  masked = optax.masked(optax_paged.paged_adamw8bit(0.1, weight_decay=0.0),
                        {'w': True, 'b': False})
  updates, _ = jax.jit(masked.update)(grads, masked.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1, rtol=1e-5)
  np.testing.assert_array_equal(updates['b'], grads['b'])  # passed through
  multi = optax.multi_transform(
      {'paged': optax_paged.paged_adamw8bit(0.1, weight_decay=0.0),
       'sgd': optax.sgd(1.0)},
      {'w': 'paged', 'b': 'sgd'},
  )
  updates, _ = jax.jit(multi.update)(grads, multi.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1, rtol=1e-5)
  np.testing.assert_allclose(updates['b'], -0.5)


def test_every_k_must_be_positive():
  with pytest.raises(ValueError, match='every_k'):
    optax_paged.accumulate_gradients(optax_paged.paged_adamw8bit(1e-3), 0)
