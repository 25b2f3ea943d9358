"""Steps on one state from several threads take turns: no update is lost."""

import threading

import jax
import jax.numpy as jnp
import numpy as np

import optax_paged
from tests.helpers import moments_of
from tests.helpers import update_and_apply


def test_two_threads_stepping_one_state_lose_no_update():
  # The moments' update does not depend on the step count, so with the same
  # gradients every step, any order of the 2k steps gives the same moments.
  params = {'w': jnp.ones((1024, 1024)), 'b': jnp.ones((4096,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  steps = 6

  def run_threads():
    tx = optax_paged.adamw8bit(1e-3)
    state = tx.init(params)
    step = jax.jit(update_and_apply(tx))
    step(params, state, grads)  # compile first; this is step 1
    barrier = threading.Barrier(2)

    def worker():
      barrier.wait()
      for _ in range(steps):
        jax.block_until_ready(step(params, state, grads))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    return state

  def run_serial():
    tx = optax_paged.adamw8bit(1e-3)
    state = tx.init(params)
    step = jax.jit(update_and_apply(tx))
    for _ in range(2 * steps + 1):
      jax.block_until_ready(step(params, state, grads))
    return state

  serial = moments_of(run_serial())
  for _ in range(3):
    threaded = moments_of(run_threads())
    for (_, ours), (_, theirs) in zip(threaded, serial, strict=True):
      for a, b in zip(ours, theirs, strict=True):
        for name in a:
          np.testing.assert_array_equal(a[name], b[name])
