"""How a state spread over a device mesh is laid out.

Parameters on a mesh (any ``NamedSharding``, replicated included) get one
registry entry per addressable device, holding the state of that device's
shard of every leaf. Quantization blocks are local to a shard, so a leaf
split into contiguous, 256-aligned ranges of its row-major flattening (e.g.
``P('data', None)`` on a (1024, 64) leaf) gives the one-device result bit for
bit; other splits give what running each shard as a leaf of its own gives.

With ``zero_axis`` (ZeRO-1), the state of a leaf that is not split over that
axis is split instead: the flattened shard is cut into equal 256-aligned
chunks, one per position along the axis, each device updates its chunk and
the results are gathered. Chunks are whole quantization blocks, so this
equals the unsplit update bit for bit.
"""

import dataclasses
import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_paged._src import base

PMAP_MSG = (
    'optax_paged optimizers cannot run inside jax.pmap (tx.init, tx.update '
    'and apply_gradients alike): the state lives in per-device registry '
    'entries that pmap\'s replicated copies cannot address. Put the '
    'parameters on a jax.sharding.Mesh (NamedSharding) and use jax.jit, or '
    'jax.shard_map over that mesh; tx.init(params) outside them then makes '
    'one entry per device.'
)


# The module whose frames trace a pmapped function.
_PMAP_MODULE = jax.pmap.__module__


def inside_pmap() -> bool:
  """Whether this is being traced by ``jax.pmap``.

  pmap is a ``shard_map`` over a mesh of its own (jax >= 0.10) whose axis is
  named by pmap's ``axis_name``: the manual axes alone do not tell it from a
  user's ``shard_map``, but pmap's frames on the stack do.
  """
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return False
  frame = inspect.currentframe()
  while frame is not None:
    if frame.f_globals.get('__name__') == _PMAP_MODULE:
      return True
    frame = frame.f_back
  return False


def refuse_pmap() -> None:
  """Raises PMAP_MSG under ``jax.pmap``, before anything is traced or made."""
  if inside_pmap():
    raise ValueError(PMAP_MSG)


