"""Master weights of 16-bit parameters, on the CPU kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import families
from optax_paged._src import reference
from tests.helpers import _ulp
from tests.helpers import assert_equal_but_for_code_flips
from tests.helpers import kernel_runs_on_cpu
from tests.helpers import random_grads
from tests.helpers import random_tree

# (factory, its family, code bits) over the kernels' storage kinds.
CASES = [('adamw8bit', 'adamw', 8), ('paged_adamw', 'adamw', 8),
         ('adamw4bit', 'adamw', 4), ('lion8bit', 'lion', 8),
         ('paged_ademamix8bit', 'ademamix', 8)]
SHAPES = [(300,), (64, 65)]  # partial fingerprint and quantization blocks


def _kwargs(factory):
  return {} if factory.startswith('paged_') and 'bit' not in factory else {
      'min_8bit_size': 1}


@pytest.mark.parametrize('bits', [24, 32])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16],
                         ids=lambda d: d.__name__)
@pytest.mark.parametrize('factory, family, code_bits', CASES,
                         ids=[c[0] for c in CASES])
def test_kernel_equals_reference_bit_for_bit(factory, family, code_bits,
                                             dtype, bits):
  params = random_tree(SHAPES, dtype, seed=1)
  tx = getattr(optax_paged, factory)(1e-3, master_weight_bits=bits,
                                     **_kwargs(factory))
  ref_tx = reference.reference_transformation(
      families.spec(family, 1e-3), min_8bit_size=1, code_bits=code_bits,
      quantize='bit' in factory, master_weight_bits=bits)
  state, ref_state = tx.init(params), ref_tx.init(params)
  step = jax.jit(tx.update)
  for i in range(4):
    grads = random_grads(params, seed=10 + i, scale=0.1)
    updates, state = step(grads, state, params)
    ref_updates, ref_state = ref_tx.update(grads, ref_state, params)
    for name in params:
      if kernel_runs_on_cpu():
        np.testing.assert_array_equal(
            np.asarray(updates[name]).view(np.uint16),
            np.asarray(ref_updates[name]).view(np.uint16), err_msg=(i, name))
      else:
        # The GPU contracts into FMA: a master an fp32 ulp away may round to
        # the neighbouring parameter.
        slack = _ulp(np.asarray(params[name], np.float32), dtype)
        np.testing.assert_array_less(
            np.abs(np.asarray(updates[name], np.float32)
                   - np.asarray(ref_updates[name], np.float32)),
            slack * 1.01, err_msg=(i, name))
    params = optax.apply_updates(params, updates)


def _train(tx, params, grads_at, steps):
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p))
  for i in range(steps):
    params, state = step(grads_at(i, params), state, params)
  return params, state


def test_a_32_bit_master_is_the_float32_run_bit_for_bit():
  # The same gradients (bf16 values) to both runs: the master weights of
  # the bf16 run are the float32 run's parameters, exactly. (Parameters
  # that no step takes across zero or below half their size: there the
  # update to the master's rounding is not a bf16 number; see the guide.)
  w = jax.random.normal(jax.random.PRNGKey(0), (64, 130)) * 0.3
  p32 = {'w': (w + jnp.sign(w)).astype(jnp.bfloat16).astype(jnp.float32)}
  p16 = {'w': p32['w'].astype(jnp.bfloat16)}

  def grads_at(i, params):
    g = jax.random.normal(jax.random.PRNGKey(100 + i), (64, 130)) * 0.01
    return {'w': g.astype(jnp.bfloat16).astype(params['w'].dtype)}

  ours, state = _train(
      optax_paged.adamw8bit(1e-3, master_weight_bits=32, min_8bit_size=1),
      p16, grads_at, 100)
  theirs, _ = _train(optax_paged.adamw8bit(1e-3, min_8bit_size=1), p32,
                     grads_at, 100)
  masters = optax_paged.master_params(state, ours)
  if not kernel_runs_on_cpu():
    # On the GPU the two runs' kernels (two instantiations) may contract
    # differently into FMA; over 100 steps more moments meet a code boundary.
    assert_equal_but_for_code_flips(masters['w'], theirs['w'],
                                    learning_rate=1e-3, flipped_fraction=1e-3)
    return
  np.testing.assert_array_equal(np.asarray(masters['w']).view(np.uint32),
                                np.asarray(theirs['w']).view(np.uint32))
  # The parameter is its master rounded to nearest.
  np.testing.assert_array_equal(
      np.asarray(ours['w'], np.float32),
      np.asarray(theirs['w'].astype(jnp.bfloat16), np.float32))


def test_fused_step_equals_update_and_apply():
  params = random_tree(SHAPES, jnp.bfloat16, seed=2)
  tx_a = optax_paged.adamw8bit(1e-2, master_weight_bits=24, min_8bit_size=1)
  tx_b = optax_paged.adamw8bit(1e-2, master_weight_bits=24, min_8bit_size=1)
  pa, sa = params, tx_a.init(params)
  pb, sb = params, tx_b.init(params)
  for i in range(5):
    grads = random_grads(params, seed=20 + i, scale=0.1)
    pa, sa = optax_paged.apply_gradients(tx_a, grads, sa, pa)
    updates, sb = tx_b.update(grads, sb, pb)
    pb = optax.apply_updates(pb, updates)
    for name in params:
      np.testing.assert_array_equal(np.asarray(pa[name]).view(np.uint16),
                                    np.asarray(pb[name]).view(np.uint16))


def test_small_steps_accumulate_in_the_master():
  # Steps of a hundredth of a bf16 ulp: plain bf16 parameters never move;
  # with a master they move by the steps' sum.
  params = {'w': jnp.ones((256,), jnp.bfloat16)}
  grads = {'w': jnp.ones((256,), jnp.bfloat16)}
  # SGD: each step is -lr * g = -1e-4, a 78th of bf16's ulp below 1.
  plain = optax_paged.sgd8bit(1e-4)
  master = optax_paged.sgd8bit(1e-4, master_weight_bits=32)
  moved = {}
  for name, tx in (('plain', plain), ('master', master)):
    p, state = params, tx.init(params)
    for _ in range(100):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    moved[name] = p
    if name == 'master':
      masters = optax_paged.master_params(state, p)
  np.testing.assert_array_equal(np.asarray(moved['plain']['w'], np.float32),
                                1.0)
  expected = np.float32(1.0)
  for _ in range(100):
    expected = np.float32(expected - np.float32(1e-4))
  np.testing.assert_array_equal(np.asarray(masters['w']), expected)
  np.testing.assert_array_equal(
      np.asarray(moved['master']['w'], np.float32),
      np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32))


def test_parameters_changed_outside_drop_their_correction_and_are_counted():
  params = {'w': jnp.ones((512,), jnp.bfloat16)}
  grads = {'w': jnp.full((512,), 0.3, jnp.bfloat16)}
  tx = optax_paged.sgd8bit(1e-4, master_weight_bits=32)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  before = optax_paged.master_params(state, params)['w']
  assert np.all(np.asarray(before) != np.asarray(params['w'], np.float32))
  # New weights for the second block of 128 only (a load, an edit).
  loaded = {'w': params['w'].at[128:256].set(2.0)}
  masters = optax_paged.master_params(state, loaded)['w']
  np.testing.assert_array_equal(np.asarray(masters[128:256]), 2.0)
  np.testing.assert_array_equal(np.asarray(masters[:128]),
                                np.asarray(before[:128]))
  assert optax_paged.memory_report(state).master_weight_resets == 0
  updates, state = tx.update(grads, state, loaded)
  assert optax_paged.memory_report(state).master_weight_resets == 1
  after = optax.apply_updates(loaded, updates)
  masters = optax_paged.master_params(state, after)['w']
  expected = np.float32(2.0) - np.float32(1e-4) * np.float32(0.30078125)
  np.testing.assert_array_equal(np.asarray(masters[128:256]), expected)


def test_master_weights_are_refused_where_they_cannot_apply():
  with pytest.raises(ValueError, match='all float32'):
    optax_paged.adamw8bit(1e-3, master_weight_bits=24).init(
        {'w': jnp.ones((8,))})
  with pytest.raises(ValueError, match='trust ratio'):
    optax_paged.lamb8bit(1e-3, master_weight_bits=24)
  params = {'w': jnp.ones((8,), jnp.bfloat16)}
  tx = optax_paged.adamw8bit(1e-3, master_weight_bits=24)
  state = tx.init(params)
  with pytest.raises(ValueError, match='stochastic_rounding'):
    optax_paged.apply_gradients(tx, params, state, params,
                                stochastic_rounding=True)
  # Refused before anything ran: the state is still at step 0.
  assert int(state.count) == 0


def test_float32_leaves_beside_bf16_ones_keep_no_correction():
  params = {'norm': jnp.ones((8,)), 'w': jnp.ones((300,), jnp.bfloat16)}
  tx = optax_paged.adamw8bit(1e-3, master_weight_bits=32, min_8bit_size=1)
  state = tx.init(params)
  infos = [state.buffers.record().entries[0].leaf_info(i) for i in range(2)]
  assert [info['correction_bits'] for info in infos] == [0, 16]
  masters = optax_paged.master_params(state, params)
  assert masters['norm'].dtype == jnp.float32
  assert masters['w'].dtype == jnp.float32
