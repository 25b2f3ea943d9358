"""The state registry: who owns the optimizer state buffers.

An optimizer state (an optax ``NamedTuple``) holds a :class:`StateBuffers`
node: a pytree with no leaves whose static state id names the entries of the
C++ registry where the quantized moments live. Keeping the buffers out of the
pytree is what lets one FFI call update them in place inside ``jax.jit``
without copying them through XLA.

Lifetime: the ``StateBuffers`` object for a state id is unique while any
state refers to it; when the last one is garbage collected, the buffers are
an orphan, freed soon after (``StateRegistry``). ``release`` and
``free_orphans`` free them at once. JAX caches hold only the integer state
id, never the buffers; an id freed that way serves a later state of the same
structure, and so do the steps compiled for it (``state_ids``).
"""

import contextlib
import dataclasses
import gc
import math
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import devices as devices_lib
from optax_paged._src import ffi
from optax_paged._src import master_weights
from optax_paged._src import orbax_guard
from optax_paged._src import sharding
from optax_paged._src import state_ids

_PLATFORM_CODES = {'cpu': 0, 'cuda': 1}
# What the kernels update (ffi/update_validation.h).
_PARAM_DTYPES = frozenset(
    np.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16))
# ffi/state_memory.h's Tier codes by the names its TierName gives them, as
# the extension exports them.
TIER_CODES = dict(ffi.extension().TIER_CODES)


@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """What the registry holds for one parameter leaf."""

  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  quantized: bool
  decay: bool
  code_bits: int = 8  # of a quantized leaf's codes: 8 or 4
  correction_bits: int = 0  # of its master-weight correction: 0, 8 or 16

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class DtypeGroup:
  """Leaves updated by one FFI call: same parameter dtype."""

  dtype: np.dtype
  indices: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PendingInit:
  """What ``tx.init`` under a JAX transformation would have allocated.

  It rides in the abstract state's tree structure, so a state built inside
  ``jax.jit`` (``jax.jit(create_train_state)``) can be given its buffers
  afterwards by ``allocate_state`` from the parameters' shardings.
  """

  optimizer: str
  num_moments: int
  leaves: tuple[LeafLayout, ...]
  paged: bool
  device_budget: Any
  zero_axis: str | None
  initial_values: tuple[float, ...]
  signed: tuple[bool, ...]
  master_weight_bits: int | None = None


@dataclasses.dataclass
class MoveStats:
  """Moves of state buffers between the tiers so far.

  Attributes:
    count: buffers (leaves, on one device each) moved.
    bytes: their bytes.
    seconds: wall time the moves took (advice, prefetch and its wait).
  """

  count: int = 0
  bytes: int = 0
  seconds: float = 0.0

  def add(self, other: 'MoveStats') -> None:
    self.count += other.count
    self.bytes += other.bytes
    self.seconds += other.seconds



