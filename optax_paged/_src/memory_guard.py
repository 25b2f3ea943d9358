"""Training steps that make room for themselves: ``memory_guarded``.

What XLA does when a GPU step does not fit (measured on an H100 with jax
0.11.2 by ``tools/xla_oom_probe.py``; benchmarks/NOTES.md):

- it allocates a step's temporaries and outputs as the step starts, and a
  step that does not fit fails with ``RESOURCE_EXHAUSTED``, reported
  asynchronously (at ``block_until_ready``, not at the call);
- an argument the step donates is deleted by then: a failed step that
  donates its parameters cannot be run again;
- its allocator never gives memory back to the device: after an 8 GiB array
  is dropped its pool still holds the 8 GiB.

So the guard acts before the step. It compiles the step once per argument
signature, reads what it allocates from XLA's memory analysis (temporaries
and outputs, less what aliases donated arguments) and, when the idle part of
XLA's pool cannot hold that, reserves for XLA's growth (a region of
doubling size: see ``auto_budget``) and moves the paged states on the
step's GPUs (every live one, given to the step or not) to the host tier as
far as needed. With a step that does not donate, ``retry=True`` also
catches an out-of-memory the estimate missed (another process allocating
meanwhile): it moves those paged states to the host and runs the step
again.
"""

import dataclasses
import inspect
import logging
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any

import jax

from optax_paged._src import auto_budget
from optax_paged._src import paging
from optax_paged._src import registry

logger = logging.getLogger('optax_paged')


@dataclasses.dataclass(frozen=True)
class StepAllocation:
  """What a compiled step allocates when it starts (XLA's memory analysis).

  Attributes:
    total: bytes of its temporaries and outputs, less the outputs that alias
      donated arguments.
    temporaries: bytes of its temporaries, one buffer: its largest single
      allocation.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> step = optax_paged.memory_guarded(lambda x: x * 2 + 1)
    >>> need = step.allocation(jnp.ones((1024, 1024)))
    >>> need.total >= 4 * 1024 * 1024  # at least the output
    True
  """

  total: int
  temporaries: int


def _is_out_of_memory(error: BaseException) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(error)


def _leaf_signature(x: Any) -> Hashable:
  if isinstance(x, jax.Array):
    return (x.shape, x.dtype, x.weak_type, x.sharding)
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    return (tuple(x.shape), str(x.dtype))
  return type(x)


def _key(static: tuple[Any, ...], leaves: Sequence[Any],
         treedef: Any) -> Hashable:
  """What the compiled step depends on: one analysis per key."""
  return static, treedef, tuple(_leaf_signature(x) for x in leaves)


