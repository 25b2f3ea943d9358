"""Steps on one state from several threads: each count is applied once.

The handler checks the count against the moments' step and advances it under
the state's lock (on a GPU, in the kernel), so threads racing to step the
same state object (the same count) cannot both apply their update: exactly
one does, the others are refused (on a GPU: NaN results and a mark) with the
state left as that one step made it.
"""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from tests.helpers import moments_of
from tests.helpers import update_and_apply

PARAMS = {'w': jnp.ones((1024, 1024)), 'b': jnp.ones((4096,))}
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.01), PARAMS)


def _assert_same_moments(ours, theirs):
  for (_, a_leaf), (_, b_leaf) in zip(ours, theirs, strict=True):
    for a, b in zip(a_leaf, b_leaf, strict=True):
      for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize('threads', [2, 4])
def test_threads_stepping_one_state_apply_its_step_once(threads):
  tx = optax_paged.adamw8bit(1e-3)
  step = jax.jit(update_and_apply(tx))
  serial = tx.init(PARAMS)
  _, serial_next = step(PARAMS, serial, GRADS)
  _, serial_next = step(PARAMS, serial_next, GRADS)
  expected = moments_of(serial_next)

  for _ in range(3):
    state = tx.init(PARAMS)
    _, state = step(PARAMS, state, GRADS)  # compiled; step 1
    barrier = threading.Barrier(threads)
    outcomes = []

    def worker(state=state, outcomes=outcomes, barrier=barrier):
      barrier.wait()
      try:
        params, new_state = jax.block_until_ready(step(PARAMS, state, GRADS))
      except Exception as error:  # noqa: BLE001 - the refusal is the point
        assert 'moments are at step 2' in str(error), error
        outcomes.append('refused')
      else:
        leaves = jax.tree.leaves(params)
        nan = all(np.isnan(np.asarray(x)).all() for x in leaves)
        outcomes.append('refused' if nan else new_state)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
      t.start()
    for t in workers:
      t.join()
    stepped = [o for o in outcomes if not isinstance(o, str)]
    assert outcomes.count('refused') == threads - 1 and len(stepped) == 1
    try:  # a GPU's refusals also left a mark; take it
      state.buffers.record().check_device_marks()
    except ValueError as error:
      assert 'moments are at step 2' in str(error)
    _assert_same_moments(moments_of(stepped[0]), expected)
    # The state the threads shared is now behind its moments: refused too.
    with pytest.raises(ValueError, match='moments are at step 2'):
      optax_paged.state_dict(state)