class StateRecord:
  """A state's registry entries (one per device) and their layout.

  Attributes:
    state_id: the state's id in the C++ registry; each entry is found by
      it and its device.
    entries: the C++ entries, one per addressable device that holds a shard
      (one on a single device), in mesh order.
    devices: the JAX device of each entry.
    layout: the mesh layout, or None for a state on one device.
  """

  def __init__(
      self,
      state_id: int,
      entries: Sequence[Any],
      devices: Sequence[jax.Device],
      optimizer: str,
      platform: str,
      treedef: jax.tree_util.PyTreeDef,
      leaves: Sequence[LeafLayout],
      paged: bool,
      layout: 'sharding.MeshLayout | None' = None,
  ):
    self.state_id = state_id
    self.entries = tuple(entries)
    self.devices = tuple(devices)
    self.optimizer = optimizer
    self.platform = platform
    self.paged = paged
    self.treedef = treedef
    self.leaves = tuple(leaves)
    self.layout = layout
    # Whether a step (traced) or a load has written the moments, as far as
    # Python saw; a step compiled for an earlier state with the same id
    # runs unseen, so False is checked against the stamps. See
    # transform.OptimizerState.
    self.touched = False
    # Restored from a Flax export older than format 3, whose moments' step
    # is the count the state is rebuilt with; see transform.OptimizerState.
    self.adopt_count = False
    # Tier moves of this record's buffers (paging.move_leaves).
    self.moves = MoveStats()
    # The device budget of a paged record (paging.apply_budget): the
    # automatic policy, or None and the bytes each entry placed on its
    # device under a fixed budget.
    self.budget_policy = None
    self.budget_caps = None
    # The count of the newest state built on these buffers outside a trace:
    # an output of the step that made it, still running while not ready
    # (see busy).
    self.last_count = None
    self._released = False
    self._id_returned = False
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, leaf in enumerate(self.leaves):
      by_dtype.setdefault(leaf.dtype, []).append(i)
    self.groups = tuple(
        DtypeGroup(dtype, tuple(indices)) for dtype, indices in by_dtype.items()
    )

  @property
  def code_bits(self) -> int:
    """Bits of the quantized leaves' codes (8 or 4; 8 if none is)."""
    return next((leaf.code_bits for leaf in self.leaves if leaf.quantized), 8)

  @property
  def has_master_weights(self) -> bool:
    """Whether any leaf keeps a master-weight correction."""
    return any(leaf.correction_bits for leaf in self.leaves)

  @property
  def num_moments(self) -> int:
    return int(self.entries[0].num_moments)

  @property
  def released(self) -> bool:
    """Whether the state was released (its buffers freed, or being freed)."""
    return self._released

  @property
  def has_moments(self) -> bool:
    """Whether any leaf has an element (an optimizer that a wrapper gave no
    parameter, such as optax.masked with every leaf masked, has none)."""
    return any(layout.size for layout in self.leaves)

  @property
  def total_bytes(self) -> int:
    """Bytes of state this process holds for this record, all devices."""
    return sum(int(entry.total_bytes) for entry in self.entries)

  def refuse_steps(self) -> None:
    """Counts the state as released from now on, before its buffers go.

    Later calls are refused by Python (see ``StateBuffers.tree_flatten``)
    while the steps already dispatched finish on the buffers.
    """
    self._released = True

  def busy(self) -> bool:
    """Whether the step that made the newest state is still running.

    Asks without waiting, so that a garbage collector's callback may ask.
    """
    count = self.last_count
    return (count is not None and not count.is_deleted()
            and not count.is_ready())

  def release(self) -> None:
    self._released = True
    self.last_count = None
    # Every entry leaves the registry before any is freed: a step on the
    # other devices then finds the state released, never "not on this
    # device" (ffi/state_registry.h).
    ffi.extension().release_entries(list(self.entries))
    if not self._id_returned:
      self._id_returned = True
      state_ids.STATE_IDS.released(self.state_id)

  def check_device_marks(self) -> None:
    """Raises (once) for a GPU step the kernel refused.

    The kernel cannot fail a call: given a shard meant for another device,
    or a count that is not its moments' step, it leaves the state alone,
    returns NaN and marks the entry. The mark is reported once, by the next
    call on that device or here, whichever comes first.
    """
    # Every device's marks are taken, so that one refused step is reported
    # once, not once per device.
    marks = [(device, *entry.take_marks())
             for device, entry in zip(self.devices, self.entries, strict=True)]
    for device, misrouted, stale in marks:
      if misrouted:
        raise ValueError(
            f'{self.optimizer}: a step on {device} received the shard of '
            'another mesh position (devices ordered differently than at '
            'init); that step left this state alone and returned NaN. Use '
            'the mesh the parameters had at init.'
        )
      if stale is not None and stale[1] == base.MAX_COUNT:
        raise ValueError(base.COUNT_OVERFLOW_MSG.format(name=self.optimizer)
                         + ' That step returned NaN.')
      if stale is not None:
        raise ValueError(base.STALE_STATE_MSG.format(
            name=self.optimizer, count=stale[0], step=stale[1]) +
            ' That step returned NaN.')

  def moments_step(self) -> int | None:
    """The step every leaf's moments are at.

    None if they disagree, or if there are no moments (no leaf has an
    element): such a state is at whatever step its count says.
    """
    steps = {s for entry in self.entries for s in entry.moments_steps()}
    return steps.pop() if len(steps) == 1 else None

  def read_moments(self) -> tuple[int | None, list[Any]]:
    """Every entry's moments and the step they are at, read at once.

    Under every entry's lock for the whole read, as a step holds its
    entry's for the whole call: the copy is one step's moments, never some
    leaves from before a step and some from after it.

    Returns:
      The step (None as for ``moments_step``), and per entry, per leaf, per
      moment: ``(codes, absmax)`` of a quantized leaf, else
      ``(fp32 values, None)``.
    """
    step, moments, _ = self.read_state()
    return step, moments

  def read_state(self) -> tuple[int | None, list[Any], list[Any]]:
    """``read_moments`` and, per entry, per leaf, the master weights'
    ``(correction, fingerprints with the reset count last)`` or None, read
    in the same moment.

    After the work dispatched to the record's devices: a step on these
    buffers may not have run yet (one from another copy of the state, its
    result dropped), and a read before it would depend on timing.
    """
    wait_for_devices(self)
    copies = ffi.extension().read_entries(list(self.entries))
    steps = {step for steps, _, _ in copies for step in steps}
    return (steps.pop() if len(steps) == 1 else None,
            [leaves for _, leaves, _ in copies],
            [masters for _, _, masters in copies])

  def write_moments(self, writes: Sequence[tuple[Any, ...]],
                    step: int) -> None:
    """Writes moments and stamps every leaf with ``step``, at once.

    Under every entry's lock, as ``read_moments``: a step on another thread
    lands before the whole write or after it. Every write is checked before
    the first is made. After the work dispatched to the record's devices,
    as ``read_state``: a step not yet run would step on what is written.

    Args:
      writes: ``(entry index, leaf, moment, data, absmax)``, the data and
        absmax as uint8 arrays (absmax empty for an fp32 moment).
      step: the step the written moments are at.
    """
    wait_for_devices(self)
    self.touched = True
    ffi.extension().write_entries(list(self.entries), list(writes), step)

  def set_moments_step(self, step: int) -> None:
    """Stamps the moments with ``step`` (after a load wrote them)."""
    for entry in self.entries:
      entry.set_moments_step(step)

  def check_count(self, count: int, step: int | None) -> None:
    """Refuses a concrete ``count`` that is not ``step``, the moments' step.

    ``step`` as ``read_moments`` gives it; any count fits a state without
    moments.
    """
    if self.has_moments and step != count:
      raise ValueError(base.STALE_STATE_MSG.format(
          name=self.optimizer, count=count,
          step='different steps' if step is None else step))

  def check_paths(self, name: str, kind: str, tree: Any) -> None:
    """Refuses a tree whose leaves are not the parameters' at init, by path.

    Leaves are matched by name, as optax matches trees: pairing them by
    position would let the gradient of one parameter update another's
    moments whenever the count and shapes happen to agree.
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in with_paths]
    want = [_comparable_path(layout.path) for layout in self.leaves]
    have = [_comparable_path(path) for path in paths]
    if have == want:
      return
    extra = [path for path, h in zip(paths, have, strict=True)
             if h not in set(want)]
    missing = [layout.path for layout, w in zip(self.leaves, want, strict=True)
               if w not in set(have)]
    if extra and missing:
      detail = (f'it has a leaf at {extra[0]}, where the state has '
                f'{missing[0]} instead')
    elif extra:
      detail = f'it has a leaf at {extra[0]} that the state does not have'
    elif missing:
      detail = f'it has no leaf at {missing[0]}, which the state has'
    else:
      detail = f'its leaves are in another order ({paths})'
    raise ValueError(
        f'{name}: {kind} tree {treedef} does not match the parameter tree '
        f'the state was initialised with, {self.treedef}: {detail}. Pass '
        'the parameters (and gradients) with the tree given to tx.init.'
    )

  def check_tree(
      self, name: str, kind: str, tree: Any,
      shapes: Sequence[tuple[int, ...]] | None = None,
  ) -> list[Any]:
    """Leaves of ``tree`` if they match this layout; else a ValueError.

    Args:
      name: the optimizer, for messages.
      kind: ``'updates'`` or ``'params'``, for messages.
      tree: the tree to check.
      shapes: the shape each leaf must have (local shapes inside a
        ``shard_map``); the parameters' shapes if None.
    """
    self.check_paths(name, kind, tree)
    leaves = jax.tree.leaves(tree)
    if shapes is None:
      shapes = [layout.shape for layout in self.leaves]
    for leaf, layout, want in zip(leaves, self.leaves, shapes, strict=True):
      shape = tuple(np.shape(leaf))
      if shape != tuple(want):
        raise ValueError(
            f'{name}: {kind} at {layout.path} has shape {shape}; the state '
            f'was initialised for shape {tuple(want)} here.'
        )
      dtype = _dtype_of(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f'{name}: {kind} at {layout.path} has dtype {dtype}; optax_paged '
            'updates floating-point parameters (float32, bfloat16, float16).'
        )
      if kind == 'params' and dtype != layout.dtype:
        raise TypeError(
            f'{name}: params at {layout.path} have dtype {dtype}; the state '
            f'was initialised for {layout.dtype}.'
        )
    return leaves


@jax.tree_util.register_pytree_node_class
class StateBuffers:
  """The registry-owned part of an optimizer state (a pytree with no leaves).

  Attributes:
    state_id: the id of the state's entries in the registry; 0 for a state
      made under a JAX transformation, which owns no buffers.
  """

  __slots__ = ('state_id', '_record', 'pending', '__weakref__')

  def __init__(self, state_id: int, record: StateRecord | None,
               pending: PendingInit | None = None):
    self.state_id = state_id
    self._record = record
    self.pending = pending
    if state_id:
      state_ids.STATE_IDS.hold(state_id)
      weakref.finalize(self, state_ids.STATE_IDS.drop, state_id)

  @property
  def key(self) -> int:
    """Deprecated name of ``state_id``."""
    warnings.warn(
        'StateBuffers.key is deprecated and will be removed in the next '
        'release; use StateBuffers.state_id.',
        DeprecationWarning, stacklevel=2)
    return self.state_id

  def tree_flatten(self):
    if self.pending is not None:
      return (), self.pending
    if self.state_id and (self._record is None or self._record.released):
      # Another structure than the live state's: a step compiled for that
      # one is not reused, so the call traces and is refused, in Python,
      # naming the released state. The compiled step would run and fail in
      # the kernel, and that error would be passed on by every later step
      # fed its outputs, each wrapping it once more.
      return (), _Released(self.state_id)
    return (), self.state_id

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    del children
    if isinstance(aux_data, PendingInit):
      return StateBuffers(0, None, aux_data)
    if isinstance(aux_data, _Released):
      return StateBuffers(aux_data.state_id, None)
    return REGISTRY.lookup(aux_data)

  def __repr__(self) -> str:
    if self.state_id == 0:
      return 'StateBuffers(abstract)'
    if self._record is None or self._record.released:
      return f'StateBuffers(state_id={self.state_id}, released)'
    return (
        f'StateBuffers(state_id={self.state_id}, {self._record.optimizer}, '
        f'{len(self._record.leaves)} leaves, '
        f'{len(self._record.entries)} devices, '
        f'{self._record.total_bytes} bytes)'
    )

  def __reduce__(self):
    raise TypeError(
        'StateBuffers cannot be copied or pickled on their own: copy or '
        'pickle the optimizer state that holds them (copy.deepcopy(opt_state) '
        'makes an independent copy), or export it with optax_paged.state_dict.'
    )

  @property
  def is_abstract(self) -> bool:
    return self.state_id == 0

  def record(self) -> StateRecord:
    """The live record, or a clear error for abstract and released states."""
    if self.state_id == 0:
      raise ValueError(base.ABSTRACT_STATE_MSG)
    if self._record is not None:
      self._record.check_device_marks()
    if self._record is None or self._record.released:
      raise ValueError(
          f'optimizer state {self.state_id}: {base.RELEASED_STATE_MSG}')
    return self._record


@dataclasses.dataclass(frozen=True)
class _Released:
  """A released state's id, as its tree structure holds it."""

  state_id: int


