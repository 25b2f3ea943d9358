"""The state registry: ownership, release and garbage collection."""

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import ffi
from optax_paged._src import registry


def _live_bytes():
  # States dropped during the collection become orphans after it started:
  # free those too, or an earlier test's leftovers move the baseline.
  gc.collect()
  registry.REGISTRY.free_orphans()
  return ffi.extension().live_state_bytes()


def test_state_bytes_are_what_the_layout_needs():
  params = {'w': jnp.ones((1024, 1024)), 'b': jnp.ones((1024,))}
  state = optax_paged.paged_adamw8bit(1e-3).init(params)
  # w: 2 moments x (1 MiB codes + 4096 absmax floats); b: 2 x 4 KiB fp32.
  expected = 2 * (2**20 + 4096 * 4) + 2 * 4096
  assert state.buffers.record().total_bytes == expected
  assert registry.REGISTRY.total_bytes() >= expected


def test_release_returns_memory_to_baseline():
  baseline = _live_bytes()
  state = optax_paged.paged_adamw8bit(1e-3).init({'w': jnp.ones((512, 512))})
  assert _live_bytes() > baseline
  optax_paged.release(state)
  assert _live_bytes() == baseline
  assert state.buffers not in registry.REGISTRY.live_states()


def test_garbage_collection_returns_memory_to_baseline():
  baseline = _live_bytes()
  params = {'w': jnp.ones((512, 512))}
  tx = optax_paged.paged_adamw8bit(1e-3)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(2):
    updates, state = step(params, state, params)
  assert _live_bytes() > baseline
  # The compiled step stays cached; it must not keep the buffers alive.
  del state, updates
  assert _live_bytes() == baseline


def test_buffers_object_is_unique_per_state():
  params = {'w': jnp.ones((64, 64))}
  state = optax_paged.paged_adamw8bit(1e-3).init(params)
  leaves, treedef = jax.tree.flatten(state)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.buffers is state.buffers
  assert state.buffers in registry.REGISTRY.live_states()
  assert 'adamw' in repr(state.buffers)


def test_release_finds_states_inside_containers():
  import optax
  baseline = _live_bytes()
  tx = optax.chain(optax.clip(1.0), optax_paged.paged_adamw8bit(1e-3))
  state = tx.init({'w': jnp.ones((128, 128))})
  optax_paged.release({'opt_state': state, 'step': 3})
  assert _live_bytes() == baseline


def test_state_nbytes_counts_arrays_and_registry_buffers():
  import optax
  params = {'w': jnp.ones((1024, 1024))}
  ours = optax_paged.paged_adamw8bit(1e-3).init(params)
  theirs = optax.adamw(1e-3).init(params)
  assert optax_paged.state_nbytes(theirs) == 2 * 4 * 2**20 + 4
  assert optax_paged.state_nbytes(ours) == (
      optax_paged.memory_report(ours).total_bytes + 4  # + the int32 count
  )


def test_dropped_states_do_not_pile_up_until_a_full_collection():
  gc.collect()
  gc.collect()
  params = {'w': jnp.ones((2048, 2048))}  # 8 MiB of 8-bit state
  tx = optax_paged.adamw8bit(1e-3)
  one = tx.init(params)
  size = one.buffers.record().total_bytes
  baseline = ffi.extension().live_state_bytes() - size
  del one
  gc.disable()  # no full collection may help
  try:
    peak = 0
    for _ in range(20):
      state = tx.init(params)  # drops the previous one
      peak = max(peak, ffi.extension().live_state_bytes() - baseline)
    assert peak <= 2 * size, peak / size
    del state
    # Left alone, a dropped state goes at the first collection of any
    # generation after a short grace (NNX rebuilds modules within it).
    time.sleep(registry.StateRegistry.ORPHAN_GRACE_SECONDS + 0.1)
    gc.collect(0)
    assert ffi.extension().live_state_bytes() == baseline
  finally:
    gc.enable()


@pytest.mark.parametrize('then', ['init', 'collect'])
def test_a_state_dropped_while_its_step_runs_loses_nothing(then):
  tx = optax_paged.adamw8bit(1e-3)
  params = {'w': jnp.ones((512, 512))}
  # A gradient that takes a while, so the kernel runs well after the call
  # returns: tenths of a second on two CPU cores, and on an H200 (512^2
  # matrices were done there before the call returned).
  tiles, loops = (8, 300) if jax.default_backend() == 'gpu' else (1, 40)
  for _ in range(2):

    @jax.jit  # a new function each time: traced, so dispatched without a wait
    def step(p, s):
      x = jax.lax.fori_loop(0, loops, lambda _, x: jnp.tanh(x @ x * 1e-3),
                            jnp.tile(p['w'], (tiles, tiles)))
      g = x[:512, :512]
      updates, s = tx.update({'w': g}, s, p)
      return optax.apply_updates(p, updates), s

    state = tx.init(params)
    new_params, state = step(params, state)
    assert not new_params['w'].is_ready()
    state = None  # dropped while its step is in flight
    other = tx.init(params) if then == 'init' else gc.collect()
    # The step found its buffers and ran (it failed as released before);
    # a state made meanwhile kept its own buffers (the step ran on them).
    assert float(jax.block_until_ready(new_params)['w'][0, 0]) < 1.0
    if then == 'init':
      assert int(optax_paged.state_dict(other)['count']) == 0
  # Once its step is done, the dropped state goes as any other.
  baseline = ffi.extension().live_state_bytes()
  assert optax_paged.free_orphans() > 0
  assert ffi.extension().live_state_bytes() < baseline


def test_memory_report_counts_dropped_states_until_free_orphans():
  tx = optax_paged.adamw8bit(1e-3)
  kept = tx.init({'w': jnp.ones((64, 64))})
  _live_bytes()
  gc.disable()  # no collection may free the dropped state early
  try:
    dropped = tx.init({'w': jnp.ones((512, 512))})
    size = dropped.buffers.record().total_bytes
    before = ffi.extension().live_state_bytes()
    del dropped
    report = optax_paged.memory_report(kept)
    assert report.orphaned == size
    assert report.total_bytes == kept.buffers.record().total_bytes
    assert f'orphaned: {size:,} bytes' in str(report)
    assert optax_paged.free_orphans() == size
    assert ffi.extension().live_state_bytes() == before - size
    assert optax_paged.memory_report(kept).orphaned == 0
  finally:
    gc.enable()


def test_a_non_zero_start_is_refused_for_four_bit_codes():
  # fill_moments' codec is the 8-bit one: written into 4-bit codes it would
  # corrupt them silently (no 4-bit family starts from a non-zero moment).
  # A small float32 leaf beside it: the refusal writes no leaf at all.
  state = optax_paged.paged_adamw4bit(1e-3).init(
      {'a': jnp.ones((8,)), 'w': jnp.ones((512, 512))})
  record = state.buffers.record()
  entry = record.entries[0]
  before = [entry.read_moment(leaf, 0) for leaf in range(2)]
  with pytest.raises(NotImplementedError, match='4-bit'):
    registry.fill_moments(record, (0.5, 0.0), (True, False))
  for leaf, (b_codes, b_absmax) in enumerate(before):
    a_codes, a_absmax = entry.read_moment(leaf, 0)
    assert np.array_equal(a_codes, b_codes)
    assert np.array_equal(a_absmax, b_absmax)
