"""memory_guarded: the step it runs, its compile cache and its retry.

The moves themselves need a GPU (tests/cuda_test.py and
tests/memory_pressure_test.py); here the step on the CPU, where no state is
paged, and the retry path with a stand-in for XLA's out-of-memory error.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_paged
from optax_paged._src import auto_budget
from optax_paged._src import memory_guard
from optax_paged._src import paging
from optax_paged._src import registry
from tests.helpers import FakeTierEntry
from tests.helpers import assert_trees_equal
from tests.helpers import random_tree


def _train_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def test_guarded_step_gives_the_jitted_steps_results():
  tx = optax_paged.paged_adamw8bit(1e-3, device_budget='auto')
  params = random_tree([(64, 33), (5000,)], seed=0)
  grads = random_tree([(64, 33), (5000,)], seed=1, scale=0.01)
  plain = jax.jit(_train_step(tx))
  guarded = optax_paged.memory_guarded(_train_step(tx), donate_argnums=(1,))
  p_ref, s_ref = params, tx.init(params)
  p, s = params, tx.init(params)
  for _ in range(3):
    p_ref, s_ref = plain(p_ref, s_ref, grads)
    p, s = guarded(p, s, grads)
  assert_trees_equal(p, p_ref)
  assert_trees_equal(optax_paged.state_dict(s), optax_paged.state_dict(s_ref))


def test_the_step_is_analysed_once_per_signature():
  def step(x, scale):
    return jnp.sort(x) * scale

  guarded = optax_paged.memory_guarded(step, static_argnums=1)
  sizes = {guarded.allocation(jnp.ones((100,)), 2.0) for _ in range(3)}
  assert len(guarded.needs) == 1
  guarded.allocation(jnp.ones((101,)), 2.0)
  guarded.allocation(jnp.ones((100,)), 3.0)
  assert len(guarded.needs) == 3
  # The output (400 bytes; a sort's temporaries on top) is allocated.
  assert len(sizes) == 1
  size = sizes.pop()
  assert size.total >= 400 and 0 <= size.temporaries <= size.total


def test_retry_refuses_donation():
  with pytest.raises(ValueError, match='donate'):
    optax_paged.memory_guarded(lambda x: x, donate_argnums=0, retry=True)
  with pytest.raises(ValueError, match='donate'):
    optax_paged.memory_guarded(lambda x: x, donate_argnames='x', retry=True)


def test_jit_options_pass_through_and_static_names_key_the_analysis():
  def step(x, scale):
    return x * scale

  guarded = optax_paged.memory_guarded(step, static_argnames='scale',
                                       donate_argnums=0)
  x = jnp.arange(8.0)
  assert float(guarded(x, scale=2.0)[1]) == 2.0
  assert x.is_deleted()  # donated, as asked
  # A static argument by name or by position keys the analysis by value.
  guarded.allocation(jnp.ones(8), scale=2.0)
  guarded.allocation(jnp.ones(8), scale=3.0)
  guarded.allocation(jnp.ones(8), 4.0)
  assert len(guarded.needs) == 3
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  placed = optax_paged.memory_guarded(step, static_argnums=1,
                                      in_shardings=(sharding,))
  assert float(placed(jnp.arange(8.0), 2.0)[1]) == 2.0


class _FlakyStep:
  """Stands in for a jitted step whose first calls run out of memory."""

  def __init__(self, failures, message='RESOURCE_EXHAUSTED: Out of memory',
               delete=None):
    self.failures = failures
    self.message = message
    self.delete = delete
    self.calls = 0
    self.jitted = jax.jit(lambda x: x * 2)

  def __call__(self, x):
    self.calls += 1
    if self.calls <= self.failures:
      if self.delete is not None:
        self.delete.delete()
      raise RuntimeError(self.message)
    return self.jitted(x)

  def lower(self, x):
    return self.jitted.lower(x)


def _guard(flaky, retry=True):
  return memory_guard.MemoryGuardedStep(
      flaky, flaky, static_argnums=(), retry=retry,
      policy=auto_budget.AutoBudget())


def test_retry_runs_an_out_of_memory_step_again_once():
  flaky = _FlakyStep(failures=1)
  step = _guard(flaky)
  assert float(step(jnp.float32(3.0))) == 6.0
  assert flaky.calls == 2 and step.retries == 1


def test_retry_gives_up_after_one_more_failure():
  step = _guard(_FlakyStep(failures=2))
  with pytest.raises(RuntimeError, match='RESOURCE_EXHAUSTED'):
    step(jnp.float32(3.0))


def test_retry_refuses_when_an_argument_was_consumed():
  x = jnp.arange(4.0)
  step = _guard(_FlakyStep(failures=1, delete=x))
  with pytest.raises(RuntimeError, match='donated'):
    step(x)


def test_other_errors_are_not_retried():
  flaky = _FlakyStep(failures=1, message='INVALID_ARGUMENT: no')
  with pytest.raises(RuntimeError, match='INVALID_ARGUMENT'):
    _guard(flaky)(jnp.float32(1.0))
  assert flaky.calls == 1


def test_without_retry_an_error_propagates_from_the_call():
  flaky = _FlakyStep(failures=1)
  with pytest.raises(RuntimeError, match='RESOURCE_EXHAUSTED'):
    _guard(flaky, retry=False)(jnp.float32(1.0))
  assert flaky.calls == 1


GiB = 1 << 30


class _FakeDevice:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


class _FakeRecord:
  """A paged record's interface to the guard: one entry on one device."""

  def __init__(self, entry, device, caps=None):
    self.entries, self.devices = (entry,), (device,)
    self.leaves = [None] * len(entry.sizes)
    self.budget_policy, self.budget_caps = None, caps
    self.moves = registry.MoveStats()


