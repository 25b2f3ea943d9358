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
