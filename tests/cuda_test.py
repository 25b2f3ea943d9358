"""GPU-only behaviour: memory tiers, the device budget, CPU agreement.

The rest of the suite runs on the GPU too when JAX's default device is one.
"""

import gc
import pathlib
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import ffi
from optax_paged._src import hyperparams
from optax_paged._src import paging
from optax_paged._src import registry
from tests.helpers import assert_trees_equal
from tests.helpers import random_tree

pytestmark = pytest.mark.skipif(
    not ffi.has_cuda_backend(), reason='needs a CUDA GPU and the CUDA build'
)

SHAPES = [(1024, 1024), (4096, 257), (300,), (3, 7)]


def _grads(params, seed):
  return jax.tree.map(
      lambda p: (jax.random.normal(jax.random.PRNGKey(seed), p.shape) * 0.01
                 ).astype(p.dtype),
      params,
  )


def _run(tx, params, steps, fused=False):
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


def _tiers(state):
  return [row.tier for row in optax_paged.memory_report(state).rows]


@pytest.mark.parametrize('fused', [False, True])
def test_host_tier_is_bit_identical_to_device_tier(fused):
  params = random_tree(SHAPES, seed=0)
  p_dev, s_dev = _run(optax_paged.paged_adamw8bit(1e-3, device_budget=1.0),
                      params, 4, fused)
  p_host, s_host = _run(optax_paged.paged_adamw8bit(1e-3, device_budget=0),
                        params, 4, fused)
  assert set(_tiers(s_dev)) == {'device'}
  assert set(_tiers(s_host)) == {'host'}
  assert_trees_equal(p_dev, p_host)
  assert_trees_equal(_without_tiers(optax_paged.state_dict(s_dev)),
                     _without_tiers(optax_paged.state_dict(s_host)))


MIXED_SHAPES = [(300,), (8192 * 3 + 700,), (4096, 257), (3, 7), (1024, 1024),
                (256 * 33,), (5000,)]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('factory', [optax_paged.paged_adamw8bit,
                                     optax_paged.paged_adamw4bit,
                                     optax_paged.paged_lion8bit,
                                     optax_paged.paged_ademamix8bit,
                                     optax_paged.paged_adamw])
def test_mixed_tiers_in_one_launch_are_bit_identical(factory, dtype):
  # Device and host leaves interleaved in one launch, host leaves in runs of
  # 32 blocks with partial runs and partial blocks at their ends.
  params = random_tree(MIXED_SHAPES, dtype=dtype, seed=11)
  p_dev, s_dev = _run(factory(1e-3, device_budget=1.0), params, 3, True)
  sizes = [row.bytes for row in optax_paged.memory_report(
      factory(1e-3, device_budget=0).init(params)).rows]
  budget = sum(sizes[i] for i in (1, 4))  # leaf0 fits too: mixed order
  p_mix, s_mix = _run(factory(1e-3, device_budget=budget), params, 3, True)
  tiers = _tiers(s_mix)
  assert 'host' in tiers and 'device' in tiers
  assert_trees_equal(p_dev, p_mix)
  assert_trees_equal(_without_tiers(optax_paged.state_dict(s_dev)),
                     _without_tiers(optax_paged.state_dict(s_mix)))


def _without_tiers(saved):
  """A state_dict without the (legitimately different) tier of each leaf."""
  for leaf in saved['leaves']:
    del leaf['tier']
  return saved


def test_budget_places_leaves_in_order_and_is_enforced():
  params = random_tree(SHAPES, seed=1)
  state = optax_paged.paged_adamw8bit(1e-3, device_budget=0).init(params)
  sizes = [row.bytes for row in optax_paged.memory_report(state).rows]
  budget = sizes[0] + sizes[1]
  state = optax_paged.paged_adamw8bit(1e-3, device_budget=budget).init(params)
  report = optax_paged.memory_report(state)
  assert report.totals.get('device', 0) <= budget
  assert _tiers(state) == paging.place(sizes, budget)
  assert _tiers(state)[:2] == ['device', 'device']


def test_budget_above_free_memory_is_capped_with_a_warning():
  params = random_tree(SHAPES, seed=2)
  free, _ = paging.gpu_memory()
  with pytest.warns(UserWarning, match='exceeds'):
    state = optax_paged.paged_adamw8bit(
        1e-3, device_budget=10 * free).init(params)
  assert optax_paged.memory_report(state).totals['device'] < free


