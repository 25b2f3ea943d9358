"""The update's FFI calls: a dtype group in runs of bounded gradient bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from optax_paged._src import spmd
from tests.helpers import random_grads
from tests.helpers import random_tree


def test_call_chunks_cut_in_order_at_the_limit():
  assert spmd.call_chunks([4, 1, 7, 2], [30, 30, 30, 30], 60) == [(4, 1),
                                                                 (7, 2)]
  assert spmd.call_chunks([0, 1, 2], [10, 10, 10], 25) == [(0, 1), (2,)]
  assert spmd.call_chunks([0, 1, 2], [10, 10, 10], 30) == [(0, 1, 2)]


def test_call_chunks_give_a_leaf_past_the_limit_a_call_of_its_own():
  assert spmd.call_chunks([0, 1, 2, 3], [5, 100, 5, 5], 20) == [(0,), (1,),
                                                               (2, 3)]
  assert spmd.call_chunks([], [], 20) == []


SHAPES = [(300,), (64, 65), (1000,), (17, 33), (2048,)]


def _calls(tx, params, grads, state):
  jaxpr = jax.make_jaxpr(
      lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p))(
          grads, state, params)
  return sum(eqn.primitive.name == 'optax_paged_update'
             for eqn in jaxpr.eqns)


def _run(make, dtype, monkeypatch, max_bytes):
  monkeypatch.setattr(spmd, 'MAX_CALL_BYTES', max_bytes)
  params = random_tree(SHAPES, dtype, seed=3)
  tx = make()
  state = tx.init(params)
  grads = random_grads(params, seed=1, scale=0.1)
  calls = _calls(tx, params, grads, state)
  step = jax.jit(lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p))
  for i in range(3):
    params, state = step(random_grads(params, seed=10 + i, scale=0.1), state,
                         params)
  saved = optax_paged.state_dict(state)
  return calls, jax.tree.map(np.asarray, (params, saved))


@pytest.mark.parametrize('make, dtype', [
    (lambda: optax_paged.paged_adamw8bit(1e-2, min_8bit_size=1),
     jnp.float32),
    (lambda: optax_paged.paged_adamw8bit(1e-2, min_8bit_size=1,
                                         device_budget=0), jnp.float32),
    (lambda: optax_paged.paged_adamw4bit(1e-2, min_8bit_size=1),
     jnp.float32),
    (lambda: optax_paged.paged_adamw8bit(1e-2, min_8bit_size=1,
                                         master_weight_bits=24),
     jnp.bfloat16),
], ids=['8bit', '8bit_host_tier', '4bit', 'bf16_master24'])
def test_a_group_in_several_calls_steps_as_one_call(make, dtype,
                                                    monkeypatch):
  one_calls, one = _run(make, dtype, monkeypatch, spmd.MAX_CALL_BYTES)
  # 4 KiB of gradients a call: the five leaves (1.2 to 16.6 KiB in float32)
  # take a call each, but for the third and fourth, which share one in bf16.
  many_calls, many = _run(make, dtype, monkeypatch, 4096)
  assert one_calls == 1
  assert many_calls == (4 if dtype == jnp.bfloat16 else 5)
  jax.tree.map(np.testing.assert_array_equal, many, one)
