"""Master weights on the GPU kernel: tiers, budgets, agreement with the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import ffi
from tests.helpers import _ulp
from tests.helpers import assert_equal_but_for_code_flips
from tests.helpers import random_tree

pytestmark = pytest.mark.skipif(
    not ffi.has_cuda_backend(), reason='needs a CUDA GPU and the CUDA build')

# Partial fingerprint blocks, partial 8-bit blocks, a leaf of host runs.
SHAPES = [(300,), (4096, 257), (8192 * 3 + 700,), (3, 7)]
FACTORIES = [optax_paged.paged_adamw8bit, optax_paged.paged_adamw4bit,
             optax_paged.paged_lion8bit, optax_paged.paged_adamw]


def _grads(params, seed):
  return jax.tree.map(
      lambda p: (jax.random.normal(jax.random.PRNGKey(seed), p.shape) * 0.05
                 ).astype(p.dtype), params)


def _run(tx, params, steps, fused):
  def step(p, s, g):
    if fused:
      return optax_paged.apply_gradients(tx, g, s, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step)
  state = tx.init(params)
  for i in range(steps):
    params, state = step(params, state, _grads(params, i))
  return params, state


def _bits(tree):
  return [np.asarray(x).view(np.uint16) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('fused', [False, True], ids=['update', 'fused'])
@pytest.mark.parametrize('factory', FACTORIES, ids=lambda f: f.__name__)
def test_host_and_mixed_tiers_equal_the_device_tier(factory, fused):
  params = random_tree(SHAPES, jnp.bfloat16, seed=1)
  make = lambda budget: factory(  # noqa: E731
      1e-3, master_weight_bits=24, device_budget=budget)
  p_dev, s_dev = _run(make(1.0), params, 3, fused)
  p_host, _ = _run(make(0), params, 3, fused)
  sizes = [row.bytes for row in optax_paged.memory_report(
      make(0).init(params)).rows]
  p_mix, _ = _run(make(sizes[1]), params, 3, fused)
  np.testing.assert_equal(_bits(p_dev), _bits(p_host))
  np.testing.assert_equal(_bits(p_dev), _bits(p_mix))
  assert optax_paged.memory_report(s_dev).master_weight_resets == 0


def test_budget_moves_between_steps_keep_the_masters():
  params = random_tree(SHAPES, jnp.bfloat16, seed=2)
  make = lambda: optax_paged.paged_adamw8bit(  # noqa: E731
      1e-3, master_weight_bits=32, device_budget=1.0)
  p_full, s_full = _run(make(), params, 6, True)
  p, s = _run(make(), params, 3, True)
  optax_paged.set_device_budget(s, 0)
  assert {r.tier for r in optax_paged.memory_report(s).rows} == {'host'}
  tx = make()
  step = jax.jit(lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p))
  # The state's own optimizer steps it on: same hyperparameters.
  for i in range(3, 6):
    p, s = step(p, s, _grads(p, i))
  np.testing.assert_equal(_bits(p), _bits(p_full))
  m = optax_paged.master_params(s, p)
  m_full = optax_paged.master_params(s_full, p_full)
  for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(m_full), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_automatic_budget_runs_with_masters():
  params = random_tree(SHAPES, jnp.bfloat16, seed=3)
  p_auto, _ = _run(optax_paged.paged_adamw8bit(
      1e-3, master_weight_bits=24, device_budget='auto'), params, 3, True)
  p_dev, _ = _run(optax_paged.paged_adamw8bit(
      1e-3, master_weight_bits=24, device_budget=1.0), params, 3, True)
  np.testing.assert_equal(_bits(p_auto), _bits(p_dev))


@pytest.mark.parametrize('bits', [24, 32])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16],
                         ids=lambda d: d.__name__)
def test_gpu_agrees_with_the_cpu_kernel(dtype, bits):
  # The GPU contracts into FMA: an update an fp32 ulp away may round to the
  # neighbouring parameter, so parameters agree to one ulp, masters but for
  # the elements whose moments took a neighbouring code.
  params = random_tree(SHAPES, dtype, seed=4)
  tx = optax_paged.adamw8bit(1e-3, master_weight_bits=bits)
  p_gpu, s_gpu = _run(tx, params, 3, True)
  cpu = jax.devices('cpu')[0]
  with jax.default_device(cpu):
    p_cpu, s_cpu = _run(tx, jax.device_put(params, cpu), 3, True)
    m_cpu = optax_paged.master_params(s_cpu, p_cpu)
  m_gpu = optax_paged.master_params(s_gpu, p_gpu)
  for a, b in zip(jax.tree.leaves(p_gpu), jax.tree.leaves(p_cpu),
                  strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.abs(a - b) <= _ulp(b, dtype)), np.max(np.abs(a - b))
  for a, b in zip(jax.tree.leaves(m_gpu), jax.tree.leaves(m_cpu),
                  strict=True):
    # cuda_test's rule for three steps of the plain kernel.
    assert_equal_but_for_code_flips(a, b, learning_rate=1e-3,
                                    flipped_fraction=1e-4)


@pytest.mark.parametrize('budget', [1.0, 0], ids=['device', 'host'])
def test_parameters_changed_outside_reset_on_the_gpu_too(budget):
  # On the host tier the reset count is an atomic add in host memory.
  params = {'w': jnp.ones((512,), jnp.bfloat16)}
  grads = {'w': jnp.full((512,), 0.3, jnp.bfloat16)}
  tx = optax_paged.paged_adamw8bit(1e-4, master_weight_bits=32,
                                   device_budget=budget)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  loaded = {'w': params['w'].at[128:256].set(2.0)}
  updates, state = tx.update(grads, state, loaded)
  assert optax_paged.memory_report(state).master_weight_resets == 1
