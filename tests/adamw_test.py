"""The FFI AdamW update against the jnp reference and against optax.adamw."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged import quantization
from optax_paged._src import reference
from tests.helpers import DTYPES
from tests.helpers import compare_one_step_exactly
from tests.helpers import jitted_step
from tests.helpers import random_tree
from tests.helpers import reference_state_from
from tests.helpers import teacher_problem
from tests.helpers import train

# Either side of a 256-block, a partial last block, and a 2-D leaf of over
# 2^18 elements, which the CPU kernel splits into chunks of 64 blocks over
# its thread pool (4097 blocks: a partial last chunk). bitsandbytes' size,
# four times as many rows, runs with -m slow.
ODD_SHAPES = [(1,), (255,), (257,), (4095,), (4096,), (256, 4097),
              pytest.param((1024, 4097), marks=pytest.mark.slow)]


def _grads(params, seed):
  return jax.tree.map(
      lambda p: (
          jax.random.normal(jax.random.PRNGKey(seed), p.shape) * 0.01
      ).astype(p.dtype),
      params,
  )



@pytest.mark.parametrize('dtype', DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize('shape', ODD_SHAPES, ids=str)
def test_ffi_step_equals_reference(shape, dtype):
  params = random_tree([shape], dtype, seed=1)
  kwargs = dict(learning_rate=1e-3, weight_decay=0.01, min_8bit_size=256)
  tx = optax_paged.adamw8bit(**kwargs)
  ref_tx = reference.adamw8bit(**kwargs)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(3):
    _, state = step(_grads(params, i), state, params)
  ref_state = reference_state_from(state, params)
  compare_one_step_exactly(
      state, ref_state, params, _grads(params, 9), tx, ref_tx
  )


def test_mixed_dtypes_and_fp32_leaves_in_one_state():
  params = {
      'big32': jnp.ones((300, 40), jnp.float32),
      'big16': jnp.ones((300, 40), jnp.bfloat16),
      'small': jnp.ones((7,), jnp.float32),
  }
  tx = optax_paged.paged_adamw8bit(1e-2, weight_decay=0.1)
  ref_tx = reference.adamw8bit(1e-2, weight_decay=0.1)
  state = tx.init(params)
  quantized = [leaf.quantized for leaf in state.buffers.record().leaves]
  assert quantized == [True, True, False]  # sorted keys: big16, big32, small
  assert len(state.buffers.record().groups) == 2
  ref_state = ref_tx.init(params)
  for i in range(4):
    grads = _grads(params, i)
    state, _ = compare_one_step_exactly(state, ref_state, params, grads, tx,
                                        ref_tx)
    ref_state = reference_state_from(state, params)


def _with_moments_of(paged_state, optax_state, shape):
  """optax.adam's state holding our dequantized moments (as bnb's test)."""
  leaf = optax_paged.state_dict(paged_state)['leaves'][0]
  m, v = (
      quantization.dequantize_blockwise(
          moment['codes'], moment['absmax'], signed=signed
      ).reshape(shape)
      for moment, signed in zip(leaf['moments'], (True, False), strict=True)
  )
  adam = optax_state[0]._replace(mu=jnp.asarray(m), nu=jnp.asarray(v))
  return (adam,) + tuple(optax_state[1:])


@pytest.mark.parametrize('sync_every', [1, 10])
def test_stays_close_to_optax_adam_over_50_steps(sync_every):
  """bitsandbytes' 8-bit Adam test, with its bounds (tests/test_optim.py).

  Every `sync_every` steps optax.adam continues from our parameters and our
  dequantized moments, as bitsandbytes' test does every 10 steps. With
  sync_every=1 the error is the error of one step: it must meet both of
  bitsandbytes' bounds (mean absolute < 6e-5, mean relative < 6e-4). Between
  syncs every 10 steps the quantization error accumulates; the absolute
  bound must still hold. (The mean relative error is then dominated by the
  parameters nearest zero: bitsandbytes' own Adam8bit, run on CPU on the same
  distribution, gives 7.8e-4 after two steps and 3.6e-3 after six.)
  """
  shape = (256, 4097)  # a million elements: the bounds are means
  p0 = jax.random.normal(jax.random.PRNGKey(0), shape) * 0.1
  ours = optax_paged.paged_adamw8bit(1e-3, weight_decay=0.0)
  theirs = optax.adam(1e-3)
  step_ours, step_theirs = jitted_step(ours), jitted_step(theirs)
  p1, s1 = p0, ours.init(p0)
  p2, s2 = p0, theirs.init(p0)
  for i in range(50):
    g = jax.random.normal(jax.random.PRNGKey(100 + i), shape) * 0.01
    p1, s1 = step_ours(p1, s1, g)
    p2, s2 = step_theirs(p2, s2, g)
    err = np.abs(np.asarray(p1) - np.asarray(p2))
    assert err.mean() < 6e-5, (i, err.mean())
    if sync_every == 1:
      relerr = err / (np.abs(np.asarray(p2)) + 1e-9)
      assert relerr.mean() < 6e-4, (i, relerr.mean())
    if (i + 1) % sync_every == 0:
      p2, s2 = p1, _with_moments_of(s1, s2, shape)


def test_training_reaches_optax_adamw_loss():
  params, loss_fn = teacher_problem()
  kwargs = dict(learning_rate=3e-3, weight_decay=1e-4)
  ours, first = train(
      optax_paged.paged_adamw8bit(**kwargs, min_8bit_size=1024),
      params, loss_fn, 300,
  )
  theirs, _ = train(optax.adamw(**kwargs), params, loss_fn, 300)
  assert ours < 0.5 * first  # it trained
  assert abs(ours - theirs) <= 0.02 * theirs, (ours, theirs)
