"""Where state buffers live: the device budget and the memory tiers.

On a GPU, paged optimizers keep each leaf's state in CUDA managed memory in
one of two tiers: ``device`` (preferred location the GPU, prefetched: the
kernel runs at HBM speed) or ``host`` (preferred location host RAM, mapped
for the GPU: the kernel streams it over the link in place). A device budget
in bytes decides which leaves get the device tier, in parameter order, and
the rest go to the host. The budget is capped by the GPU's free memory: the
registry never asks for more managed memory on the device than is free,
because oversubscribed managed memory can stall a shared GPU.

Unpaged optimizers (``adamw8bit``) use plain device memory; on the CPU every
tier is plain host memory.
"""

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax

from optax_paged._src import auto_budget
from optax_paged._src import ffi
from optax_paged._src import registry

logger = logging.getLogger('optax_paged')

# Default device budget: this fraction of the GPU memory free at init.
DEFAULT_DEVICE_FRACTION = 0.5
# Room left for XLA and the CUDA context when capping a budget.
_HEADROOM_BYTES = 512 * 2**20

DeviceBudget = int | float | str | auto_budget.AutoBudget | None


def _auto_policy(device_budget: DeviceBudget) -> auto_budget.AutoBudget | None:
  """The automatic budget's policy, or None for a fixed budget."""
  if isinstance(device_budget, auto_budget.AutoBudget):
    return device_budget
  if device_budget == 'auto':
    return auto_budget.AutoBudget()
  return None


def gpu_memory(ordinal: int = 0) -> tuple[int, int]:
  """(free, total) bytes of the GPU with this CUDA ordinal; (0, 0) without."""
  free, total = ffi.extension().gpu_memory_info(ordinal)
  return int(free), int(total)


def resolve_budget(device_budget: DeviceBudget, reclaimable: int = 0,
                   ordinal: int = 0) -> int:
  """Bytes the paged state may keep on one GPU.

  Args:
    device_budget: bytes (an int), a fraction of the free GPU memory (a float
      in [0, 1]), or None for ``DEFAULT_DEVICE_FRACTION`` of it.
    reclaimable: bytes of this state already on the device, which count as
      free for it.
    ordinal: the GPU's CUDA ordinal.

  Returns:
    The budget in bytes, never more than the free memory less some headroom;
    a warning says so when the request had to be cut.
  """
  free, _ = gpu_memory(ordinal)
  available = max(0, free + reclaimable - _HEADROOM_BYTES)
  if device_budget is None:
    return int(available * DEFAULT_DEVICE_FRACTION)
  if isinstance(device_budget, bool) or not isinstance(
      device_budget, (int, float)
  ):
    raise TypeError(
        'device_budget must be bytes (int), a fraction of free GPU memory '
        f'(float in [0, 1]) or None, got {device_budget!r}.'
    )
  if isinstance(device_budget, float):
    if not 0.0 <= device_budget <= 1.0:
      raise ValueError(
          f'a fractional device_budget must be in [0, 1], got {device_budget}.'
      )
    return int(available * device_budget)
  if device_budget < 0:
    raise ValueError(f'device_budget must be >= 0, got {device_budget}.')
  if device_budget > available:
    warnings.warn(
        f'optax_paged: device_budget of {device_budget} bytes exceeds the '
        f'{available} bytes the GPU has free (less headroom); keeping at most '
        f'{available} bytes of optimizer state on the device, the rest in '
        'host memory.',
        stacklevel=3,
    )
    return available
  return device_budget


def check_budget(device_budget: DeviceBudget) -> None:
  """Raises for a budget that can never be valid, before any allocation."""
  if device_budget is None or _auto_policy(device_budget) is not None:
    return
  if isinstance(device_budget, str):
    raise ValueError(
        f"device_budget {device_budget!r}: the one name it takes is 'auto'.")
  if isinstance(device_budget, bool) or not isinstance(
      device_budget, (int, float)
  ):
    raise TypeError(
        'device_budget must be bytes (int), a fraction of free GPU memory '
        f'(float in [0, 1]) or None, got {device_budget!r} '
        f'({type(device_budget).__name__}).'
    )
  # NaN fails every comparison: it would pass the range check below.
  if not device_budget >= 0 or (
      isinstance(device_budget, float) and device_budget > 1.0
  ):
    raise ValueError(
        'device_budget must be >= 0 bytes or a fraction in [0, 1], got '
        f'{device_budget}.'
    )


def xla_stats(device: jax.Device) -> dict[str, Any] | None:
  """XLA's allocator statistics for a device, or None where it has none."""
  try:
    return device.memory_stats()
  except Exception:  # noqa: BLE001 - a backend without stats: plan without
    return None


