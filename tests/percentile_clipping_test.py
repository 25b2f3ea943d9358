"""percentile_clipping against bitsandbytes' algorithm, written in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from tests import helpers


def _bitsandbytes_clipping(grads, percentile):
  """bitsandbytes' percentile clipping of one tensor over steps 1, 2, ...

  Its kernel stores the squared norm at ``step % 100`` (every slot on step
  1); its Python side takes the ``percentile``-th of the sorted history as
  the squared threshold and scales the gradient by threshold / norm when
  the norm exceeds it.
  """
  history = np.zeros(100, np.float32)
  out = []
  for step, g in enumerate(grads, start=1):
    squared = np.sum(np.square(g, dtype=np.float32), dtype=np.float32)
    if step == 1:
      history[:] = squared
    else:
      history[step % 100] = squared
    norm = np.sqrt(squared)
    threshold = np.sqrt(np.sort(history)[percentile])
    scale = threshold / norm if norm > threshold else np.float32(1.0)
    out.append(g * np.float32(scale))
  return out


def _gradients(steps):
  rng = np.random.default_rng(0)
  # Norms that wander, with spikes the clipping must cut.
  scales = np.exp(rng.normal(0.0, 0.5, steps)).astype(np.float32)
  scales[[7, 30, 31, 90, 120]] *= 50.0
  return [{'w': (rng.normal(size=(64, 80)) * s).astype(np.float32),
           'b': (rng.normal(size=(80,)) * s * 0.1).astype(np.float32)}
          for s in scales]


@pytest.mark.parametrize('percentile', [0, 5, 50, 99])
def test_matches_bitsandbytes_over_more_than_100_steps(percentile):
  grads = _gradients(130)
  tx = optax_paged.percentile_clipping(percentile)
  step = jax.jit(tx.update)
  state = tx.init(grads[0])
  ours = []
  for g in grads:
    clipped, state = step(g, state)
    ours.append(jax.device_get(clipped))
  for name in ('w', 'b'):
    theirs = _bitsandbytes_clipping([g[name] for g in grads], percentile)
    for a, b in zip(ours, theirs, strict=True):
      np.testing.assert_allclose(a[name], b, rtol=2e-6, atol=0)
  # The spikes were cut, except at the 99th: the history includes the
  # current norm, so its largest entry never clips.
  cut = [np.linalg.norm(o['w']) < 0.99 * np.linalg.norm(g['w'])
         for o, g in zip(ours, grads, strict=True)]
  assert not cut[0]
  assert any(cut) == (percentile < 99)


def test_chains_before_an_8bit_optimizer_under_jit():
  params = helpers.random_tree([(64, 80), (300,)])
  tx = optax.chain(optax_paged.percentile_clipping(5),
                   optax_paged.adamw8bit(1e-3))
  step = jax.jit(helpers.update_and_apply(tx))
  state = tx.init(params)
  for i in range(3):
    grads = helpers.random_tree([(64, 80), (300,)], seed=i, scale=10.0 ** i)
    params, state = step(params, state, grads)
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
  assert int(state[0].count) == 3


@pytest.mark.parametrize('bad', [-1, 100, 5.0, True])
def test_refuses_a_percentile_outside_0_to_99(bad):
  with pytest.raises(ValueError, match='percentile'):
    optax_paged.percentile_clipping(bad)