def test_set_device_budget_moves_buffers_and_keeps_results():
  params = random_tree(SHAPES, seed=3)
  tx = optax_paged.paged_adamw8bit(1e-3, device_budget=1.0)
  p_ref, s_ref = _run(tx, params, 6)

  step = jax.jit(lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p))
  p, s = params, tx.init(params)
  for i in range(6):
    if i == 2:
      optax_paged.set_device_budget(s, 0)
      assert set(_tiers(s)) == {'host'}
    if i == 4:
      optax_paged.set_device_budget(s, 1.0)
      assert set(_tiers(s)) == {'device'}
    p, s = step(p, s, _grads(p, i))
  assert_trees_equal(p, p_ref)
  assert_trees_equal(_without_tiers(optax_paged.state_dict(s)),
                     _without_tiers(optax_paged.state_dict(s_ref)))


def test_auto_budget_gives_way_to_xla_and_comes_back_counting_moves():
  params = random_tree(SHAPES, seed=5)
  p_ref, s_ref = _run(optax_paged.paged_adamw8bit(1e-3, device_budget=1.0),
                      params, 6, fused=True)
  tx = optax_paged.paged_adamw8bit(1e-3, device_budget='auto')
  step = jax.jit(lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p))
  p, s = params, tx.init(params)
  assert set(_tiers(s)) == {'device'}  # a small state, a roomy GPU
  sizes = [row.bytes for row in optax_paged.memory_report(s).rows]
  # Paged state starts in the host tier: init moved every leaf once.
  assert optax_paged.memory_report(s).moves.count == len(sizes)
  moved = []
  for i in range(6):
    jax.block_until_ready(p)
    if i == 2:
      # As if an evaluation pass held all but half the state's bytes: a
      # margin that leaves that much room next to XLA's reserve.
      free, _ = paging.gpu_memory()
      on_device = optax_paged.memory_report(s).totals['device']
      reserve = paging.auto_budget.xla_reserve(
          jax.devices()[0].memory_stats())
      margin = max(0, free + on_device - reserve - sum(sizes) // 2)
      optax_paged.set_device_budget(s, optax_paged.AutoBudget(margin=margin))
      report = optax_paged.memory_report(s)
      assert 0 < report.totals['host']
      assert report.totals.get('device', 0) <= sum(sizes) // 2
      assert _tiers(s) == paging.place(sizes, report.totals.get('device', 0))
      moved.append(report.moves.count - len(sizes))
    if i == 4:
      optax_paged.set_device_budget(s, 'auto')  # the pass is over
      assert set(_tiers(s)) == {'device'}
      moved.append(optax_paged.memory_report(s).moves.count - len(sizes))
    p, s = step(p, s, _grads(p, i))
  # Out and back: every host leaf moved twice, nothing else moved.
  assert moved[0] > 0 and moved[1] == 2 * moved[0]
  assert str(jax.devices()[0]) in optax_paged.memory_report(s).free
  assert_trees_equal(p, p_ref)
  assert_trees_equal(_without_tiers(optax_paged.state_dict(s)),
                     _without_tiers(optax_paged.state_dict(s_ref)))


def test_unpaged_optimizer_uses_plain_device_memory():
  params = random_tree(SHAPES, seed=4)
  state = optax_paged.adamw8bit(1e-3).init(params)
  assert set(_tiers(state)) == {'device (unpaged)'}
  with pytest.raises(ValueError, match='no paged GPU'):
    optax_paged.set_device_budget(state, 0)


@pytest.mark.parametrize('factory', [
    lambda: optax_paged.paged_adamw8bit(1e-3, device_budget=1.0),
    lambda: optax_paged.adamw8bit(1e-3),
])
def test_device_memory_returns_to_baseline(factory):
  params = {'w': jnp.ones((8192, 8192))}  # 128 MiB of 8-bit state
  jax.block_until_ready(params)
  # States an earlier test dropped become orphans during the collection and
  # would be freed by this test's allocation, inside the measurement.
  gc.collect()
  registry.REGISTRY.free_orphans()
  baseline, _ = paging.gpu_memory()
  state = factory().init(params)
  used, _ = paging.gpu_memory()
  assert baseline - used >= 120 * 2**20
  optax_paged.release(state)
  after_release, _ = paging.gpu_memory()
  assert abs(after_release - baseline) <= 4 * 2**20
  state = factory().init(params)
  del state
  gc.collect()
  after_gc, _ = paging.gpu_memory()
  assert abs(after_gc - baseline) <= 4 * 2**20


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('factory', [optax_paged.paged_adamw8bit,
                                     optax_paged.paged_adamw4bit])
def test_gpu_equals_cpu_path(factory, dtype):
  params = random_tree(SHAPES, dtype=dtype, seed=5)
  cpu = jax.devices('cpu')[0]
  tx = factory(1e-3, weight_decay=0.01, min_8bit_size=256)
  p_gpu, s_gpu = _run(tx, params, 3)
  with jax.default_device(cpu):
    p_cpu, s_cpu = _run(tx, jax.device_put(params, cpu), 3)
  assert s_cpu.buffers.record().platform == 'cpu'
  assert s_gpu.buffers.record().platform == 'cuda'
  # A moment an ulp from a rounding boundary may take the neighbouring code
  # on one path; that element's later updates then differ by a code step.
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in zip(jax.tree.leaves(p_gpu), jax.tree.leaves(p_cpu), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    close = np.isclose(a, b, rtol=tolerance, atol=tolerance * 1e-2)
    assert np.mean(~close) < 1e-4
    assert np.max(np.abs(a - b)) < 3 * 1e-3  # three steps of lr 1e-3
  gpu_saved = optax_paged.state_dict(s_gpu)
  cpu_saved = optax_paged.state_dict(s_cpu)
  for a, b in zip(gpu_saved['leaves'], cpu_saved['leaves'], strict=True):
    for ma, mb in zip(a['moments'], b['moments'], strict=True):
      if 'codes' in ma:
        assert np.mean(ma['codes'] != mb['codes']) < 1e-3
        np.testing.assert_allclose(ma['absmax'], mb['absmax'],
                                   rtol=1e-5 if dtype == jnp.float32 else 1e-3)
      else:
        np.testing.assert_allclose(ma['values'], mb['values'], rtol=1e-5,
                                   atol=1e-9)


def test_no_warning_for_a_budget_that_fits():
  params = random_tree(SHAPES, seed=6)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    optax_paged.paged_adamw8bit(1e-3, device_budget=2**20).init(params)


def test_load_state_dict_restores_the_saved_tiers():
  params = random_tree(SHAPES, seed=7)
  saved_from = optax_paged.paged_adamw8bit(1e-3, device_budget=0)
  saved = optax_paged.state_dict(saved_from.init(params))
  fresh = optax_paged.paged_adamw8bit(1e-3, device_budget=1.0).init(params)
  assert set(_tiers(fresh)) == {'device'}
  restored = optax_paged.load_state_dict(fresh, saved)
  assert set(_tiers(restored)) == {'host'}


def test_stochastic_rounding_draws_the_same_bits_as_the_cpu():
  # The random bits are a hash of (step, leaf, element), so both paths round
  # the same elements up; plain SGD leaves no float32 difference to flip one.
  params = {'w': jnp.ones((1 << 16,), jnp.bfloat16),
            'b': jnp.full((300,), 0.5, jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, -1e-4, p.dtype), params)
  cpu = jax.devices('cpu')[0]

  def run(params, grads):
    tx = optax_paged.sgd8bit(1.0, momentum=0.0)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: optax_paged.apply_gradients(
        tx, g, s, p, stochastic_rounding=True))
    for _ in range(3):
      params, state = step(grads, state, params)
    return params

  on_gpu = run(params, grads)
  with jax.default_device(cpu):
    on_cpu = run(jax.device_put(params, cpu), jax.device_put(grads, cpu))
  assert jax.tree.leaves(on_gpu)[0].devices() != {cpu}
  assert_trees_equal(on_gpu, on_cpu)
  # Rounding really was random: both neighbours of 1.0 occur.
  assert len(np.unique(np.asarray(on_gpu['w'], np.float32))) > 1


@pytest.mark.parametrize('factory', [
    lambda budget: optax_paged.paged_adamw8bit(1e-3, device_budget=budget),
    lambda budget: optax_paged.adamw8bit(1e-3),
], ids=['paged', 'unpaged'])
def test_deepcopy_keeps_the_tiers_and_the_moments(factory):
  import copy  # only this test copies states

  params = random_tree(SHAPES, seed=12)
  sizes = [row.bytes for row in optax_paged.memory_report(
      optax_paged.paged_adamw8bit(1e-3, device_budget=0).init(params)).rows]
  tx = factory(sizes[0] + sizes[1])
  _, state = _run(tx, params, 2)
  twin = copy.deepcopy(state)
  assert _tiers(twin) == _tiers(state)
  assert twin.buffers.record().platform == 'cuda'
  assert_trees_equal(optax_paged.state_dict(twin),
                     optax_paged.state_dict(state))


def _hyper(count_after):
  """Zero hyperparameters for the step that ends at ``count_after``."""
  return hyperparams.with_seed(jnp.zeros(16), jnp.asarray(count_after))


def test_a_call_for_another_mesh_position_leaves_the_state_alone():
  # The kernel cannot return an error: it writes NaN results, skips the
  # state and marks the entry, so the next call and the export fail.
  params = {'w': jnp.ones((64, 80))}
  state = optax_paged.paged_adamw8bit(1e-3).init(params)
  entry = state.buffers.record().entries[0]
  before = [entry.read_moment(0, m) for m in range(2)]

  def call(position, count_after):
    return ffi.update_call('optax_paged_adamw', _hyper(count_after), position,
                           [jnp.ones(5120)], [jnp.ones(5120)],
                           state_id=state.buffers.state_id,
                           leaf_indices=[0])[0][0]

  out = call(3, 1)
  assert np.isnan(np.asarray(out)).all()
  after = [entry.read_moment(0, m) for m in range(2)]
  for (codes, absmax), (codes2, absmax2) in zip(before, after, strict=True):
    np.testing.assert_array_equal(codes, codes2)
    np.testing.assert_array_equal(absmax, absmax2)
  # Reported once, by whichever comes first: the export here...
  with pytest.raises(ValueError, match='another mesh position'):
    optax_paged.state_dict(state)
  call(0, 1).block_until_ready()  # a well-routed call then runs
  call(3, 2).block_until_ready()
  # ... or the next call on the device.
  with pytest.raises(Exception, match='an earlier call'):
    call(0, 2).block_until_ready()


@pytest.mark.parametrize('fused', [False, True])
def test_a_stale_count_leaves_the_state_alone(fused):
  # A state reset with jax.tree.map (count 0, moments at step 2): the kernel
  # writes NaN, leaves the moments and their step alone, and marks the entry.
  tx = optax_paged.paged_adamw8bit(1e-3)
  params = random_tree(SHAPES, seed=3)
  params, state = _run(tx, params, 2, fused=fused)
  before = optax_paged.state_dict(state)
  reset = jax.tree.map(jnp.zeros_like, state)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p)[0])
  out = step(params, reset, _grads(params, 5))
  for leaf in jax.tree.leaves(out):
    assert np.isnan(np.asarray(leaf)).all()
  with pytest.raises(ValueError, match='count is 0 but its moments are at'):
    optax_paged.state_dict(reset)
  assert_trees_equal(optax_paged.state_dict(state), before)
  step(params, reset, _grads(params, 5))
  with pytest.raises(Exception, match='an earlier call was given a state'):
    jax.block_until_ready(step(params, state, _grads(params, 6)))
  jax.block_until_ready(step(params, state, _grads(params, 6)))  # then runs


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_states_of_many_leaves_take_several_launches_per_step(dtype):
  # Over 224 leaves a dtype group takes several launches, each with its own
  # launch number, leaves' stamps and run counter: every leaf must come out
  # as it does from a state small enough for one launch.
  params = random_tree([(300 + 37 * i,) for i in range(230)], dtype=dtype,
                       seed=9)
  tx = optax_paged.adamw8bit(1e-3, min_8bit_size=256)
  whole, state = _run(tx, params, 3)
  assert int(optax_paged.state_dict(state)['count']) == 3
  names = sorted(params)
  for part in (names[:115], names[115:]):
    alone, _ = _run(tx, {name: params[name] for name in part}, 3)
    assert_trees_equal(alone, {name: whole[name] for name in part})


def test_four_bit_codec_on_the_device_matches_its_definition(tmp_path):
  # The device encodes the 4-bit unsigned map with an add that rounds up and
  # decodes it with bit arithmetic, where the CPU uses ceilf and a multiply;
  # a program checks every float32 bit pattern on the GPU.
  nvcc = shutil.which('nvcc')
  assert nvcc, 'the CUDA build needs nvcc; so does this check'
  root = pathlib.Path(__file__).resolve().parent.parent
  binary = tmp_path / 'four_bit_codec_check'
  build = subprocess.run(
      [nvcc, '-O3', '-std=c++17', '-prec-div=true', '-prec-sqrt=true',
       f'-I{root / "ffi"}', '-o', str(binary),
       str(root / 'tests' / 'data' / 'four_bit_codec_check.cu')],
      capture_output=True, text=True, check=False)
  assert build.returncode == 0, build.stderr[-3000:]
  result = subprocess.run([str(binary)], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'mismatches: 0' in result.stdout