def _comparable_path(path: str) -> str:
  """``path`` less a trailing ``.value``, the attribute of a wrapped leaf.

  Flax initialises with leaves wrapped in ``nnx.Variable`` (or Linen's
  ``Partitioned``), whose path ends in ``.value``, and updates with the plain
  arrays: the same parameter under both names.
  """
  return path[:-len('.value')] if path.endswith('.value') else path


def _check_size(optimizer: str, path: str, shape: tuple[int, ...],
                num_moments: int) -> None:
  """Refuses a leaf whose state no machine holds, before any size overflows.

  Sizes are int64 in the registry and its kernels; a larger product would
  wrap (to 0 for ``(2**40, 2**30)``) and allocate a state that fits nothing.
  """
  size = math.prod(int(n) for n in shape)  # Python ints never wrap
  state_bytes = size * num_moments * base.FP32_MOMENT_BYTES
  if state_bytes > base.MAX_LEAF_STATE_BYTES:
    raise ValueError(
        f'{optimizer}: parameter {path or "<root>"} of shape {tuple(shape)} '
        f'has {size} elements; its state (up to {state_bytes} bytes) is '
        f'beyond the {base.MAX_LEAF_STATE_BYTES} bytes a leaf\'s state may '
        'have, more memory than any machine has. Check the shape.'
    )