def _budget_for(device_budget: DeviceBudget, device: jax.Device, entry: Any,
                on_device: int, reclaim: bool) -> int:
  policy = _auto_policy(device_budget)
  ordinal = int(entry.ordinal)
  if policy is None:
    return resolve_budget(device_budget, on_device if reclaim else 0,
                          ordinal)
  observation = auto_budget.Observation(
      free=gpu_memory(ordinal)[0], state_on_device=on_device,
      xla_stats=xla_stats(device))
  return auto_budget.next_budget(observation, policy, current=on_device)


def device_bytes(infos: Sequence[dict[str, Any]]) -> int:
  """Bytes of these leaves in the device tier."""
  return sum(int(info['bytes']) for info in infos if info['tier'] == 'device')


def move_leaves(entry: Any, target: Sequence[str],
                moves: 'registry.MoveStats',
                infos: Sequence[dict[str, Any]] | None = None) -> None:
  """Moves an entry's leaves to the ``target`` tiers; counts into ``moves``.

  Leaves leave the device first, so the move never needs more room.
  ``infos`` are the entry's ``leaf_info`` if the caller has read them.
  """
  if infos is None:
    infos = [entry.leaf_info(i) for i in range(len(target))]
  moved = {'host': [0, 0], 'device': [0, 0]}
  start = time.perf_counter()
  try:
    for tier in ('host', 'device'):
      for i, (placed, info) in enumerate(zip(target, infos, strict=True)):
        if placed == tier and info['tier'] != tier:
          entry.set_leaf_tier(i, registry.TIER_CODES[tier])
          moved[tier][0] += 1
          moved[tier][1] += int(info['bytes'])
  finally:
    # Counted even when a move fails part way: those before it happened.
    count = moved['host'][0] + moved['device'][0]
    if count:
      seconds = time.perf_counter() - start
      nbytes = moved['host'][1] + moved['device'][1]
      moves.add(registry.MoveStats(count, nbytes, seconds))
      logger.info(
          'optax_paged: moved %d buffers (%d bytes) to the host and %d '
          '(%d bytes) to GPU %d in %.1f ms', moved['host'][0],
          moved['host'][1], moved['device'][0], moved['device'][1],
          int(entry.ordinal), seconds * 1e3)


def apply_budget(record: 'registry.StateRecord', device_budget: DeviceBudget,
                 reclaim: bool = False) -> None:
  """Moves the leaves of a paged record to the tiers the budget gives.

  The budget applies to each device on its own (a byte count is per device;
  a fraction is of that device's free memory; ``'auto'`` is what fits next
  to XLA's next step there, see ``auto_budget``).
  """
  placed = []
  for device, entry in zip(record.devices, record.entries, strict=True):
    infos = [entry.leaf_info(i) for i in range(len(record.leaves))]
    on_device = device_bytes(infos)
    budget = _budget_for(device_budget, device, entry, on_device, reclaim)
    sizes = [info['bytes'] for info in infos]
    target = place(sizes, budget)
    move_leaves(entry, target, record.moves, infos)
    placed.append(sum(n for n, t in zip(sizes, target, strict=True)
                      if t == 'device'))
  # What a guarded step (memory_guard) may cut and grow back to: an
  # automatic budget follows its policy; a fixed one returns to its size.
  record.budget_policy = _auto_policy(device_budget)
  record.budget_caps = None if record.budget_policy else tuple(placed)


def place_new_state(buffers: 'registry.StateBuffers',
                    device_budget: DeviceBudget) -> 'registry.StateBuffers':
  """Applies the budget to freshly allocated buffers (no-op unless paged)."""
  if not buffers.is_abstract and buffers.record().paged:
    apply_budget(buffers.record(), device_budget)
  return buffers


def place(leaf_bytes: Sequence[int], budget: int) -> list[str]:
  """Tier of each leaf: ``device`` while the budget lasts, then ``host``."""
  tiers = []
  used = 0
  for nbytes in leaf_bytes:
    if used + nbytes <= budget:
      tiers.append('device')
      used += nbytes
    else:
      tiers.append('host')
  return tiers


