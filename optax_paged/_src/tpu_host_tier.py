"""The TPU path's host tier: a leaf's state in ``pinned_host`` memory.

A leaf past the device budget keeps its state arrays in ``pinned_host``
memory. The step copies them to the device, runs the leaf's kernel and
copies them back, so the device holds one leaf's state at a time.

libtpu (0.0.42.1) tiles an array narrower than 32 bits differently in host
memory than in HBM (uint8: (8, 128) tiles against (32, 128)) and refuses to
compile a copy between the two ("Source and destination buffers in CopyDone
arguments need to be the same shape"). On the host such an array (the
codes, a master's correction) is therefore kept as each shard's elements in
one row: shape ``(*shard_grid, shard_size)``, or ``(size,)`` unsharded,
which both memories tile alike. After the copy in, each shard is reshaped
to its layout on the device (a relayout in HBM, small beside the link's
traffic); before the copy out, back. Arrays of 32 bits keep their layout.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_paged._src import tpu_state
from optax_paged._src.tpu_state import TpuLeafState

HOST = 'pinned_host'


def is_narrow(x: Any) -> bool:
  """Whether ``x`` is kept one row a shard on the host."""
  return np.dtype(x.dtype).itemsize < 4


def _spec(ls: TpuLeafState) -> tuple[Any, ...] | None:
  """The device layout's PartitionSpec entries of the leaf's narrow arrays
  (the parameter's), or None where they are not split."""
  sharding = ls.sharding
  if sharding is None or sharding.is_fully_replicated:
    return None
  ndim = len(ls.shape)
  return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def grid(ls: TpuLeafState) -> tuple[int, ...]:
  """Shards along each dimension of the leaf's narrow arrays (``()`` where
  they are not split)."""
  spec = _spec(ls)
  if spec is None:
    return ()
  mesh_shape = ls.sharding.mesh.shape
  return tuple(
      math.prod(mesh_shape[n] for n in (e if isinstance(e, tuple) else (e,))
                if n is not None)
      for e in spec)


def _narrow_shape(ls: TpuLeafState, part: str) -> tuple[int, ...]:
  """The device shape of the leaf's narrow arrays in ``part`` (its
  ``'moments'`` or its ``'master'``): the codes' (4-bit: packed) or the
  correction's (a quantized leaf's element layout, else the leaf's own)."""
  if not ls.quantized:
    return ls.shape
  if part == 'moments':
    return tpu_state.moment_shapes(ls.shape, ls.code_bits)[0]
  return tpu_state.element_shape(ls.shape)


def _host_sharding(x: Any, ls: TpuLeafState) -> Any:
  spec = _spec(ls)
  if spec is not None and is_narrow(x):
    sharding = NamedSharding(ls.sharding.mesh, P(*spec, None))
  elif ls.sharding is not None and is_narrow(x):
    sharding = NamedSharding(ls.sharding.mesh, P())
  else:
    sharding = x.sharding
  return sharding.with_memory_kind(HOST)


def _per_shard(ls: TpuLeafState, fn, x: jax.Array, to_host: bool
               ) -> jax.Array:
  spec = P(*_spec(ls))
  host = P(*_spec(ls), None)
  return jax.shard_map(
      fn, mesh=ls.sharding.mesh,
      in_specs=spec if to_host else host,
      out_specs=host if to_host else spec, check_vma=False)(x)


def _rows(ls: TpuLeafState, x: Any, part: str) -> Any:
  """A narrow device-layout array as its host layout (still where it is)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    shape = _narrow_shape(ls, part)
    g = grid(ls)
    host_shape = (g + (math.prod(shape) // math.prod(g),) if g
                  else (math.prod(shape),))
    return jax.ShapeDtypeStruct(host_shape, x.dtype,
                                sharding=_host_sharding(x, ls))
  if not grid(ls):
    return x.reshape(-1)
  return _per_shard(ls, lambda a: a.reshape((1,) * a.ndim + (-1,)), x,
                    to_host=True)


def _unrows(ls: TpuLeafState, x: jax.Array, part: str) -> jax.Array:
  """A narrow array in its host layout, on the device, as the kernel's."""
  shape = _narrow_shape(ls, part)
  g = grid(ls)
  if not g:
    return x.reshape(shape)
  local = tuple(s // n for s, n in zip(shape, g, strict=True))
  return _per_shard(ls, lambda a: a.reshape(local), x, to_host=False)


def to_host(ls: TpuLeafState) -> TpuLeafState:
  """The leaf's state moved to host memory (``tier='host'``); abstract
  arrays (an ahead-of-time init) become their host shapes."""
  def move(x, part):
    if is_narrow(x):
      x = _rows(ls, x, part)
    if isinstance(x, jax.ShapeDtypeStruct):
      if not is_narrow(x):
        x = jax.ShapeDtypeStruct(x.shape, x.dtype,
                                 sharding=_host_sharding(x, ls))
      return x
    return jax.device_put(x, jax.memory.Space.Host)

  return ls.replace(moments=jax.tree.map(lambda x: move(x, 'moments'),
                                         ls.moments),
                    master=jax.tree.map(lambda x: move(x, 'master'),
                                        ls.master), tier='host')


def to_device(ls: TpuLeafState) -> TpuLeafState:
  """A host leaf's state copied to the device in the kernel's layout
  (``tier='device'``), for one step."""
  def move(x, part):
    x = jax.device_put(x, jax.memory.Space.Device)
    return _unrows(ls, x, part) if is_narrow(x) else x

  return ls.replace(moments=jax.tree.map(lambda x: move(x, 'moments'),
                                         ls.moments),
                    master=jax.tree.map(lambda x: move(x, 'master'),
                                        ls.master), tier='device')


def in_device_layout(ls: TpuLeafState) -> TpuLeafState:
  """The leaf's state as NumPy arrays in the device layout (a host leaf's
  narrow arrays reassembled from their rows), for a checkpoint."""
  if ls.tier != 'host':
    return ls
  g = grid(ls)

  def assemble(x, part):
    shape = _narrow_shape(ls, part)
    a = np.asarray(x)
    if not is_narrow(a):
      return a
    if not g:
      return a.reshape(shape)
    local = tuple(s // n for s, n in zip(shape, g, strict=True))
    a = a.reshape(g + local)
    order = [i for d in range(len(g)) for i in (d, len(g) + d)]
    return a.transpose(order).reshape(shape)

  return ls.replace(moments=jax.tree.map(lambda x: assemble(x, 'moments'),
                                         ls.moments),
                    master=jax.tree.map(lambda x: assemble(x, 'master'),
                                        ls.master))


def as_stored(ls: TpuLeafState, a: np.ndarray) -> np.ndarray:
  """A NumPy array of the device layout as ``ls``'s tier stores it
  (``in_device_layout`` back), for a restore."""
  if ls.tier != 'host' or not is_narrow(a):
    return a
  g = grid(ls)
  if not g:
    return a.reshape(-1)
  local = tuple(s // n for s, n in zip(a.shape, g, strict=True))
  interleaved = tuple(v for pair in zip(g, local, strict=True) for v in pair)
  order = list(range(0, 2 * len(g), 2)) + list(range(1, 2 * len(g), 2))
  return a.reshape(interleaved).transpose(order).reshape(
      g + (math.prod(local),))
