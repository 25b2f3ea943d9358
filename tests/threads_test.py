"""Steps on one state from several threads: each count is applied once.

The handler checks the count against the moments' step and advances it under
the state's lock (on a GPU, in the kernel), so threads racing to step the
same state object (the same count) cannot both apply their update: exactly
one does, the others are refused (on a GPU: NaN results and a mark) with the
state left as that one step made it.
"""

import contextlib
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from optax_paged._src import state_io
from tests import background
from tests.helpers import moments_of
from tests.helpers import random_tree
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


# Many leaves, so that reading or writing a whole state takes as long as a
# step: a copy that let go of the state's lock between leaves was overtaken
# by a step in tens of a hundred tries.
MANY = random_tree([(64, 64)] * 128, seed=3)


def _update_of(tx, params):
  """A jitted step that returns the new state only."""
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  return jax.jit(lambda state: tx.update(grads, state, params)[1])


def _saved_moments(saved):
  return [[{name: np.asarray(a) for name, a in m.items()}
           for m in leaf['moments']] for leaf in saved['leaves']]


def _same(a, b):
  return all(np.array_equal(x[name], y[name])
             for leaf_a, leaf_b in zip(a, b, strict=True)
             for x, y in zip(leaf_a, leaf_b, strict=True) for name in x)


@pytest.fixture
def frequent_switches():
  """The two threads take turns every 0.1 ms rather than every 5 ms: an
  export that let go of the lock between leaves was overtaken by a step in
  about one of five tries, against one of a hundred."""
  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-4)
  yield
  sys.setswitchinterval(interval)


def test_state_dict_while_another_thread_steps_is_one_steps_moments(
    frequent_switches):
  tx = optax_paged.adamw8bit(1e-3)
  update = _update_of(tx, MANY)
  steps = 100
  state = tx.init(MANY)
  serial = [_saved_moments(optax_paged.state_dict(state))]
  for _ in range(steps):
    state = update(state)
    serial.append(_saved_moments(optax_paged.state_dict(state)))
  optax_paged.release(state)
  latest = [tx.init(MANY)]
  done = threading.Event()

  def stepper():
    state = latest[0]
    for _ in range(steps):
      state = jax.block_until_ready(update(state))
      latest[0] = state
    done.set()

  thread = threading.Thread(target=stepper)
  thread.start()
  snapshots = []
  while not done.is_set():
    try:
      snapshots.append(optax_paged.state_dict(latest[0]))
    except ValueError as error:  # a step landed after the count was read
      assert 'moments are at step' in str(error), error
  thread.join()
  torn = [int(saved['count']) for saved in snapshots
          if not _same(_saved_moments(saved), serial[int(saved['count'])])]
  assert len(snapshots) > 0
  assert not torn, (
      f'{len(torn)} of {len(snapshots)} snapshots mix steps (counts {torn})')


def test_load_state_dict_while_another_thread_steps_is_never_torn():
  tx = optax_paged.adamw8bit(1e-3)
  update = _update_of(tx, MANY)
  checkpoint = tx.init(MANY)
  for _ in range(3):
    checkpoint = update(checkpoint)
  saved = optax_paged.state_dict(checkpoint)
  expected = _saved_moments(saved)
  # At a count no step of the other thread reaches, so that every step
  # after the load is refused and the moments stay the checkpoint's.
  far = 10**6
  saved['count'] = np.asarray(far, np.int32)
  saved['checksum'] = np.asarray(state_io._checksum(saved['leaves'], far),
                                 np.uint32)
  trials, torn = 40, 0
  for _ in range(trials):
    state = tx.init(MANY)
    started = threading.Event()

    def stepper(state=state, started=started):
      with contextlib.suppress(Exception):  # refused once the load lands
        for i in range(200):
          state = jax.block_until_ready(update(state))
          if i == 1:
            started.set()
      started.set()

    thread = threading.Thread(target=stepper)
    thread.start()
    started.wait()
    optax_paged.load_state_dict(state, saved)
    thread.join()
    final = state_io.export_buffers(state.buffers)
    assert int(final['count']) == far
    torn += not _same(_saved_moments(final), expected)
    optax_paged.release(state)
  assert torn == 0, f'{torn} of {trials} loads were torn'


_RELEASE_OF_A_STEPPED_MESH_STATE = background.python_job('''
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
      import threading, time
      import jax, jax.numpy as jnp, optax
      from jax.sharding import NamedSharding, PartitionSpec as P
      import optax_paged
      mesh = jax.make_mesh((4,), ('x',))
      params = jax.device_put({'w': jnp.ones((256, 64)), 'b': jnp.ones(4096)},
                              NamedSharding(mesh, P('x')))
      grads = jax.tree.map(lambda p: p * 0.01, params)
      tx = optax_paged.adamw8bit(1e-3)

      @jax.jit
      def step(p, s):
        u, s = tx.update(grads, s, p)
        return optax.apply_updates(p, u), s

      errors = []
      for trial in range(5):
        state = tx.init(params)
        p, state = jax.block_until_ready(step(params, state))

        def worker(p=p, s=state):
          # Steps until the release refuses one: a fixed number of steps
          # was all dispatched before the release on a fast machine.
          deadline = time.monotonic() + 30
          try:
            while time.monotonic() < deadline:
              p, s = step(p, s)
            jax.block_until_ready(p)
          except Exception as error:
            errors.append(str(error))

        thread = threading.Thread(target=worker)
        thread.start()
        time.sleep(0.05)
        optax_paged.release(state)
        thread.join()
      print(len(errors))
      for error in errors:
        print(repr(error))
''', timeout=300)

# It runs beside the other tests (tests/background.py).
BACKGROUND_JOBS = {
    'threads-release-of-a-stepped-mesh-state': (
        _RELEASE_OF_A_STEPPED_MESH_STATE,
        ['test_release_of_a_mesh_state_another_thread_steps_fails_in_one_line']),
}


def test_release_of_a_mesh_state_another_thread_steps_fails_in_one_line():
  result = background.result('threads-release-of-a-stepped-mesh-state',
                             _RELEASE_OF_A_STEPPED_MESH_STATE)
  assert result.returncode == 0, result.stderr[-3000:]
  count, *errors = result.stdout.strip().splitlines()
  assert int(count) == len(errors) > 0, result.stdout[-3000:]
  for error in errors:
    message = eval(error)  # noqa: S307 - the repr printed above
    assert 'released' in message, message[:2000]
    assert '\n' not in message and len(message) < 400, message[:2000]
    assert 'Error dispatching' not in message and 'pmap' not in message, (
        message[:2000])
