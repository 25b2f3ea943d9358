"""Under jax.disable_jit the step runs, and runs the same as eagerly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from tests.helpers import random_tree

SHAPES = [(64, 80), (300,)]


def _steps(make_step, disable_jit):
  params = random_tree(SHAPES, seed=0)
  grads = random_tree(SHAPES, seed=1, scale=0.1)
  step, state = make_step(params)
  for _ in range(2):
    if disable_jit:
      with jax.disable_jit():
        params, state = step(params, state, grads)
    else:
      params, state = step(params, state, grads)
  # An accumulated state's count is its inner optimizer's.
  return jax.device_get(params), int(getattr(state, 'inner_state',
                                             state).count)


def _update(factory):
  def make(params):
    tx = factory(1e-2)

    def step(p, s, g):
      updates, s = tx.update(g, s, p)
      return jax.tree.map(jnp.add, p, updates), s

    return step, tx.init(params)

  return make


def _fused(params):
  tx = optax_paged.adamw8bit(1e-2, min_8bit_size=256)
  return ((lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p)),
          tx.init(params))


def _accumulated(params):
  tx = optax_paged.accumulate_gradients(optax_paged.adamw8bit(1e-2), 2)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return jax.tree.map(jnp.add, p, updates), s

  return step, tx.init(params)


@pytest.mark.parametrize('make_step', [
    _update(optax_paged.adamw8bit), _update(optax_paged.lamb8bit),
    _update(optax_paged.lars8bit), _update(optax_paged.adamw4bit),
    _fused, _accumulated,
], ids=['adamw8bit', 'lamb8bit', 'lars8bit', 'adamw4bit', 'fused',
        'accumulated'])
def test_disable_jit_runs_the_eager_step(make_step):
  # It recursed (RecursionError): the eager call ran jax.jit, which under
  # disable_jit bound the primitive eagerly again.
  ours, count = _steps(make_step, disable_jit=True)
  eager, eager_count = _steps(make_step, disable_jit=False)
  assert count == eager_count == (1 if make_step is _accumulated else 2)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(eager), strict=True):
    np.testing.assert_array_equal(a, b)