def set_device_budget(state: Any, device_budget: DeviceBudget) -> None:
  """Moves the buffers of every paged state in ``state`` to a new budget.

  Call it between steps. Leaves leave the device first, so the move never
  needs more device memory than the new budget. Only leaves whose tier
  changes move; ``memory_report`` counts them, and each move is logged at
  INFO level to the ``optax_paged`` logger.

  Args:
    state: an optimizer state, or any pytree containing one.
    device_budget: bytes, a fraction of the free GPU memory, or None (as for
      the optimizer's ``device_budget``); ``'auto'`` (or an ``AutoBudget``)
      measures now what fits next to XLA's next step (its peak so far) and
      moves leaves out or back with hysteresis, e.g. around an evaluation
      pass that needs memory; for a state on several GPUs it applies to
      each GPU's share.

  Raises:
    ValueError: if ``state`` holds no paged GPU state.

  Example:
    >>> import jax, jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.paged_adamw8bit(1e-3, device_budget=2**30)
    >>> state = tx.init({'w': jnp.ones((4096, 256))})
    >>> if jax.default_backend() == 'gpu':  # a CPU state has one tier
    ...   optax_paged.set_device_budget(state, 0)  # all to host RAM
    ...   optax_paged.set_device_budget(state, 'auto')  # back, as it fits
  """
  paged = [
      b for b in registry.find_buffers(state)
      if not b.is_abstract and b.record().paged
  ]
  if not paged:
    raise ValueError(
        'set_device_budget: the state holds no paged GPU optimizer state '
        '(CPU and unpaged states have a single tier).'
    )
  check_budget(device_budget)
  registry.wait_for_pending(state)
  for buffers in paged:
    apply_budget(buffers.record(), device_budget, reclaim=True)


