"""``state_dict`` of a state spread over a mesh: global ``jax.Array``s.

Each moment of each leaf becomes global arrays assembled from the devices'
own buffers (``jax.make_array_from_single_device_arrays``), so Orbax saves
and restores them from every process and no process needs the whole state:

- codes (or fp32 values) with the parameter's shape and sharding;
- absmax as ``(*shard_grid, blocks_per_shard)``, each device holding its
  shard's blocks;
- a ZeRO-1 leaf's codes, absmax or values as ``(*shard_grid, chunks)``,
  split over the ZeRO axis as well.

A CRC32 per device (an array with one element per mesh position) covers the
device's own buffers. Restoring needs the same mesh shape and the same
layout: quantization blocks are local to a shard, and re-blocking for
another mesh would re-quantize (lossy), so another mesh is refused.
"""

import math
import zlib
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_paged._src import base
from optax_paged._src import ffi
from optax_paged._src import master_weights
from optax_paged._src import registry
from optax_paged._src import sharding


def _grid(layout: sharding.MeshLayout, i: int) -> tuple[int, ...]:
  sizes = layout.axis_sizes
  return tuple(math.prod(sizes[a] for a in axes) for axes in layout.dims[i])


def _array_specs(layout: sharding.MeshLayout, i: int, quantized: bool,
                 code_bits: int = 8
                 ) -> dict[str, tuple[tuple[int, ...], P, tuple[int, ...]]]:
  """name -> (global shape, spec, local shape) of leaf i's saved arrays."""
  grid = _grid(layout, i)
  dims = list(layout.spec(i))
  ones = (1,) * len(grid)
  size = layout.state_size(i)
  blocks = -(-size // base.block_size(code_bits))
  if layout.chunks[i]:
    n = layout.axis_sizes[layout.zero_axis]
    spec = P(*dims, layout.zero_axis)
    shapes = ({'codes': base.code_bytes(size, code_bits), 'absmax': blocks}
              if quantized else {'values': size})
    return {name: ((*grid, n * k), spec, (*ones, k))
            for name, k in shapes.items()}
  global_shape = tuple(g * n for g, n in zip(grid, layout.local_shapes[i],
                                             strict=True))
  data = (global_shape, P(*dims), layout.local_shapes[i])
  if not quantized:
    return {'values': data}
  specs = {'absmax': ((*grid, blocks), P(*dims, None), (*ones, blocks))}
  if code_bits == 4:
    # Two codes a byte: a shard's codes are a row of bytes, not
    # parameter-shaped.
    k = base.code_bytes(size, code_bits)
    specs['codes'] = ((*grid, k), P(*dims, None), (*ones, k))
  else:
    specs['codes'] = data
  return specs


def _master_specs(layout: sharding.MeshLayout, i: int
                  ) -> dict[str, tuple[tuple[int, ...], P, tuple[int, ...]]]:
  """name -> (global shape, spec, local shape) of leaf i's master weights:
  the correction laid out as fp32 values are, the fingerprints (with the
  reset count) as absmax are."""
  correction = _array_specs(layout, i, False)['values']
  blocks = -(-layout.state_size(i) // master_weights.BLOCK_SIZE) + 1
  grid = _grid(layout, i)
  dims = list(layout.spec(i))
  ones = (1,) * len(grid)
  if layout.chunks[i]:
    n = layout.axis_sizes[layout.zero_axis]
    fingerprints = ((*grid, n * blocks), P(*dims, layout.zero_axis),
                    (*ones, blocks))
  else:
    fingerprints = ((*grid, blocks), P(*dims, None), (*ones, blocks))
  return {'correction': correction, 'fingerprints': fingerprints}


def _global(layout: sharding.MeshLayout, spec, local: list[jax.Array]
            ) -> jax.Array:
  return jax.make_array_from_single_device_arrays(
      spec[0], NamedSharding(layout.mesh, spec[1]), local)


def _position_array(layout: sharding.MeshLayout,
                    values: dict[jax.Device, np.ndarray], dtype) -> jax.Array:
  """An array of one value per mesh position, each device holding its own."""
  mesh = layout.mesh
  spec = NamedSharding(mesh, P(*mesh.axis_names))
  ones = (1,) * len(mesh.axis_names)
  arrays = [jax.device_put(np.asarray(values[d], dtype).reshape(ones), d)
            for d in layout.local_devices()]
  return jax.make_array_from_single_device_arrays(
      mesh.devices.shape, spec, arrays)


def export(record: registry.StateRecord, read: list[Any],
           count: bytes, masters: list[Any]) -> dict[str, Any]:
  """The per-leaf arrays and per-device checksums of a sharded record.

  Args:
    record: the state's record.
    read: its moments as ``record.read_state`` read them (all devices
      at once, so that no step lands between two devices' reads).
    count: the step count's bytes, which every device's checksum covers.
    masters: its master weights, read with the moments.
  """
  layout = record.layout
  crcs = {device: 0 for device in record.devices}
  leaves = []
  for i, leaf_layout in enumerate(record.leaves):
    specs = _array_specs(layout, i, leaf_layout.quantized,
                         leaf_layout.code_bits)
    moments = []
    for m in range(record.num_moments):
      local: dict[str, list[jax.Array]] = {name: [] for name in specs}
      for e, device in enumerate(record.devices):
        data, absmax = read[e][i][m]
        parts = {'codes' if leaf_layout.quantized else 'values': data}
        if leaf_layout.quantized:
          parts['absmax'] = absmax
        for name in sorted(parts):
          crcs[device] = zlib.crc32(parts[name].tobytes(), crcs[device])
        for name, array in parts.items():
          local[name].append(jax.device_put(
              array.reshape(specs[name][2]), device))
      moments.append({
          name: jax.make_array_from_single_device_arrays(
              specs[name][0], NamedSharding(layout.mesh, specs[name][1]),
              local[name])
          for name in specs
      })
    leaf = {
        'shape': np.asarray(leaf_layout.shape, dtype=np.int64),
        'quantized': np.asarray(leaf_layout.quantized),
        'moments': moments,
    }
    if leaf_layout.correction_bits:
      master_specs = _master_specs(layout, i)
      local = {name: [] for name in master_specs}
      for e, device in enumerate(record.devices):
        parts = dict(zip(('correction', 'fingerprints'), masters[e][i],
                         strict=True))
        for name in sorted(parts):
          crcs[device] = zlib.crc32(parts[name].tobytes(), crcs[device])
          local[name].append(jax.device_put(
              parts[name].reshape(master_specs[name][2]), device))
      leaf['master'] = {name: _global(layout, spec, local[name])
                        for name, spec in master_specs.items()}
    leaves.append(leaf)
  crcs = {device: zlib.crc32(count, crc) for device, crc in crcs.items()}
  return {
      'mesh_shape': np.asarray(layout.mesh.devices.shape, np.int64),
      'zero_chunks': np.asarray(layout.chunks, np.int64),
      'device_checksums': _position_array(
          layout, {d: np.uint32(c) for d, c in crcs.items()}, np.uint32),
      'leaves': leaves,
  }


def _local(array: Any, device: jax.Device, sharding_: NamedSharding,
           shape: tuple[int, ...]) -> np.ndarray:
  """The region of a restored array that ``device`` holds under
  ``sharding_`` (the state's layout), flattened.

  The region, not whatever block the array happens to keep on that device:
  an array saved with another layout keeps another region there.
  """
  index = sharding_.devices_indices_map(shape)[device]
  region = tuple((s.start, s.stop) for s in
                 (slice(*i.indices(n)[:2]) for i, n in zip(index, shape,
                                                           strict=True)))
  if isinstance(array, jax.Array):
    for shard in array.addressable_shards:
      held = tuple((s.start, s.stop) for s in (
          slice(*i.indices(n)[:2]) for i, n in zip(shard.index, shape,
                                                   strict=True)))
      if shard.device == device and held == region:
        return np.asarray(shard.data).reshape(-1)
    if not array.is_fully_addressable:
      raise ValueError(
          f'the checkpoint array for {device} does not hold the region the '
          'state keeps there; restore with a target from '
          'state_dict(tx.init(params)) with the parameters sharded as saved.'
      )
  return np.asarray(array)[index].reshape(-1)


def check(record: registry.StateRecord, saved: dict[str, Any], count: bytes,
          refuse) -> list[tuple[int, int, int, dict[str, np.ndarray]]]:
  """Validates a saved sharded state; returns the writes it implies.

  Args:
    record: the state to restore into.
    saved: the state dictionary.
    count: the saved step count's bytes, covered by every device checksum.
    refuse: makes the ValueError of a refusal from a message.

  Returns:
    ``(entry index, leaf, moment, {name: flat array})`` for every write,
    computed and checked (shapes, checksums) before anything is written.
  """
  layout = record.layout
  for key in ('mesh_shape', 'zero_chunks', 'device_checksums'):
    if key not in saved:
      raise refuse(
          f'the state lives on a mesh but the checkpoint has no {key!r}: it '
          'was saved from a state on one device.'
      )
  mesh_shape = tuple(np.asarray(saved['mesh_shape']).tolist())
  if mesh_shape != tuple(layout.mesh.devices.shape):
    raise refuse(
        f'checkpoint saved on a mesh of shape {mesh_shape}, the state is on '
        f'{tuple(layout.mesh.devices.shape)}. 8-bit states are blocked per '
        'shard, so moving them to another mesh would re-quantize them; '
        'restore on the same mesh.'
    )
  if tuple(np.asarray(saved['zero_chunks']).tolist()) != layout.chunks:
    raise refuse('checkpoint ZeRO-1 layout differs from the state\'s.')
  mesh_axes = NamedSharding(layout.mesh, P(*layout.mesh.axis_names))
  writes = []
  crcs = {device: 0 for device in record.devices}
  for i, leaf_layout in enumerate(record.leaves):
    specs = _array_specs(layout, i, leaf_layout.quantized,
                         leaf_layout.code_bits)
    leaf = saved['leaves'][i]
    for m, moment in enumerate(leaf['moments']):
      if set(moment) != set(specs):
        raise refuse(f'leaf {leaf_layout.path} moment {m}: wrong arrays.')
      for name, (shape, _, _) in specs.items():
        if tuple(np.shape(moment[name])) != shape:
          raise refuse(
              f'leaf {leaf_layout.path} moment {m} {name}: expected shape '
              f'{shape}, got {tuple(np.shape(moment[name]))}.'
          )
      for e, device in enumerate(record.devices):
        parts = {}
        for name, (shape, spec, _) in specs.items():
          dtype = np.uint8 if name == 'codes' else np.float32
          parts[name] = np.ascontiguousarray(_local(
              moment[name], device, NamedSharding(layout.mesh, spec), shape
          )).astype(dtype, copy=False)
        for name in sorted(parts):
          crcs[device] = zlib.crc32(parts[name].tobytes(), crcs[device])
        writes.append((e, i, m, parts))
    writes += _check_master(record, i, leaf, crcs, refuse)
  for device in record.devices:
    stored = _local(saved['device_checksums'], device, mesh_axes,
                    tuple(layout.mesh.devices.shape))
    if int(stored[0]) != zlib.crc32(count, crcs[device]):
      raise refuse(
          f'checksum mismatch on {device}: the checkpoint is corrupted, or '
          'was saved with the parameters sharded differently (another '
          'PartitionSpec on the same mesh), whose quantization blocks are '
          'other shards.')
  return writes


def _check_master(record: registry.StateRecord, i: int, leaf: dict[str, Any],
                  crcs: dict[jax.Device, int], refuse
                  ) -> list[tuple[int, int, int, dict[str, np.ndarray]]]:
  """Leaf i's master-weight writes from the checkpoint (zeros from one
  without them), checked; adds what it read to the device checksums."""
  layout = record.layout
  leaf_layout = record.leaves[i]
  saved = leaf.get('master')
  if not leaf_layout.correction_bits:
    if saved is not None:
      raise refuse(
          f'leaf {leaf_layout.path}: the checkpoint keeps master weights, and '
          'this state has none: make the optimizer with the '
          'master_weight_bits it was saved with.')
    return []
  dtype = np.int8 if leaf_layout.correction_bits == 8 else np.int16
  specs = _master_specs(layout, i)
  writes = []
  for e, device in enumerate(record.devices):
    if saved is None:
      parts = {name: np.zeros([math.prod(local)],
                              dtype if name == 'correction' else np.uint32)
               for name, (_, _, local) in specs.items()}
    else:
      parts = {}
      for name, (shape, spec, _) in specs.items():
        if tuple(np.shape(saved[name])) != shape:
          raise refuse(
              f'leaf {leaf_layout.path} master {name}: expected shape '
              f'{shape}, got {tuple(np.shape(saved[name]))}.')
        want = dtype if name == 'correction' else np.uint32
        part = np.ascontiguousarray(_local(
            saved[name], device, NamedSharding(layout.mesh, spec), shape))
        if part.dtype != want:
          raise refuse(
              f'leaf {leaf_layout.path} master {name}: expected '
              f'{np.dtype(want).name}, got {part.dtype} (master_weight_bits '
              'differs from the saved one?).')
        parts[name] = part
      for name in sorted(parts):
        crcs[device] = zlib.crc32(parts[name].tobytes(), crcs[device])
    writes.append((e, i, MASTER_MOMENT, parts))
  return writes


# StateRecord.write_moments' moment index of the master weights.
MASTER_MOMENT = ffi.extension().MASTER_MOMENT


def moment_writes(writes) -> list[tuple[Any, ...]]:
  """What ``check`` accepted, as ``StateRecord.write_moments`` takes it."""
  empty = np.zeros([0], np.uint8)
  out = []
  for e, i, m, parts in writes:
    if 'correction' in parts:
      out.append((e, i, m, parts['correction'].view(np.uint8),
                  parts['fingerprints'].view(np.uint8)))
    elif 'codes' in parts:
      out.append((e, i, m, parts['codes'], parts['absmax'].view(np.uint8)))
    else:
      out.append((e, i, m, parts['values'].view(np.uint8), empty))
  return out