def _dtype_of(x: Any) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, 'dtype') else np.asarray(x).dtype


def _single_device_of(optimizer: str, leaves: Sequence[Any]) -> jax.Device:
  """The one device the leaves live on (the default one for host arrays)."""
  devices = {
      d for leaf in leaves if isinstance(leaf, jax.Array)
      for d in leaf.sharding.device_set
  }
  if len(devices) > 1:
    raise ValueError(
        f'{optimizer}: the parameters live on several devices '
        f'({sorted(map(str, devices))}) without a common mesh; put them on '
        'one device, or on one jax.sharding.Mesh with NamedShardings.'
    )
  if devices:
    return devices.pop()
  return next(iter(jnp.zeros(()).devices()))


class StateRegistry:
  """Owns every optimizer state's buffers in this process.

  A state's buffers live while some ``StateBuffers`` object refers to them. When
  the last one is collected the record becomes an orphan: a lookup of its state
  id soon after (a pytree rebuilt from a treedef, as Flax NNX does when it
  merges a module back after ``nnx.jit``: it clears the module, dropping every
  reference for a moment, then rebuilds it) revives it. An orphan is freed by
  the next state allocation once the step that made its last state has finished
  (until then allocations pass it by: a state dropped while its step runs keeps
  its buffers for that step). A garbage collection (of any generation once
  ``ORPHAN_GRACE_SECONDS`` have passed, or a full one) frees only orphans that
  no step made, since it cannot ask JAX whether a step has finished.
  ``free_orphans()`` frees every orphan at once, waiting for their steps.
  """

  # Long enough for NNX to rebuild a module (microseconds to milliseconds),
  # short next to a training run.
  ORPHAN_GRACE_SECONDS = 0.5

  def __init__(self):
    self._live: weakref.WeakValueDictionary[int, StateBuffers] = (
        weakref.WeakValueDictionary()
    )
    self._orphans: dict[int, tuple[StateRecord, float]] = {}
    gc.callbacks.append(self._on_gc)

  def _adopt(self, record: StateRecord) -> StateBuffers:
    orbax_guard.register(StateBuffers)
    buffers = StateBuffers(record.state_id, record)
    self._live[record.state_id] = buffers
    weakref.finalize(buffers, self._orphan, record)
    return buffers

  def _orphan(self, record: StateRecord) -> None:
    if not record.released:
      self._orphans[record.state_id] = (record, time.monotonic())

  def _on_gc(self, phase: str, info: dict[str, int]) -> None:
    if phase != 'start' or not self._orphans:
      return
    # A collection may start anywhere, even inside JAX's own C++ code, so
    # it neither waits nor asks JAX whether a step has finished (a suite run
    # segfaulted inside a collection while that was the one JAX call made
    # there): an orphan whose last step may still run is left for the
    # next allocation or free_orphans().
    grace = 0.0 if info.get('generation') == 2 else self.ORPHAN_GRACE_SECONDS
    self.free_orphans(grace, wait=False, ask_jax=False)

  def free_orphans(self, older_than: float = 0.0, *, wait: bool = True,
                   ask_jax: bool = True) -> int:
    """Frees the orphaned records dropped at least ``older_than`` s ago.

    Args:
      older_than: seconds since the record was dropped.
      wait: wait for the work dispatched to an orphan's devices first, so
        that a step still running on a dropped state finishes (and its
        results are kept). Without it, orphans whose last step is still
        running are left for a later call.
      ask_jax: without ``wait``, whether JAX may be asked if an orphan's
        last step has finished; if not, every orphan whose last step was
        seen is left for a later call.

    Returns:
      The bytes freed.
    """
    now = time.monotonic()
    freed = 0
    for state_id, (record, since) in list(self._orphans.items()):
      if now - since < older_than:
        continue
      if wait:
        wait_for_devices(record)
      elif record.last_count is not None and (not ask_jax or record.busy()):
        continue
      # Revived (looked up) or freed by a collection meanwhile: not ours.
      if self._orphans.pop(state_id, None) is not None:
        freed += record.total_bytes
        record.release()
    return freed

  def orphaned_bytes(self) -> int:
    """Bytes held by orphans: dropped states not freed yet."""
    return sum(record.total_bytes
               for record, _ in list(self._orphans.values()))

  def allocate(
      self,
      optimizer: str,
      num_moments: int,
      params: Any,
      quantized: Sequence[bool],
      decay: Sequence[bool],
      *,
      paged: bool,
      device_budget: Any = None,
      zero_axis: str | None = None,
      initial_values: tuple[float, ...] = (),
      signed: tuple[bool, ...] = (),
      paths: Sequence[str] | None = None,
      code_bits: int = 8,
      master_weight_bits: int | None = None,
  ) -> StateBuffers:
    """Allocates state for ``params``; abstract (pending) under tracing.

    Parameters on a mesh get one entry per addressable device, holding that
    device's shard. On a GPU, paged state starts in the host tier (the
    caller applies ``device_budget`` with ``paging.apply_budget``; it is
    kept here for an allocation still pending); unpaged state is plain
    device memory. Moments start at ``initial_values`` (zero where not
    given). Quantized leaves hold ``code_bits``-bit codes (8 or 4). With
    ``master_weight_bits`` (24 or 32) the 16-bit leaves keep an 8- or
    16-bit master-weight correction.
    """
    orbax_guard.register(StateBuffers)  # pending states, too, are refused
    leaves, treedef = jax.tree.flatten(params)
    if paths is None:
      paths = [
          jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
      ]
    layouts = []
    for path, leaf, q, d in zip(paths, leaves, quantized, decay, strict=True):
      dtype = _dtype_of(leaf)
      if dtype not in _PARAM_DTYPES:
        raise TypeError(
            f'{optimizer}: parameter {path or "<root>"} has dtype {dtype}; '
            'optax_paged optimizes float32, bfloat16 and float16 parameters '
            '(cast float64 ones, e.g. with jax_enable_x64 on, to float32).'
        )
      _check_size(optimizer, path, np.shape(leaf), num_moments)
      layouts.append(
          LeafLayout(path, tuple(np.shape(leaf)), dtype, bool(q), bool(d),
                     code_bits,
                     master_weights.correction_bits(master_weight_bits,
                                                    dtype))
      )
    master_weights.check_leaves(optimizer, master_weight_bits,
                                [layout.dtype for layout in layouts])
    if any(base.is_tracer(leaf) for leaf in leaves):
      return StateBuffers(0, None, PendingInit(
          optimizer, num_moments, tuple(layouts), paged, device_budget,
          zero_axis, tuple(initial_values), tuple(signed),
          master_weight_bits))
    mesh_layout = sharding.mesh_layout_of(optimizer, leaves, paths, zero_axis)
    if mesh_layout is None:
      devices = [_single_device_of(optimizer, leaves)]
    else:
      devices = mesh_layout.local_devices()
    platform = devices_lib.platform_of(devices[0])
    if platform not in _PLATFORM_CODES:
      raise ValueError(
          f'{optimizer}: parameters live on platform {platform!r}; '
          'optax_paged supports cpu and cuda.'
      )
    buffers = self.create(optimizer, num_moments, platform, treedef, layouts,
                          devices, mesh_layout,
                          paged=paged and platform == 'cuda')
    if any(initial_values):
      fill_moments(buffers.record(), initial_values, signed)
    return buffers

  def create(
      self,
      optimizer: str,
      num_moments: int,
      platform: str,
      treedef: jax.tree_util.PyTreeDef,
      layouts: Sequence[LeafLayout],
      devices: Sequence[jax.Device],
      mesh_layout: 'sharding.MeshLayout | None',
      *,
      paged: bool,
  ) -> StateBuffers:
    """Allocates zeroed buffers for ``layouts``, one entry per device.

    Paged buffers start in the host tier; ``paging.apply_budget`` moves them.
    A GPU state of a build whose kernels cannot run there (built without
    CUDA, or for other architectures) is refused with what is missing, as
    ``build_info()['gpu_missing']`` says it.
    """
    if platform == 'cuda':
      missing = ffi.gpu_missing(devices)
      if missing is not None:
        raise RuntimeError(missing)
    # Memory is asked for: what dropped states held goes back first, except
    # those whose step is still running (waiting here could block on a
    # computation that is waiting for this very call).
    self.free_orphans(wait=False)
    if platform == 'cpu':
      tier = 'cpu'
    else:
      tier = 'host' if paged else 'device (unpaged)'
    extension = ffi.extension()
    # All a compiled step reads from the record besides its state id.
    signature = (optimizer, platform, treedef, tuple(layouts), paged,
                 tuple(devices), mesh_layout)
    state_id = state_ids.STATE_IDS.take(signature)
    entries = []
    try:
      for device in devices:
        if mesh_layout is None:
          sizes = [layout.size for layout in layouts]
          offsets, position = [0] * len(layouts), 0
        else:
          sizes = [mesh_layout.state_size(i) for i in range(len(layouts))]
          offsets = mesh_layout.index_offsets(device)
          position = mesh_layout.position(device)
        entries.append(extension.create_state(
            _PLATFORM_CODES[platform],
            num_moments,
            sizes,
            [layout.code_bits if layout.quantized else 0
             for layout in layouts],
            [layout.decay for layout in layouts],
            [TIER_CODES[tier]] * len(layouts),
            offsets,
            [layout.correction_bits for layout in layouts],
            state_id,
            devices_lib.ordinal_of(device),
            position,
        ))
    except BaseException:
      for entry in entries:
        entry.release()
      state_ids.STATE_IDS.give_back(state_id)
      raise
    record = StateRecord(state_id, entries, devices, optimizer, platform,
                         treedef, layouts, paged=paged, layout=mesh_layout)
    return self._adopt(record)

  def lookup(self, state_id: int) -> StateBuffers:
    """The unique live StateBuffers for ``state_id`` (dead if released)."""
    if state_id == 0:
      return StateBuffers(0, None)
    buffers = self._live.get(state_id)
    if buffers is not None:
      return buffers
    orphan = self._orphans.pop(state_id, None)
    if orphan is not None and not orphan[0].released:
      return self._adopt(orphan[0])
    return StateBuffers(state_id, None)

  def release(self, buffers: StateBuffers) -> None:
    """Frees the buffers now; later updates with this state fail clearly."""
    if buffers._record is not None:
      buffers._record.release()
    self._live.pop(buffers.state_id, None)
    self._orphans.pop(buffers.state_id, None)

  def live_states(self) -> list[StateBuffers]:
    """Every state whose buffers are allocated and referred to."""
    return [b for b in list(self._live.values()) if not b._record.released]

  def total_bytes(self) -> int:
    """Bytes of optimizer state this process holds in the registry."""
    return int(ffi.extension().live_state_bytes())


