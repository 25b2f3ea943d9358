"""Builders shared by the optimizer tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged
from optax_paged._src import reference


def random_tree(shapes, dtype=jnp.float32, seed=0, scale=1.0):
  """A dict of random normal leaves, one per shape."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {
      f'leaf{i}': (jax.random.normal(k, s, jnp.float32) * scale).astype(dtype)
      for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
  }


def reference_state_from(state, params):
  """The reference optimizer's state holding the same moments as ``state``."""
  saved = optax_paged.state_dict(state)
  leaves, treedef = jax.tree.flatten(params)
  moments = []
  for leaf in saved['leaves']:
    if bool(leaf['quantized']):
      moments.append(tuple(
          reference.QuantizedMoment(
              jnp.asarray(m['codes']), jnp.asarray(m['absmax'])
          )
          for m in leaf['moments']
      ))
    else:
      moments.append(tuple(jnp.asarray(m['values']) for m in leaf['moments']))
  assert len(moments) == len(leaves)
  return reference.ReferenceState(
      count=jnp.asarray(saved['count']),
      moments=jax.tree.unflatten(treedef, moments),
  )


def moments_of(state):
  """(quantized?, [arrays per moment]) for every leaf, as NumPy."""
  out = []
  for leaf in optax_paged.state_dict(state)['leaves']:
    out.append((
        bool(leaf['quantized']),
        [dict(m) for m in leaf['moments']],
    ))
  return out


def as_f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def update_and_apply(tx):
  """The strict optax step: ``tx.update`` then ``optax.apply_updates``."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def jitted_step(tx):
  """``update_and_apply(tx)`` under ``jax.jit``."""
  return jax.jit(update_and_apply(tx))


def assert_trees_equal(a, b):
  """Every leaf of ``a`` equals the matching leaf of ``b`` exactly."""
  jax.tree.map(
      lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
      a, b,
  )


def refusal_of(run, report):
  """The message with which ``run()`` was refused, on any backend.

  The CPU handler raises at the call. A GPU kernel cannot fail its call: it
  returns NaN results and marks the state, and ``report()`` (for example
  ``optax_paged.state_dict`` of a state sharing the buffers) raises it.
  """
  try:
    outputs = jax.block_until_ready(run())
  except Exception as error:  # noqa: BLE001 - XlaRuntimeError or ValueError
    return str(error)
  floats = [x for x in jax.tree.leaves(outputs)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  assert floats and all(np.isnan(np.asarray(x)).all() for x in floats)
  try:
    report()
  except ValueError as error:
    return str(error)
  raise AssertionError('the call was neither refused nor reported')
