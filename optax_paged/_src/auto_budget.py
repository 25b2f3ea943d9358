"""The automatic device budget: how much state fits next to XLA's next step.

Pure functions of what is observed on one GPU, so that every decision can be
tested without one:

- the GPU's free memory (``cudaMemGetInfo``) and the bytes of this state
  already on the device (which the state may keep: they count as free);
- XLA's allocator (``jax.Device.memory_stats()``): what it holds from the
  device (``pool_bytes``, else ``bytes_reserved``, else ``bytes_in_use``),
  what is live (``bytes_in_use``), its peak so far (``peak_bytes_in_use``)
  and its limit (``bytes_limit``).

XLA's pool never shrinks, so its peak so far is always held; what XLA must
still take from the device is what its next step needs beyond the idle part
of its pool. When the next step is known (``memory_guarded`` compiles it),
that is its allocation; otherwise the peak (past the pool only where the
pool's statistics are missing). If the pool must grow, XLA's allocator asks
for a region of doubling size, capped only by its limit: up to twice what
it holds or twice the request is reserved. A margin comes on top; the state
gets the rest. A budget shrinks as soon as the room falls short, and grows
only when the room exceeds it by ``grow_threshold``, to half that threshold
below the room, so that small swings between observations never move a
leaf back and forth.
"""

import dataclasses
from typing import Any

# Always left free on the device: the CUDA context, cuBLAS workspaces,
# allocations outside XLA's allocator.
DEFAULT_MARGIN = 1 << 30
# Room above the budget that makes it grow.
DEFAULT_GROW_THRESHOLD = 512 << 20


@dataclasses.dataclass(frozen=True)
class AutoBudget:
  """``device_budget`` that follows the GPU's free memory.

  Pass it (or ``'auto'`` for the defaults) as an optimizer's or
  ``set_device_budget``'s ``device_budget``.

  Attributes:
    margin: bytes always left free on the device besides XLA's reserve.
    grow_threshold: room above the current budget that makes it grow.

  Example:
    >>> import optax_paged
    >>> budget = optax_paged.AutoBudget(margin=2 * 2**30)  # leave 2 GiB free
    >>> tx = optax_paged.paged_adamw8bit(1e-3, device_budget=budget)
    >>> budget.grow_threshold == optax_paged.AutoBudget().grow_threshold
    True
  """

  margin: int = DEFAULT_MARGIN
  grow_threshold: int = DEFAULT_GROW_THRESHOLD

  def __post_init__(self):
    for name in ('margin', 'grow_threshold'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'AutoBudget.{name} must be an int >= 0, got '
                         f'{value!r}.')


@dataclasses.dataclass(frozen=True)
class Observation:
  """What one GPU shows between steps.

  Attributes:
    free: free device bytes (``cudaMemGetInfo``).
    state_on_device: bytes of this state in the device tier now.
    xla_stats: ``jax.Device.memory_stats()`` of the device, or None.
    step_need: bytes the next step allocates (its temporaries and outputs
      less what it aliases to donated arguments), or None when unknown.
    step_largest: its largest single allocation (XLA allocates a program's
      temporaries as one buffer), which must fit one free block of the pool
      or come from the device whole.
  """

  free: int
  state_on_device: int
  xla_stats: dict[str, Any] | None = None
  step_need: int | None = None
  step_largest: int = 0


def _held(stats: dict[str, Any]) -> int:
  """Bytes XLA's allocator holds from the device."""
  return int(stats.get('pool_bytes', stats.get('bytes_reserved',
                                                stats['bytes_in_use'])))


def step_reserve(stats: dict[str, Any] | None, step_need: int,
                 step_largest: int = 0) -> int:
  """Bytes XLA must still take from the device to run a step.

  A step that allocates ``step_need`` bytes first uses the idle part of
  XLA's pool (held but not in use); if it must grow the pool, the region
  it may ask for is reserved (see ``_growth``). Its largest allocation uses
  the pool only if one free block (``largest_free_block_bytes``) holds it:
  the idle part of a pool that an evaluation pass left in pieces holds a
  step's outputs, not its temporaries.
  """
  if not stats or 'bytes_in_use' not in stats:
    return step_need
  held = _held(stats)
  idle = max(0, held - int(stats['bytes_in_use']))
  largest_free = int(stats.get('largest_free_block_bytes', idle))
  if step_largest > largest_free:
    wanted = step_largest + max(0, step_need - step_largest - idle)
  else:
    wanted = max(0, step_need - idle)
  return _growth(stats, wanted)


