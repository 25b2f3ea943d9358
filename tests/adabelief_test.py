"""AdaBelief: what is its own (the table's common checks run it too)."""

import jax.numpy as jnp
import numpy as np

import optax_paged


def test_the_second_moment_is_the_squared_gap_from_the_prediction():
  # From zero moments one step gives m = (1 - b1) g, so the gap g - m is
  # b1 g; Adam's second moment would hold g^2 instead.
  b1, b2, eps_root = 0.9, 0.999, 1e-16
  grads = {'w': jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)}
  params = {'w': jnp.zeros((64, 64))}
  tx = optax_paged.paged_adabelief(1e-3, b1, b2, eps_root=eps_root)
  _, state = tx.update(grads, tx.init(params), params)
  moments = optax_paged.state_dict(state)['leaves'][0]['moments']
  g = np.asarray(grads['w'], np.float32).ravel()
  m = np.float32(1 - b1) * g
  gap = g - m
  np.testing.assert_array_equal(moments[0]['values'], m)
  np.testing.assert_array_equal(
      moments[1]['values'],
      np.float32(1 - b2) * (gap * gap) + np.float32(eps_root))


def test_a_steady_gradient_takes_steps_larger_than_adam_s():
  # Belief in a gradient that stays put: the gap shrinks, so the step
  # grows past Adam's (which stays near the learning rate).
  params = {'w': jnp.zeros((64, 64))}
  grads = {'w': jnp.full((64, 64), 0.5)}

  def last_step(tx):
    state = tx.init(params)
    for _ in range(20):
      updates, state = tx.update(grads, state, params)
    return float(jnp.max(jnp.abs(updates['w'])))

  belief = last_step(optax_paged.adabelief8bit(1e-3))
  adam = last_step(optax_paged.adam8bit(1e-3))
  assert adam < 1.01e-3 and belief > 2 * adam, (belief, adam)
