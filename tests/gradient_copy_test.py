"""When XLA copies gradients passed into a step before the update.

``update`` writes the updates over the gradients. XLA overwrites an argument
of the step only where an output takes its buffer, and JAX gives an output
the first donated argument of its shape: the README's advice (gradients
before parameters, all donated) rests on these facts, checked here in the
compiled step (entry-computation copies).
"""

import re
import warnings

import jax
import optax

import optax_paged
from tests.helpers import random_tree

SHAPES = [(300, 10), (4096,)]


def _entry_copies(step, *args) -> int:
  with warnings.catch_warnings():
    # JAX warns of donated buffers no output uses: that is the case tested.
    warnings.simplefilter('ignore')
    text = step.lower(*args).compile().as_text()
  entry = text[text.find('\nENTRY'):]
  # Copies of floating-point arrays (gradients, parameters): the call's
  # receipt copies its 4-byte position constant, which is not counted.
  return len(re.findall(r'= (?:f32|bf16|f16)\[[^\n]*\scopy\(',
                        entry[:entry.find('\n}')]))


def _setup():
  params = random_tree(SHAPES, seed=0)
  grads = random_tree(SHAPES, seed=1)
  tx = optax_paged.paged_adamw8bit(1e-3, min_8bit_size=256)
  return tx, params, grads, tx.init(params)


def _update_and_apply(tx, grads, state, params):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_gradients_donated_before_the_parameters_are_not_copied():
  tx, params, grads, state = _setup()

  def step(grads, state, params):
    return _update_and_apply(tx, grads, state, params)

  donated = jax.jit(step, donate_argnums=(0, 1, 2))
  assert _entry_copies(donated, grads, state, params) == 0
  kept = jax.jit(step, donate_argnums=(1, 2))
  assert _entry_copies(kept, grads, state, params) == len(SHAPES)
  optax_paged.release(state)


def test_gradients_donated_after_the_parameters_are_still_copied():
  # The new parameters take the parameters' own buffers; nothing takes the
  # gradients', so XLA may not write over them.
  tx, params, grads, state = _setup()

  def step(params, state, grads):
    return _update_and_apply(tx, grads, state, params)

  donated = jax.jit(step, donate_argnums=(0, 1, 2))
  assert _entry_copies(donated, params, state, grads) == len(SHAPES)
  optax_paged.release(state)


def test_gradients_made_in_the_step_are_not_copied():
  tx, params, grads, state = _setup()

  def step(params, state, scale):
    made = jax.tree.map(lambda g: g * scale, grads)
    return _update_and_apply(tx, made, state, params)

  step = jax.jit(step, donate_argnums=(0, 1))
  assert _entry_copies(step, params, state, 2.0) == 0
  optax_paged.release(state)