def beyond_xla_limit(stats: dict[str, Any] | None, step_need: int) -> bool:
  """Whether a step needs more than XLA's limit lets its pool hold.

  Then no placement of the state helps: XLA's memory fraction is too small
  (``XLA_PYTHON_CLIENT_MEM_FRACTION``).
  """
  if not stats or 'bytes_in_use' not in stats or 'bytes_limit' not in stats:
    return False
  held = _held(stats)
  idle = max(0, held - int(stats['bytes_in_use']))
  return step_need - idle > int(stats['bytes_limit']) - held


def _growth(stats: dict[str, Any], wanted: int) -> int:
  """What XLA's pool takes from the device to grow by ``wanted`` bytes.

  XLA's allocator (tsl's BFCAllocator, read in its source) grows by one
  region at a time, each twice the size of the one before (or the request
  rounded up by doublings, if larger), capped only by its limit, not by the
  device's free memory, and backs off to less only once in a process's
  life (``tests/memory_pressure_test.py``: a spike took every free byte of an
  H100). A region is at most what the pool already holds, so the next one
  asks for at most twice that or twice the request, never past the limit:
  that much is reserved.
  """
  if wanted <= 0:
    return 0
  if 'bytes_limit' not in stats:
    return wanted
  held = _held(stats)
  return min(max(0, int(stats['bytes_limit']) - held),
             max(2 * held, 2 * wanted))


def xla_reserve(stats: dict[str, Any] | None) -> int:
  """Bytes XLA may still take from the device to reach its peak again."""
  if not stats or 'bytes_in_use' not in stats:
    return 0
  in_use = int(stats['bytes_in_use'])
  peak = int(stats.get('peak_bytes_in_use', in_use))
  return _growth(stats, peak - _held(stats))


def evicted_at_least(total: int, stats: dict[str, Any] | None,
                     paged_on_device: int) -> int:
  """Bytes of device-tier paged state that cannot be on the device.

  XLA's pool is device memory it holds. When it and every paged state in
  the device tier on that GPU (``paged_on_device``) add up to more than the
  GPU's ``total``, CUDA has evicted the difference to host RAM for XLA's
  allocations (measured: tests/memory_pressure_test.py), and the kernel
  reaches those pages by faults, many times slower than the host tier. A
  lower bound: the CUDA context and memory outside XLA are not counted.
  """
  if not stats or 'bytes_in_use' not in stats or total <= 0:
    return 0
  return max(0, _held(stats) + paged_on_device - total)


def room(observation: Observation, policy: AutoBudget) -> int:
  """Bytes of state the device can hold next to XLA's next step."""
  if observation.step_need is None:
    reserve = xla_reserve(observation.xla_stats)
  else:
    reserve = step_reserve(observation.xla_stats, observation.step_need,
                           observation.step_largest)
  return max(0, observation.free + observation.state_on_device
             - reserve - policy.margin)


def settle(available: int, current: int, grow_threshold: int,
           cap: int | None = None) -> int:
  """A budget from the room ``available`` to it and its ``current`` size.

  Args:
    available: bytes of state the device can hold for it now.
    current: bytes of it on the device now.
    grow_threshold: room above ``current`` that makes it grow.
    cap: at most this many bytes (a fixed budget that a guarded step had to
      cut grows back to its own size), or None.

  Returns:
    The budget: at once down to the room when the room falls short; grown
    only when the room exceeds it by ``grow_threshold``, to half that
    threshold below the room (or to the cap), so that small swings between
    observations never move a leaf back and forth.
  """
  limit = available if cap is None else min(available, cap)
  if limit < current:
    return limit
  if available - current > grow_threshold:
    return max(current, min(limit, available - grow_threshold // 2))
  return current


def next_budget(observation: Observation, policy: AutoBudget,
                current: int, cap: int | None = None) -> int:
  """The device budget after this observation, from the current one."""
  return settle(room(observation, policy), current, policy.grow_threshold,
                cap)
