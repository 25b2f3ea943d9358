"""The automatic device budget's decisions, and how tier moves are made."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import pytest

import optax_paged
from optax_paged._src import auto_budget
from optax_paged._src import paging
from optax_paged._src import registry
from tests.helpers import FakeTierEntry

GiB = 1 << 30
MiB = 1 << 20
POLICY = auto_budget.AutoBudget(margin=GiB, grow_threshold=512 * MiB)


def _observe(free, on_device=0, **stats):
  return auto_budget.Observation(free=free, state_on_device=on_device,
                                 xla_stats=stats or None)


def test_xla_keeps_room_to_reach_its_peak_again():
  assert auto_budget.xla_reserve(None) == 0
  # Between steps XLA holds 10 GiB, 6 in use; its steps peaked at 14.
  # Its pool must grow by 4 GiB: its next region may be twice what it
  # holds, within its limit.
  stats = dict(bytes_in_use=6 * GiB, peak_bytes_in_use=14 * GiB,
               pool_bytes=10 * GiB, bytes_limit=60 * GiB)
  assert auto_budget.xla_reserve(stats) == 20 * GiB
  assert auto_budget.xla_reserve(dict(stats, bytes_limit=11 * GiB)) == GiB
  # A request larger than the pool: twice the request.
  assert auto_budget.xla_reserve(
      dict(stats, peak_bytes_in_use=40 * GiB)) == 50 * GiB
  # Nothing when its pool covers the peak (as a pool that never shrinks
  # does), nor when it is at its limit.
  assert auto_budget.xla_reserve(dict(stats, pool_bytes=20 * GiB)) == 0
  assert auto_budget.xla_reserve(dict(stats, bytes_limit=10 * GiB)) == 0
  # Without pool statistics, what is in use is what XLA holds.
  assert auto_budget.xla_reserve(
      dict(bytes_in_use=6 * GiB, peak_bytes_in_use=14 * GiB)) == 8 * GiB


def test_room_counts_the_state_already_on_the_device_as_free():
  observation = _observe(free=5 * GiB, on_device=3 * GiB,
                         bytes_in_use=GiB, peak_bytes_in_use=3 * GiB)
  # 5 free + 3 of ours - 2 for XLA's peak - 1 margin.
  assert auto_budget.room(observation, POLICY) == 5 * GiB
  assert auto_budget.room(_observe(free=GiB // 2), POLICY) == 0


def test_budget_shrinks_at_once_and_grows_only_past_the_threshold():
  current = 8 * GiB
  # Room fell to 6 GiB (an evaluation pass holds memory): shrink now.
  shrunk = auto_budget.next_budget(_observe(free=7 * GiB), POLICY, current)
  assert shrunk == 6 * GiB
  # A little more room than the budget: stay.
  assert auto_budget.next_budget(_observe(free=7 * GiB + 256 * MiB), POLICY,
                                 shrunk) == shrunk
  # The pass is over: grow, to half the threshold below the room.
  grown = auto_budget.next_budget(_observe(free=10 * GiB), POLICY, shrunk)
  assert grown == 9 * GiB - 256 * MiB


def test_small_swings_never_move_a_leaf_back_and_forth():
  leaves = [256 * MiB] * 40
  budget, changes = 0, 0
  tiers = paging.place(leaves, budget)
  # Free memory wobbles by +-200 MiB around 8 GiB for 100 observations.
  for i in range(100):
    free = 8 * GiB + (200 * MiB if i % 2 else -200 * MiB)
    budget = auto_budget.next_budget(_observe(free), POLICY, budget)
    new_tiers = paging.place(leaves, budget)
    changes += sum(a != b for a, b in zip(tiers, new_tiers, strict=True))
    tiers = new_tiers
  # Leaves moved to the device once, and never back.
  assert changes == tiers.count('device') > 0


def test_policy_refuses_nonsense():
  with pytest.raises(ValueError, match='margin'):
    auto_budget.AutoBudget(margin=-1)
  with pytest.raises(ValueError, match='grow_threshold'):
    auto_budget.AutoBudget(grow_threshold=1.5)
  paging.check_budget('auto')
  paging.check_budget(POLICY)
  with pytest.raises(ValueError, match="'auto'"):
    paging.check_budget('max')


def test_moves_free_the_device_first_touch_only_changed_leaves_and_log(
    caplog):
  entry = FakeTierEntry(['device', 'device', 'host', 'host'], [10, 20, 30, 40])
  moves = registry.MoveStats()
  with caplog.at_level(logging.INFO, logger='optax_paged'):
    paging.move_leaves(entry, ['host', 'device', 'device', 'host'], moves)
  assert entry.calls == [(0, 'host'), (2, 'device')]
  assert (moves.count, moves.bytes) == (2, 40)
  assert 'moved 1 buffers (10 bytes) to the host and 1 (30 bytes)' in (
      caplog.text)
  paging.move_leaves(entry, ['host', 'device', 'device', 'host'], moves)
  assert (moves.count, moves.bytes) == (2, 40)  # nothing left to move


def test_auto_is_accepted_wherever_a_budget_is():
  # A CPU state, also on a GPU machine: one tier, no paging.
  params = {'w': jax.device_put(jnp.ones((64, 64)), jax.devices('cpu')[0])}
  tx = optax_paged.paged_adamw8bit(1e-3, device_budget='auto')
  state = tx.init(params)
  report = optax_paged.memory_report(state)
  assert report.moves.count == 0  # a CPU state has one tier
  assert 'moves: 0 buffers' in str(report)
  # A state made inside jax.jit keeps the budget until it is allocated.
  pending = jax.jit(tx.init)(params)
  allocated = optax_paged.allocate_state(pending, params)
  assert optax_paged.memory_report(allocated).total_bytes == (
      report.total_bytes)
  with pytest.raises(ValueError, match='no paged GPU'):
    optax_paged.set_device_budget(state, 'auto')
  with pytest.raises(ValueError, match="'auto'"):
    optax_paged.paged_adamw8bit(1e-3, device_budget='fast')


def test_a_known_step_reserves_what_it_allocates_beyond_the_idle_pool():
  stats = {'bytes_in_use': 6 * GiB, 'pool_bytes': 10 * GiB,
           'peak_bytes_in_use': 10 * GiB, 'bytes_limit': 20 * GiB}
  # 4 GiB idle in the pool: a 7 GiB step grows it, whose next region may
  # take all the 10 GiB left to XLA's limit; a 2 GiB step fits the pool.
  assert auto_budget.step_reserve(stats, 7 * GiB) == 10 * GiB
  assert auto_budget.step_reserve(stats, 2 * GiB) == 0
  assert auto_budget.step_reserve(stats, 30 * GiB) == 10 * GiB
  assert auto_budget.beyond_xla_limit(stats, 30 * GiB)
  assert not auto_budget.beyond_xla_limit(stats, 14 * GiB)
  # The known step replaces the peak (which the pool covers: 0 more).
  observation = auto_budget.Observation(free=12 * GiB, state_on_device=0,
                                        xla_stats=stats, step_need=7 * GiB)
  policy = auto_budget.AutoBudget(margin=GiB)
  assert auto_budget.room(observation, policy) == GiB
  assert auto_budget.room(dataclasses.replace(observation, step_need=None),
                          policy) == 11 * GiB


def test_a_capped_budget_is_cut_and_grows_back_to_its_cap_only():
  threshold = 512 * MiB
  cap = 3 * GiB
  # Cut at once below the cap.
  assert auto_budget.settle(GiB, 3 * GiB, threshold, cap) == GiB
  # Room returns: back to the cap, never past it.
  assert auto_budget.settle(10 * GiB, GiB, threshold, cap) == cap
  # Not enough room above the current budget to move anything.
  assert auto_budget.settle(GiB + threshold, GiB, threshold, cap) == GiB
  # No cap: grows to half the threshold below the room.
  assert auto_budget.settle(10 * GiB, GiB, threshold) == (
      10 * GiB - threshold // 2)


def test_a_step_whose_temporaries_fit_no_free_block_takes_them_whole():
  # 4 GiB idle in pieces of at most 1 GiB: a step with 3 GiB of temporaries
  # and 1 GiB of outputs must grow the pool for its temporaries (a region
  # up to twice the pool's 10 GiB: 20, within the limit's 30 left);
  # without a limit, the 3 GiB.
  stats = {'bytes_in_use': 6 * GiB, 'pool_bytes': 10 * GiB,
           'largest_free_block_bytes': GiB, 'bytes_limit': 40 * GiB}
  assert auto_budget.step_reserve(stats, 4 * GiB, 3 * GiB) == 20 * GiB
  unlimited = {k: v for k, v in stats.items() if k != 'bytes_limit'}
  assert auto_budget.step_reserve(unlimited, 4 * GiB, 3 * GiB) == 3 * GiB
  # One free block of 3 GiB: the idle pool holds it all.
  stats['largest_free_block_bytes'] = 3 * GiB
  assert auto_budget.step_reserve(stats, 4 * GiB, 3 * GiB) == 0


def test_eviction_is_what_xla_and_the_device_tier_hold_beyond_the_gpu():
  # Measured on an H100 (tests/memory_pressure_test.py): after a spike
  # XLA's pool held nearly the whole card while a fixed budget kept its
  # 4.36 GB state in the device tier; CUDA had evicted it.
  total = 85_017_493_504
  after_spike = {'bytes_in_use': 60 * GiB, 'pool_bytes': total - (1 << 29)}
  assert auto_budget.evicted_at_least(
      total, after_spike, 4_362_076_160) == 4_362_076_160 - (1 << 29)
  before = {'bytes_in_use': 8 * GiB, 'pool_bytes': 32 * GiB}
  assert auto_budget.evicted_at_least(total, before, 4_362_076_160) == 0
  # Nothing known, nothing claimed.
  assert auto_budget.evicted_at_least(total, None, 10 * GiB) == 0
  assert auto_budget.evicted_at_least(0, after_spike, 10 * GiB) == 0


def test_the_report_says_what_cuda_evicted():
  report = paging.MemoryReport(rows=(), evicted={'cuda:0': 3 * GiB})
  assert 'evicted by CUDA on cuda:0: at least 3,221,225,472 bytes' in str(
      report)
  assert 'evicted' not in str(paging.MemoryReport(rows=()))