class MemoryGuardedStep:
  """A jitted step that moves paged state out of XLA's way before it runs.

  Made by ``memory_guarded``; call it as the step.

  Attributes:
    needs: what the compiled step allocates, by argument signature (see
      ``allocation``); analysed when the arguments hold paged GPU state.
    retries: steps run again after an out-of-memory (``retry=True``).

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> evaluate = optax_paged.memory_guarded(lambda x: jnp.sum(x * x),
    ...                                       retry=True)
    >>> float(evaluate(jnp.ones((256, 256))))
    65536.0
    >>> evaluate.retries  # reruns after an out-of-memory
    0
  """

  def __init__(self, step: Callable[..., Any], jitted: Any,
               static_argnums: Sequence[int], retry: bool,
               policy: auto_budget.AutoBudget,
               static_argnames: Sequence[str] = ()):
    self._step = step
    self._jitted = jitted
    self._static = tuple(static_argnums)
    self._static_names = tuple(static_argnames)
    self._retry = retry
    self._policy = policy
    self.needs: dict[Hashable, StepAllocation | None] = {}
    self.retries = 0

  def __call__(self, *args, **kwargs):
    static, leaves, treedef = self._split(args, kwargs)
    records = _live_paged_records(_devices(leaves))
    if records:
      self._make_room(records, self._analysed(
          _key(static, leaves, treedef), args, kwargs))
    if not self._retry:
      return self._jitted(*args, **kwargs)
    try:
      return jax.block_until_ready(self._jitted(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - XLA's runtime error type
      if not _is_out_of_memory(error):
        raise
      deleted = [x for x in leaves
                 if isinstance(x, jax.Array) and x.is_deleted()]
      if deleted:
        raise RuntimeError(
            'memory_guarded: the step ran out of GPU memory after XLA had '
            f'consumed {len(deleted)} donated argument(s); a retried step '
            'must not donate (jit it without donate_argnums).') from error
      self.retries += 1
      logger.warning('optax_paged: a step ran out of GPU memory; moving the '
                     'paged state to the host tier and running it again')
      _move_all_to_host(records)
      return jax.block_until_ready(self._jitted(*args, **kwargs))

  def allocation(self, *args, **kwargs) -> StepAllocation | None:
    """What the compiled step allocates for these arguments.

    From XLA's memory analysis, compiled once per argument signature (and
    shared with the step's own compilation); None where XLA gives none.
    """
    return self._analysed(_key(*self._split(args, kwargs)), args, kwargs)

  def _split(self, args, kwargs) -> tuple[tuple[Any, ...], list[Any], Any]:
    """The static arguments, and the leaves and structure of the others."""
    static = tuple(args[i] for i in self._static if i < len(args)) + tuple(
        (name, kwargs[name]) for name in self._static_names if name in kwargs)
    dynamic = tuple(a for i, a in enumerate(args) if i not in self._static)
    named = {k: v for k, v in kwargs.items() if k not in self._static_names}
    leaves, treedef = jax.tree.flatten((dynamic, named))
    return static, leaves, treedef

  def _analysed(self, key: Hashable, args, kwargs) -> StepAllocation | None:
    if key not in self.needs:
      stats = self._jitted.lower(*args, **kwargs).compile().memory_analysis()
      self.needs[key] = None if stats is None else StepAllocation(
          total=max(0, int(stats.temp_size_in_bytes)
                    + int(stats.output_size_in_bytes)
                    - int(stats.alias_size_in_bytes)),
          temporaries=int(stats.temp_size_in_bytes))
    return self.needs[key]

  def _make_room(self, records, need: StepAllocation | None) -> None:
    """Fits each GPU's paged state next to the step; moves only on change."""
    for device, slots in _slots_by_device(records).items():
      waited = False
      infos = [[entry.leaf_info(i) for i in range(len(record.leaves))]
               for record, _, entry in slots]
      current = [paging.device_bytes(x) for x in infos]
      policies = [record.budget_policy or self._policy
                  for record, _, _ in slots]
      margin = max(policy.margin for policy in policies)
      room = auto_budget.room(auto_budget.Observation(
          free=paging.gpu_memory(int(slots[0][2].ordinal))[0],
          state_on_device=sum(current), xla_stats=paging.xla_stats(device),
          step_need=None if need is None else need.total,
          step_largest=0 if need is None else need.temporaries),
          auto_budget.AutoBudget(margin=margin))
      # Entries in turn: each may have the room less what the entries
      # before it were given and what the entries after it hold now.
      later = sum(current)
      for (record, index, entry), entry_infos, now, policy in zip(
          slots, infos, current, policies, strict=True):
        later -= now
        caps = record.budget_caps
        budget = auto_budget.settle(
            max(0, room - later), now, policy.grow_threshold,
            None if caps is None else caps[index])
        sizes = [int(info['bytes']) for info in entry_infos]
        target = paging.place(sizes, budget)
        if target != [info['tier'] for info in entry_infos]:
          if not waited:
            # The previous step may still run: moves come after it.
            registry.wait_for_devices(record)
            waited = True
          paging.move_leaves(entry, target, record.moves, entry_infos)
        room -= sum(n for n, t in zip(sizes, target, strict=True)
                    if t == 'device')


def _devices(leaves: Sequence[Any]) -> set[jax.Device]:
  """The devices the arrays among a step's argument leaves live on."""
  devices = set()
  for x in leaves:
    if isinstance(x, jax.Array) and not x.is_deleted():
      devices |= x.sharding.device_set
  return devices


def _live_paged_records(devices: set[jax.Device]) -> list[Any]:
  """Every live paged GPU state with an entry on one of ``devices`` (all of
  them when the step has no array arguments): a step needs the memory of
  the optimizer states it is not given as well (an evaluation pass)."""
  records = []
  for buffers in registry.REGISTRY.live_states():
    record = buffers.record()
    if record.paged and (not devices or devices & set(record.devices)):
      records.append(record)
  return records


def _slots_by_device(records):
  """(record, entry index, entry) per GPU holding paged state."""
  slots: dict[jax.Device, list[tuple[Any, int, Any]]] = {}
  for record in records:
    for index, (device, entry) in enumerate(
        zip(record.devices, record.entries, strict=True)):
      slots.setdefault(device, []).append((record, index, entry))
  return slots


def _move_all_to_host(records) -> None:
  for record in records:
    registry.wait_for_devices(record)
    for entry in record.entries:
      paging.move_leaves(entry, ['host'] * len(record.leaves), record.moves)


def _as_tuple(value: Any) -> tuple[Any, ...]:
  if value is None:
    return ()
  if isinstance(value, (int, str)):
    return (value,)
  return tuple(value)


def memory_guarded(
    step: Callable[..., Any],
    *,
    retry: bool = False,
    policy: auto_budget.AutoBudget | None = None,
    **jit_options: Any,
) -> MemoryGuardedStep:
  """Jits a training step that moves paged state out of XLA's way.

  Before each call, what the compiled step allocates (XLA's memory analysis,
  once per argument signature) is compared with the idle part of XLA's pool
  on each GPU the step's arrays live on. If the step must grow the pool,
  XLA's allocator asks for a region up to twice what it holds or twice the
  request (it grows in regions of doubling size, within its limit), so that
  much is reserved, and every live
  paged optimizer state on those GPUs (given to the step or not: guard an
  evaluation pass the same way) moves to the host tier as far as needed.
  When there is room again it comes back, with the hysteresis of
  ``AutoBudget``: a state with ``device_budget='auto'`` grows to what fits,
  one with a fixed budget back to that budget. A spike (an evaluation pass,
  a longer sequence) then costs slower steps instead of the run; results are
  bit-identical whatever the tiers.

  XLA reports an out-of-memory asynchronously and has deleted the donated
  arguments by then (measured: ``tools/xla_oom_probe.py``), so a step that
  donates is protected only by the check before it. ``retry=True`` also
  catches an out-of-memory the check missed (memory taken by another process
  in between): the step must then not donate, and each call waits for its
  outputs; on ``RESOURCE_EXHAUSTED`` those paged states move to the host and
  the step runs again, once.

  Args:
    step: the training step, a function of arrays (not yet jitted).
    retry: rerun a step that ran out of memory (see above).
    policy: the margin and hysteresis for states with a fixed budget
      (default ``AutoBudget()``); an automatic state uses its own.
    **jit_options: passed to ``jax.jit`` (``donate_argnums``,
      ``static_argnums``, ``in_shardings``, ...); no donation with
      ``retry``.

  Returns:
    A ``MemoryGuardedStep``, called as the step.

  Raises:
    ValueError: for ``retry`` with ``donate_argnums`` or ``donate_argnames``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> tx = optax_paged.paged_adamw8bit(1e-3, device_budget='auto')
    >>> def train_step(params, state, grads):
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> step = optax_paged.memory_guarded(train_step, donate_argnums=(0, 1))
    >>> params = {'w': jnp.ones((64, 64))}
    >>> params, state = step(params, tx.init(params), {'w': jnp.ones((64, 64))})
  """
  donated = _as_tuple(jit_options.get('donate_argnums')) + _as_tuple(
      jit_options.get('donate_argnames'))
  if retry and donated:
    raise ValueError(
        'memory_guarded(retry=True) reruns a failed step with the same '
        'arguments, which XLA deletes when donated: pass no donate_argnums '
        'or donate_argnames.')
  if policy is None:
    policy = auto_budget.AutoBudget()
  jitted = jax.jit(step, **jit_options)
  static_names = _as_tuple(jit_options.get('static_argnames'))
  return MemoryGuardedStep(
      step, jitted,
      _as_tuple(jit_options.get('static_argnums')) + _positions(
          step, static_names),
      retry, policy, static_names)


def _positions(step: Callable[..., Any], names: Sequence[str]) -> tuple[
    int, ...]:
  """Positions of the named parameters that can be passed positionally."""
  try:
    parameters = list(inspect.signature(step).parameters.values())
  except (TypeError, ValueError):  # no signature: names only by keyword
    return ()
  positional = (inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return tuple(i for i, p in enumerate(parameters)
               if p.name in names and p.kind in positional)