REGISTRY = StateRegistry()


def fill_moments(
    record: StateRecord, values: Sequence[float], signed: Sequence[bool]
) -> None:
  """Sets every element of moment m of every leaf to ``values[m]``."""
  extension = ffi.extension()
  # Checked before any write, so that a refusal leaves every leaf as it was:
  # quantize_blockwise writes 8-bit codes, and no family with a non-zero
  # start offers 4-bit states today (one that does needs the 4-bit codec).
  if any(values) and any(entry.leaf_info(index)['code_bits'] == 4
                         for entry in record.entries
                         for index in range(len(record.leaves))):
    raise NotImplementedError(
        f'{record.optimizer}: a non-zero initial moment for 4-bit states')
  for entry in record.entries:
    for index in range(len(record.leaves)):
      info = entry.leaf_info(index)
      for moment, value in enumerate(values):
        if value == 0:
          continue  # buffers start zeroed
        full = np.full(int(info['size']), value, np.float32)
        if info['quantized']:
          codes, absmax = extension.quantize_blockwise(
              full, signed=signed[moment]
          )
          entry.write_moment(index, moment, codes, absmax.view(np.uint8))
        else:
          entry.write_moment(
              index, moment, full.view(np.uint8), np.zeros([0], np.uint8)
          )


def find_buffers(state: Any) -> list[StateBuffers]:
  """Every StateBuffers node inside an optimizer state (e.g. in a chain)."""
  return [
      node
      for node in jax.tree.leaves(
          state, is_leaf=lambda x: isinstance(x, StateBuffers)
      )
      if isinstance(node, StateBuffers)
  ]


