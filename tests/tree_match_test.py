"""Gradients and parameters are matched to the state by path, not position.

A tree with the same leaf count and shapes but other names (``{'w', 'c'}``
for a state made for ``{'w', 'b'}``) would otherwise update ``b``'s moments
with ``c``'s gradient. optax refuses such a call; so does every view here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from tests.helpers import moments_of

INIT = {'w': jnp.ones((128, 64)), 'b': jnp.zeros(64)}
RENAMED = {'w': jnp.ones((128, 64)), 'c': jnp.zeros(64)}


def _grads(tree):
  return jax.tree.map(lambda x: jnp.full_like(x, 0.5), tree)


def _views(tx):
  return {
      'update': lambda g, s, p: tx.update(g, s, p),
      'jit_update': jax.jit(lambda g, s, p: tx.update(g, s, p)),
      'fused': lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p),
      'jit_fused': jax.jit(
          lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p)),
  }


@pytest.mark.parametrize(
    'view', ['update', 'jit_update', 'fused', 'jit_fused'])
def test_renamed_leaf_is_refused_naming_the_path(view):
  tx = optax_paged.adamw8bit(1e-2, min_8bit_size=64)
  state = tx.init(INIT)
  before = moments_of(state)
  with pytest.raises(ValueError, match=r"\['c'\].*\['b'\]"):
    _views(tx)[view](_grads(RENAMED), state, RENAMED)
  # The refused call changed nothing: the moments and count are as made.
  after = moments_of(state)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert int(state.count) == 0
  # The state still steps with the tree it was made for.
  tx.update(_grads(INIT), state, INIT)


def test_gradients_alone_renamed_are_refused():
  tx = optax_paged.paged_adamw(1e-2)
  state = tx.init(INIT)
  with pytest.raises(ValueError, match='does not match'):
    tx.update(_grads(RENAMED), state, INIT)


def test_extra_and_missing_leaves_name_the_path():
  tx = optax_paged.adamw8bit(1e-2)
  state = tx.init(INIT)
  extra = dict(INIT, z=jnp.zeros(3))
  with pytest.raises(ValueError, match=r"leaf at \['z'\] that the state"):
    tx.update(_grads(extra), state, extra)
  fewer = {'w': INIT['w']}
  with pytest.raises(ValueError, match=r"no leaf at \['b'\]"):
    tx.update(_grads(fewer), state, fewer)


def test_reordered_sequence_is_matched_by_index_as_named():
  # A list's paths are its indices: the same names, so the same leaves.
  tx = optax_paged.adamw8bit(1e-2)
  params = [jnp.ones(8), jnp.ones(8)]
  state = tx.init(params)
  tx.update(_grads(params), state, params)
  with pytest.raises(ValueError, match='does not match'):
    tx.update({'a': params[0], 'b': params[1]}, state,
              {'a': params[0], 'b': params[1]})


def test_in_a_chain_and_accumulation():
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax_paged.accumulate_gradients(
                       optax_paged.adamw8bit(1e-2, min_8bit_size=64), 1))
  state = tx.init(INIT)
  # JAX's own tree error (accumulation maps over its sums) names the keys.
  with pytest.raises(ValueError, match="'c'"):
    jax.jit(tx.update)(_grads(RENAMED), state, RENAMED)
  with pytest.raises(ValueError, match=r"\['c'\].*\['b'\]"):
    jax.jit(tx.update)(_grads(INIT), state, RENAMED)


def test_flax_nnx_wrapped_leaves_match_their_plain_arrays():
  nnx = pytest.importorskip('flax.nnx')
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax_paged.adamw8bit(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3)))))(model)
    optimizer.update(model, grads)

  kernel = np.asarray(model.kernel.value)
  step(model, optimizer)
  assert not np.array_equal(kernel, np.asarray(model.kernel.value))
