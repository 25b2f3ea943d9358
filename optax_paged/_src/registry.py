"""The state registry: who owns the optimizer state buffers.

An optimizer state (an optax ``NamedTuple``) holds a :class:`StateBuffers`
node: a pytree with no leaves whose static key names an entry of the C++
registry, where the quantized moments live. Keeping the buffers out of the
pytree is what lets one FFI call update them in place inside ``jax.jit``
without copying them through XLA.

Lifetime: the ``StateBuffers`` object for a key is unique while any state
refers to it; when the last one is garbage collected, the buffers are freed.
``release`` frees them at once. JAX caches hold only the integer key, never
the buffers.
"""

import dataclasses
import gc
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import ffi

_PLATFORM_CODES = {'cpu': 0, 'cuda': 1}
# Names as ffi/state_memory.cc's TierName gives them.
TIER_CODES = {'cpu': 0, 'device': 1, 'host': 2, 'device (unpaged)': 3}


@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """What the registry holds for one parameter leaf."""

  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  quantized: bool
  decay: bool

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class DtypeGroup:
  """Leaves updated by one FFI call: same parameter dtype."""

  dtype: np.dtype
  indices: tuple[int, ...]


class StateRecord:
  """A registry entry: the C++ buffers plus the layout they were made for."""

  def __init__(
      self,
      entry: Any,
      optimizer: str,
      platform: str,
      treedef: jax.tree_util.PyTreeDef,
      leaves: Sequence[LeafLayout],
      paged: bool,
  ):
    self.entry = entry
    self.optimizer = optimizer
    self.platform = platform
    self.paged = paged
    self.treedef = treedef
    self.leaves = tuple(leaves)
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, leaf in enumerate(self.leaves):
      by_dtype.setdefault(leaf.dtype, []).append(i)
    self.groups = tuple(
        DtypeGroup(dtype, tuple(indices)) for dtype, indices in by_dtype.items()
    )

  @property
  def key(self) -> int:
    return int(self.entry.id)

  @property
  def released(self) -> bool:
    return bool(self.entry.released)

  def check_tree(self, name: str, kind: str, tree: Any) -> list[Any]:
    """Leaves of ``tree`` if they match this layout; else a ValueError."""
    leaves, treedef = jax.tree.flatten(tree)
    # Containers may differ (Flax NNX initialises with Param-wrapped leaves
    # and updates with plain arrays); the leaves must correspond one to one,
    # which the count here and the shapes below check.
    if len(leaves) != len(self.leaves):
      raise ValueError(
          f'{name}: {kind} tree {treedef} does not match the parameter tree '
          f'the state was initialised with, {self.treedef}.'
      )
    for leaf, layout in zip(leaves, self.leaves, strict=True):
      shape = tuple(np.shape(leaf))
      if shape != layout.shape:
        raise ValueError(
            f'{name}: {kind} at {layout.path} has shape {shape}; the state '
            f'was initialised for shape {layout.shape}.'
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
    key: the registry key; 0 for a state made under a JAX transformation,
      which owns no buffers.
  """

  __slots__ = ('key', '_record', '__weakref__')

  def __init__(self, key: int, record: StateRecord | None):
    self.key = key
    self._record = record

  def tree_flatten(self):
    return (), self.key

  @classmethod
  def tree_unflatten(cls, key, children):
    del children
    return REGISTRY.lookup(key)

  def __repr__(self) -> str:
    if self.key == 0:
      return 'StateBuffers(abstract)'
    if self._record is None or self._record.released:
      return f'StateBuffers(key={self.key}, released)'
    return (
        f'StateBuffers(key={self.key}, {self._record.optimizer}, '
        f'{len(self._record.leaves)} leaves, '
        f'{self._record.entry.total_bytes} bytes)'
    )

  def __reduce__(self):
    raise TypeError(
        'StateBuffers cannot be copied or pickled on their own: copy or '
        'pickle the optimizer state that holds them (copy.deepcopy(opt_state) '
        'makes an independent copy), or export it with optax_paged.state_dict.'
    )

  @property
  def is_abstract(self) -> bool:
    return self.key == 0

  def record(self) -> StateRecord:
    """The live record, or a clear error for abstract and released states."""
    if self.key == 0:
      raise ValueError(base.ABSTRACT_STATE_MSG)
    if self._record is None or self._record.released:
      raise ValueError(base.RELEASED_STATE_MSG)
    return self._record


def _dtype_of(x: Any) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, 'dtype') else np.asarray(x).dtype


def _platform_of(leaves: Sequence[Any]) -> str:
  for leaf in leaves:
    if isinstance(leaf, jax.Array):
      platform = next(iter(leaf.devices())).platform
      return 'cuda' if platform == 'gpu' else platform
  platform = jax.default_backend()
  return 'cuda' if platform == 'gpu' else platform


class StateRegistry:
  """Owns every optimizer state's buffers in this process.

  A state's buffers live while some ``StateBuffers`` object refers to them.
  When the last one is collected the record becomes an orphan: a later
  lookup of its key (a pytree rebuilt from a treedef, as Flax NNX does when
  it swaps a module's state) revives it, and the next full garbage
  collection (``gc.collect()``) frees it.
  """

  def __init__(self):
    self._live: weakref.WeakValueDictionary[int, StateBuffers] = (
        weakref.WeakValueDictionary()
    )
    self._orphans: dict[int, StateRecord] = {}
    gc.callbacks.append(self._on_gc)

  def _adopt(self, record: StateRecord) -> StateBuffers:
    buffers = StateBuffers(record.key, record)
    self._live[record.key] = buffers
    weakref.finalize(buffers, self._orphan, record)
    return buffers

  def _orphan(self, record: StateRecord) -> None:
    if not record.released:
      self._orphans[record.key] = record

  def _on_gc(self, phase: str, info: dict[str, int]) -> None:
    # Frees the records orphaned before this full collection began.
    if phase == 'start' and info.get('generation') == 2 and self._orphans:
      orphans, self._orphans = self._orphans, {}
      for record in orphans.values():
        record.entry.release()

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
  ) -> StateBuffers:
    """Allocates zeroed state for ``params``; abstract under tracing.

    On a GPU, paged state starts in the host tier and moves to the device as
    far as ``device_budget`` allows; unpaged state is plain device memory.
    """
    leaves, treedef = jax.tree.flatten(params)
    if any(base.is_tracer(leaf) for leaf in leaves):
      return StateBuffers(0, None)
    paths = [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    layouts = []
    for path, leaf, q, d in zip(paths, leaves, quantized, decay, strict=True):
      dtype = _dtype_of(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f'{optimizer}: parameter {path or "<root>"} has dtype {dtype}; '
            'optax_paged optimizes floating-point parameters only.'
        )
      layouts.append(
          LeafLayout(path, tuple(np.shape(leaf)), dtype, bool(q), bool(d))
      )
    for path, leaf in zip(paths, leaves, strict=True):
      if isinstance(leaf, jax.Array) and len(leaf.devices()) > 1:
        raise NotImplementedError(
            f'{optimizer}: parameter {path or "<root>"} is spread over '
            f'{len(leaf.devices())} devices. optax_paged does not update '
            'sharded parameters yet (each device would need its own state); '
            'use one device per process, or the functional '
            'optax_paged.reference optimizers, which shard like any optax '
            'state.'
        )
    platform = _platform_of(leaves)
    if platform not in _PLATFORM_CODES:
      raise ValueError(
          f'{optimizer}: parameters live on platform {platform!r}; '
          'optax_paged supports cpu and cuda.'
      )
    return self.create(optimizer, num_moments, platform, treedef, layouts,
                       paged=paged and platform == 'cuda',
                       device_budget=device_budget)

  def create(
      self,
      optimizer: str,
      num_moments: int,
      platform: str,
      treedef: jax.tree_util.PyTreeDef,
      layouts: Sequence[LeafLayout],
      *,
      paged: bool,
      device_budget: Any = None,
  ) -> StateBuffers:
    """Allocates zeroed buffers for ``layouts`` on ``platform``."""
    if platform == 'cpu':
      tier = 'cpu'
    else:
      tier = 'host' if paged else 'device (unpaged)'
    entry = ffi.extension().create_state(
        _PLATFORM_CODES[platform],
        num_moments,
        [layout.size for layout in layouts],
        [layout.quantized for layout in layouts],
        [layout.decay for layout in layouts],
        [TIER_CODES[tier]] * len(layouts),
    )
    record = StateRecord(entry, optimizer, platform, treedef, layouts,
                         paged=paged)
    if record.paged:
      from optax_paged._src import paging  # paging builds on the registry
      paging.apply_budget(record, device_budget)
    return self._adopt(record)

  def lookup(self, key: int) -> StateBuffers:
    """The unique live StateBuffers for ``key`` (a dead one if released)."""
    if key == 0:
      return StateBuffers(0, None)
    buffers = self._live.get(key)
    if buffers is not None:
      return buffers
    record = self._orphans.pop(key, None)
    if record is not None and not record.released:
      return self._adopt(record)
    return StateBuffers(key, None)

  def release(self, buffers: StateBuffers) -> None:
    """Frees the buffers now; later updates with this state fail clearly."""
    if buffers._record is not None:
      buffers._record.entry.release()
    self._live.pop(buffers.key, None)
    self._orphans.pop(buffers.key, None)

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
  for index, layout in enumerate(record.leaves):
    for moment, value in enumerate(values):
      if value == 0:
        continue  # buffers start zeroed
      full = np.full(layout.size, value, np.float32)
      if layout.quantized:
        codes, absmax = extension.quantize_blockwise(
            full, signed=signed[moment]
        )
        record.entry.write_moment(index, moment, codes, absmax.view(np.uint8))
      else:
        record.entry.write_moment(
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

  Waits for pending computations first. Updating a released state raises a
  ValueError (or, from an already compiled step, an error naming the released
  state); the memory is never touched again.

  Args:
    state: an optimizer state, or any pytree containing one (a chain's state,
      a Flax TrainState).
  """
  wait_for_pending(state)
  for buffers in find_buffers(state):
    REGISTRY.release(buffers)


def wait_for_pending(state: Any) -> None:
  """Waits until computations that may touch ``state``'s buffers are done."""
  jax.effects_barrier()
  jax.block_until_ready(state)