def release(state: Any) -> None:
  """Frees the registry buffers of every optax_paged state in ``state``.

  The memory goes back at once (a dropped state's waits for the next
  allocation or garbage collection; ``free_orphans`` frees those). Steps
  already dispatched on the state finish first and keep their results; a
  call made from now on, on any thread, raises a ValueError naming the
  released state. The memory is never touched again.

  Args:
    state: an optimizer state, or any pytree containing one (a chain's state,
      a Flax TrainState).

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.adamw8bit(1e-3)
    >>> state = tx.init(params)
    >>> optax_paged.release(state)  # its 8704 bytes are free now
    >>> tx.update(params, state, params)
    Traceback (most recent call last):
    ...
    ValueError: optimizer state ...: this optimizer state was released ...
  """
  found = find_buffers(state)
  records = [b._record for b in found
             if b._record is not None and not b._record.released]
  for record in records:
    record.refuse_steps()
  try:
    jax.effects_barrier()
    _wait_quietly(jax.tree.leaves(state))
    for record in records:
      wait_for_devices(record)
  finally:
    for buffers in found:
      REGISTRY.release(buffers)


def free_orphans() -> int:
  """Frees now the buffers of every state that nothing refers to any more.

  A dropped state's buffers are kept for a short grace (Flax NNX drops and
  rebuilds its modules around ``nnx.jit``) and freed by the next allocation
  or garbage collection after it, once the step that made that state has
  finished; ``memory_report`` shows them as orphaned. This frees them
  without waiting for either: it waits for the work dispatched to their
  devices (a step still running on a dropped state finishes and keeps its
  results), then frees them.

  Returns:
    The bytes freed.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.adamw8bit(1e-3)
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> del state  # dropped after a step: an orphan until freed
    >>> optax_paged.free_orphans() >= 8704
    True
  """
  return REGISTRY.free_orphans()