def _room_maker(monkeypatch, free):
  monkeypatch.setattr(paging, 'gpu_memory', lambda ordinal=0: (free[0], 0))
  monkeypatch.setattr(registry, 'wait_for_devices', lambda record: None)
  return memory_guard.MemoryGuardedStep(
      None, None, static_argnums=(), retry=False,
      policy=auto_budget.AutoBudget(margin=GiB, grow_threshold=GiB // 2))


# The guard's decisions, with the GPU's numbers made up: these moves are
# what tests/cuda_test.py cannot provoke on demand.
def test_a_step_that_fits_the_idle_pool_moves_nothing(monkeypatch):
  free = [GiB + GiB // 2]  # the device is nearly full: the margin is left
  guard = _room_maker(monkeypatch, free)
  device = _FakeDevice({'bytes_in_use': 6 * GiB, 'pool_bytes': 10 * GiB,
                        'largest_free_block_bytes': 4 * GiB,
                        'bytes_limit': 20 * GiB})
  entry = FakeTierEntry(['device'] * 4, [GiB] * 4)
  guard._make_room([_FakeRecord(entry, device, caps=(4 * GiB,))],  # noqa: SLF001
                   memory_guard.StepAllocation(4 * GiB, 3 * GiB))
  assert entry.calls == []


def test_a_growing_step_moves_state_out_and_it_comes_back_to_its_cap(
    monkeypatch):
  free = [9 * GiB]
  guard = _room_maker(monkeypatch, free)
  stats = {'bytes_in_use': 6 * GiB, 'pool_bytes': 10 * GiB,
           'largest_free_block_bytes': GiB, 'bytes_limit': 20 * GiB}
  device = _FakeDevice(stats)
  entry = FakeTierEntry(['device'] * 4, [GiB] * 4)
  record = _FakeRecord(entry, device, caps=(4 * GiB,))
  # The 3 GiB temporaries fit no free block: the pool grows, which may take
  # the 10 GiB left to XLA's limit: 9 free + 4 ours - 10 - 1 margin = 2.
  need = memory_guard.StepAllocation(4 * GiB, 3 * GiB)
  guard._make_room([record], need)  # noqa: SLF001
  assert entry.calls == [(2, 'host'), (3, 'host')]
  assert record.moves.count == 2
  free[0] += 2 * GiB  # what the device shows after the move
  # The same again: nothing moves (the decision is stable).
  guard._make_room([record], need)  # noqa: SLF001
  assert len(entry.calls) == 2
  # The step now fits the pool: back to the fixed budget, no further.
  stats['largest_free_block_bytes'] = 4 * GiB
  free[0] = 30 * GiB
  guard._make_room([record], need)  # noqa: SLF001
  assert entry.calls[2:] == [(2, 'device'), (3, 'device')]


def test_several_states_on_one_gpu_share_the_room(monkeypatch):
  free = [5 * GiB]
  guard = _room_maker(monkeypatch, free)
  device = _FakeDevice({'bytes_in_use': 6 * GiB, 'pool_bytes': 10 * GiB,
                        'largest_free_block_bytes': GiB,
                        'bytes_limit': 15 * GiB})
  first = FakeTierEntry(['device'] * 2, [GiB] * 2)
  second = FakeTierEntry(['device'] * 2, [GiB] * 2)
  # 5 free + 4 ours - 5 for XLA's growth - 1 margin: 3 GiB for both. The
  # first keeps what the second leaves, the second keeps its own.
  guard._make_room(  # noqa: SLF001
      [_FakeRecord(first, device, caps=(2 * GiB,)),
       _FakeRecord(second, device, caps=(2 * GiB,))],
      memory_guard.StepAllocation(4 * GiB, 3 * GiB))
  assert first.calls == [(1, 'host')]
  assert second.calls == []


def test_a_flax_train_state_step_guarded_matches_the_jitted_one():
  from flax.training import train_state  # noqa: PLC0415 - only this test

  params = random_tree([(64, 128), (128,), (128, 4)], seed=3, scale=0.1)
  tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)

  def step(state, target):
    def loss(p):
      hidden = jnp.tanh(target @ p['leaf0'] + p['leaf1'])
      return jnp.mean((hidden @ p['leaf2']) ** 2)
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  def run(make_step):
    state = train_state.TrainState.create(
        apply_fn=None, params=jax.tree.map(jnp.copy, params), tx=tx)
    stepper = make_step(step)
    for i in range(3):
      state = stepper(state, jnp.full((8, 64), 0.1 * (i + 1)))
    return state

  plain = run(lambda f: jax.jit(f, donate_argnums=0))
  guarded = run(lambda f: optax_paged.memory_guarded(f, donate_argnums=0))
  assert int(guarded.step) == 3
  assert_trees_equal(guarded.params, plain.params)
  assert_trees_equal(optax_paged.state_dict(guarded.opt_state),
                     optax_paged.state_dict(plain.opt_state))