def axes_of(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def spec_entry(axes: tuple[str, ...]) -> Any:
  """The PartitionSpec entry for a dimension split over ``axes``."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def normalized_spec(spec: P, ndim: int) -> tuple[tuple[str, ...], ...]:
  """The mesh axes each dimension is split over, one tuple per dimension."""
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return tuple(axes_of(e) for e in entries)


@dataclasses.dataclass(frozen=True)
class MeshLayout:
  """Where every leaf's state lives on a mesh.

  Attributes:
    mesh: the parameters' mesh (the same for every leaf).
    dims: per leaf, the mesh axes each dimension is split over.
    local_shapes: per leaf, the shape of one device's parameter shard.
    zero_axis: the axis ZeRO-1 splits the state over, or None.
    chunks: per leaf, the ZeRO-1 chunk length (0 for a leaf whose state
      follows its parameter's sharding).
  """

  mesh: jax.sharding.Mesh
  dims: tuple[tuple[tuple[str, ...], ...], ...]
  local_shapes: tuple[tuple[int, ...], ...]
  zero_axis: str | None
  chunks: tuple[int, ...]

  def spec(self, i: int, without: Sequence[str] = ()) -> P:
    """Leaf i's parameter spec, less the axes in ``without``."""
    return P(*[spec_entry(tuple(a for a in axes if a not in without))
               for axes in self.dims[i]])

  def local_size(self, i: int) -> int:
    return math.prod(self.local_shapes[i])

  def state_size(self, i: int) -> int:
    """Elements of leaf i's state on one device."""
    return self.chunks[i] or self.local_size(i)

  @property
  def axis_sizes(self) -> dict[str, int]:
    return dict(zip(self.mesh.axis_names, self.mesh.devices.shape,
                    strict=True))

  def local_devices(self) -> list[jax.Device]:
    """This process's devices of the mesh, in mesh order."""
    me = jax.process_index()
    return [d for d in self.mesh.devices.flat if d.process_index == me]

  @functools.cached_property
  def _coords(self) -> dict[jax.Device, dict[str, int]]:
    out = {}
    for index in np.ndindex(self.mesh.devices.shape):
      out[self.mesh.devices[index]] = dict(
          zip(self.mesh.axis_names, index, strict=True))
    return out

  def position(self, device: jax.Device) -> int:
    """The device's linear (row-major) position in the mesh."""
    coords = self._coords[device]
    position = 0
    for name in self.mesh.axis_names:
      position = position * self.axis_sizes[name] + coords[name]
    return position

  def index_offsets(self, device: jax.Device) -> list[int]:
    """Per leaf, the index of the device's first state element in the leaf.

    Stochastic rounding draws its bits by this index plus the local one:
    every replica of a shard draws the same bits, and a contiguous row split
    draws exactly the one-device bits.
    """
    return [self.shard_index(device, i) * self.local_size(i)
            + self.chunk_start(device, i) for i in range(len(self.dims))]

  def shard_index(self, device: jax.Device, i: int) -> int:
    """Which shard of leaf i the device holds (replicas share one)."""
    coords = self._coords[device]
    shard = 0
    for axes in self.dims[i]:
      for name in axes:
        shard = shard * self.axis_sizes[name] + coords[name]
    return shard

  def chunk_start(self, device: jax.Device, i: int) -> int:
    """Where the device's ZeRO-1 chunk starts in its (flattened, zero-padded)
    shard of leaf i; 0 for a leaf without chunks."""
    if not self.chunks[i]:
      return 0
    return self._coords[device][self.zero_axis] * self.chunks[i]

  def local_shape_in(self, i: int, manual: Sequence[str]) -> tuple[int, ...]:
    """Leaf i's shape where the axes in ``manual`` are already split."""
    global_shape = tuple(
        n * math.prod(self.axis_sizes[a] for a in axes)
        for n, axes in zip(self.local_shapes[i], self.dims[i], strict=True)
    )
    return tuple(
        n // math.prod(self.axis_sizes[a] for a in axes if a in manual)
        for n, axes in zip(global_shape, self.dims[i], strict=True)
    )


def _is_multi_device(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and (
      len(leaf.sharding.device_set) > 1
      or (isinstance(leaf.sharding, NamedSharding)
          and leaf.sharding.mesh.size > 1)
  )


def mesh_layout_of(
    optimizer: str, leaves: Sequence[Any], paths: Sequence[str],
    zero_axis: str | None,
) -> MeshLayout | None:
  """The mesh layout of ``leaves``, or None when they live on one device.

  Raises:
    ValueError: for leaves on several meshes, a sharding that is not a
      ``NamedSharding``, a mesh leaf beside one that is not on it, or a
      ``zero_axis`` the mesh does not have.
  """
  on_mesh = all(
      isinstance(getattr(leaf, 'sharding', None), NamedSharding)
      for leaf in leaves)
  # A one-device mesh is a plain device, unless ZeRO-1 names one of its axes.
  if not any(_is_multi_device(leaf) for leaf in leaves) and not (
      zero_axis is not None and on_mesh):
    if zero_axis is not None:
      raise ValueError(
          f'{optimizer}: shard_state_over({zero_axis!r}) needs parameters '
          'on a mesh (NamedSharding); these live on one device.'
      )
    return None
  mesh = None
  dims, local_shapes = [], []
  for path, leaf in zip(paths, leaves, strict=True):
    where = path or '<root>'
    sharding = getattr(leaf, 'sharding', None)
    if not isinstance(sharding, NamedSharding):
      raise ValueError(
          f'{optimizer}: parameter {where} is not on a mesh '
          f'(sharding {sharding!r}) while others are. Put every parameter '
          'on the same jax.sharding.Mesh with a NamedSharding (replicated '
          'ones with PartitionSpec()).'
      )
    if mesh is None:
      mesh = sharding.mesh
    elif sharding.mesh != mesh:
      raise ValueError(
          f'{optimizer}: parameter {where} is on mesh {sharding.mesh}, '
          f'others on {mesh}; optax_paged needs one mesh for the whole tree.'
      )
    dims.append(normalized_spec(sharding.spec, leaf.ndim))
    local_shapes.append(tuple(sharding.shard_shape(leaf.shape)))
  if zero_axis is not None and zero_axis not in mesh.axis_names:
    raise ValueError(
        f'{optimizer}: shard_state_over({zero_axis!r}): the mesh has axes '
        f'{mesh.axis_names}.'
    )
  chunks = []
  for d, shape in zip(dims, local_shapes, strict=True):
    split = zero_axis is not None and all(zero_axis not in a for a in d)
    if split:
      n = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))[
          zero_axis]
      per_device = -(-math.prod(shape) // n)
      chunks.append(-(-per_device // base.BLOCK_SIZE) * base.BLOCK_SIZE)
    else:
      chunks.append(0)
  return MeshLayout(mesh, tuple(dims), tuple(local_shapes), zero_axis,
                    tuple(chunks))