def wait_for_pending(state: Any) -> None:
  """Waits until computations that may touch ``state``'s buffers are done."""
  jax.effects_barrier()
  jax.block_until_ready(state)


def wait_for_devices(record: StateRecord) -> None:
  """Waits for the work dispatched to the record's devices.

  For callers that hold the buffers but no array of the step that wrote
  them (Flax serializes a state's ``count`` and ``buffers`` apart; a dropped
  state has no arrays left): every step's outputs are live arrays until
  dropped, so waiting for all live arrays on these devices waits for every
  step still running there.
  """
  devices = set(record.devices)
  _wait_quietly([
      x for x in record.devices[0].client.live_arrays()
      if not x.is_deleted() and x.sharding.device_set & devices
  ])


def _wait_quietly(arrays: Sequence[Any]) -> None:
  """Waits for the computation of each array; a failed one has finished."""
  for x in arrays:
    if (isinstance(x, jax.Array) and not base.is_tracer(x)
        and not x.is_deleted() and not x.is_ready()):
      # Its error is for whoever reads the array.
      with contextlib.suppress(Exception):
        x.block_until_ready()


def note_count(buffers: Any, count: Any) -> None:
  """Remembers ``count``, a concrete count of a state on ``buffers``.

  A state built outside a trace with an array count is, but for init and
  loads, the output of the step that made it: while that count is not
  ready, the step may still run, and a dropped state must keep its buffers
  for it (``StateRecord.busy``).
  """
  record = getattr(buffers, '_record', None)
  if (record is not None and isinstance(count, jax.Array)
      and not base.is_tracer(count)):
    record.last_count = count