@dataclasses.dataclass(frozen=True)
class MemoryRow:
  """One state buffer: a parameter leaf's moments on one device.

  ``shape`` is the parameter's global shape; ``bytes`` what this device
  holds for it (its shard, or its ZeRO-1 chunk).
  """

  path: str
  shape: tuple[int, ...]
  bits: int
  tier: str
  bytes: int
  device: str = ''

  @property
  def label(self) -> str:
    path = self.path or '<root>'
    return f'{path} @ {self.device}' if self.device else path


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Every state buffer of a state, the bytes in each tier, and the moves.

  Attributes:
    rows: one ``MemoryRow`` per buffer.
    moves: the tier moves of these states' buffers so far (count, bytes,
      seconds), by ``set_device_budget`` or an automatic budget.
    free: per GPU that holds paged state, its free memory now: the headroom
      XLA's next allocations have.
    evicted: per GPU where it is not zero, a lower bound on the bytes of
      device-tier paged state (of every live state there) that CUDA has
      evicted to host RAM for XLA's memory pool: steps then fault those
      pages in, far slower than the host tier. Guard the step with
      ``memory_guarded`` or lower the device budget.
    orphaned: bytes this process still holds for states that nothing refers
      to any more (dropped, not part of ``state``): freed by the next
      allocation or garbage collection once their last step is done, or at
      once by ``optax_paged.free_orphans()``.
    master_weight_resets: blocks of 128 parameters whose master-weight
      correction a step dropped, since the states were made, because their
      parameters were not those the optimizer wrote (new weights loaded, a
      transformation chained after the optimizer): their masters restarted
      from the parameters.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.paged_adamw8bit(1e-3)
    >>> report = optax_paged.memory_report(tx.init({'w': jnp.ones((64, 64))}))
    >>> row = report.rows[0]
    >>> row.path, row.shape, row.bits, row.bytes  # 2 x (4096 + 16 x 4) bytes
    ("['w']", (64, 64), 8, 8704)
    >>> report.total_bytes
    8704
  """

  rows: tuple[MemoryRow, ...]
  moves: registry.MoveStats = dataclasses.field(
      default_factory=registry.MoveStats)
  free: dict[str, int] = dataclasses.field(default_factory=dict)
  evicted: dict[str, int] = dataclasses.field(default_factory=dict)
  orphaned: int = 0
  master_weight_resets: int = 0

  @property
  def totals(self) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in self.rows:
      out[row.tier] = out.get(row.tier, 0) + row.bytes
    return out

  @property
  def total_bytes(self) -> int:
    return sum(row.bytes for row in self.rows)

  @property
  def per_device(self) -> dict[str, dict[str, int]]:
    """Bytes per tier on each device (one entry for a one-device state)."""
    out: dict[str, dict[str, int]] = {}
    for row in self.rows:
      tiers = out.setdefault(row.device, {})
      tiers[row.tier] = tiers.get(row.tier, 0) + row.bytes
    return out

  def __str__(self) -> str:
    header = ('leaf', 'shape', 'bits', 'tier', 'bytes')
    lines = [
        (r.label, 'x'.join(map(str, r.shape)) or 'scalar',
         str(r.bits), r.tier, f'{r.bytes:,}')
        for r in self.rows
    ]
    lines += [('total: ' + tier, '', '', '', f'{nbytes:,}')
              for tier, nbytes in sorted(self.totals.items())]
    widths = [max(len(x) for x in column) for column in zip(header, *lines,
                                                             strict=False)]
    def fmt(cells):
      return '  '.join(
          c.rjust(w) if i == 4 else c.ljust(w)
          for i, (c, w) in enumerate(zip(cells, widths, strict=True))
      )
    rule = '  '.join('-' * w for w in widths)
    body = [fmt(cells) for cells in lines[:len(self.rows)]]
    totals = [fmt(cells) for cells in lines[len(self.rows):]]
    extra = [f'moves: {self.moves.count} buffers, {self.moves.bytes:,} bytes, '
             f'{self.moves.seconds * 1e3:.1f} ms']
    extra += [f'free on {device}: {nbytes:,} bytes'
              for device, nbytes in sorted(self.free.items())]
    extra += [f'evicted by CUDA on {device}: at least {nbytes:,} bytes of '
              'device-tier state (XLA needed the memory; steps fault these '
              'pages in: use memory_guarded or a smaller device budget)'
              for device, nbytes in sorted(self.evicted.items())]
    if self.orphaned:
      extra.append(f'orphaned: {self.orphaned:,} bytes of dropped states, '
                   'not freed yet (optax_paged.free_orphans() frees them)')
    if self.master_weight_resets:
      extra.append(f'master weights: {self.master_weight_resets:,} blocks of '
                   '128 parameters changed outside the optimizer and '
                   'restarted from the parameters')
    return '\n'.join([fmt(header), rule, *body, rule, *totals, *extra])


def memory_report(state: Any) -> MemoryReport:
  """The state buffers of every optax_paged state in ``state``.

  Args:
    state: an optimizer state, or any pytree containing one.

  Returns:
    A ``MemoryReport``: ``rows`` (leaf path, shape, bits, tier, bytes, and
    the device for a state on a mesh), ``totals`` per tier,
    ``per_device`` totals, ``moves`` between tiers so far, each GPU's
    ``free`` memory, and the ``orphaned`` bytes of dropped states not freed
    yet; ``print`` it for a table.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.paged_adamw8bit(1e-3)
    >>> state = tx.init({'w': jnp.ones((64, 64))})
    >>> print(optax_paged.memory_report(state))  # doctest: +SKIP
  """
  rows = []
  moves = registry.MoveStats()
  free, evicted = {}, {}
  paged_on_device = {}  # per GPU, over every live state: counted once
  resets = 0
  for buffers in registry.find_buffers(state):
    record = buffers.record()
    moves.add(record.moves)
    if record.has_master_weights:
      resets += sum(entry.master_weight_resets() for entry in record.entries)
    if record.paged:
      for device, entry in zip(record.devices, record.entries, strict=True):
        free_bytes, total = gpu_memory(int(entry.ordinal))
        free[str(device)] = free_bytes
        if device not in paged_on_device:
          paged_on_device[device] = _paged_on_device(device)
        lost = auto_budget.evicted_at_least(
            total, xla_stats(device), paged_on_device[device])
        if lost:
          evicted[str(device)] = lost
          logger.warning(
              'optax_paged: CUDA has evicted at least %d bytes of device-tier '
              'state on %s for XLA; steps fault those pages in. Guard the '
              'step with memory_guarded or lower the device budget.', lost,
              device)
    sharded = record.layout is not None
    for device, entry in zip(record.devices, record.entries, strict=True):
      for i, layout in enumerate(record.leaves):
        info = entry.leaf_info(i)
        rows.append(MemoryRow(
            path=layout.path,
            shape=layout.shape,
            bits=layout.code_bits if layout.quantized else 32,
            tier=info['tier'],
            bytes=int(info['bytes']),
            device=str(device) if sharded else '',
        ))
  return MemoryReport(tuple(rows), moves, free, evicted,
                      registry.REGISTRY.orphaned_bytes(), resets)


def _paged_on_device(device: jax.Device) -> int:
  """Bytes in the device tier of every live paged state on ``device``."""
  total = 0
  for buffers in registry.REGISTRY.live_states():
    record = buffers.record()
    if not record.paged:
      continue
    for placed, entry in zip(record.devices, record.entries, strict=True):
      if placed == device:
        total += device_bytes([entry.leaf_info(i)
                               for i in range(len(record.leaves))])
  return total


def state_nbytes(state: Any) -> int:
  """Bytes an optimizer state holds: its JAX arrays plus registry buffers.

  Works for any optax state, so optax_paged and optax optimizers compare
  like for like.

  Args:
    state: an optimizer state, or any pytree containing some.

  Returns:
    The total in bytes.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> optax_paged.state_nbytes(optax.adamw(1e-3).init(params))
    32772
    >>> optax_paged.state_nbytes(optax_paged.adamw8bit(1e-3).init(params))
    8708
  """
  def is_buffers(x: Any) -> bool:
    return isinstance(x, registry.StateBuffers)

  total = 0
  for node in jax.tree.leaves(state, is_leaf=is_buffers):
    if is_buffers(node):
      total += 0 if node.is_abstract else node.record().total_bytes
    else:
      total += int(getattr(node, 'nbytes', 0))
  return total
