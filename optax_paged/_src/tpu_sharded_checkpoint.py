"""``state_dict`` of a TPU-path state on a mesh, in the registry's sharded
format (``sharded_checkpoint``), so that a checkpoint moves between the
paths on the same mesh and Orbax saves it from every process.

On a mesh the registry keeps, per device, the state of the device's shard
of each leaf as a leaf of its own: codes (or float32 values) in the shard's
row-major order and one absmax per block of 256 (4-bit: 128) of that order.
A TPU-path shard is the same leaf in the TPU layout (``tpu_state``): a
native leaf's blocks are 256-lane segments of its rows (4-bit: pairs of
128-lane ones, packed within their group), and a split last dimension leaves
a multiple of 256 on each shard, so each device's shard of the codes, the
absmax and a master's correction and fingerprints is the TPU layout of the
shard's own shape, which ``tpu_state.to_flat`` turns into the registry's
arrays and ``from_flat`` back. A flat leaf is replicated on a mesh (the TPU
path splits native leaves only), so its shard is the whole leaf. The saved
arrays, their shardings and the per-device CRC32s are then the registry's
own (``sharded_checkpoint.export`` and ``check`` make and check them), so
the same refusals hold: another mesh shape, another layout on the mesh,
a ZeRO-1 checkpoint, a checksum mismatch.

Two things differ from a shard's view:

- The master-weight reset count: the registry keeps one per device, the
  TPU path one per leaf. It is saved on the mesh's first device (0 on the
  others) and restored as the sum of the devices' counts, the figure
  ``memory_report`` gives for a registry state.
- The fingerprints of a float32-moment leaf with master weights: the TPU
  path keeps them over the whole leaf's flattening (its step runs in XLA),
  the registry per shard. They convert where every shard is a contiguous
  range of whole blocks of 128 (a replicated leaf, a leaf split on its
  first dimension into multiples of 128 elements); other splits are
  refused, as re-blocking fingerprints needs the parameters.
"""

import math
import types
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_paged._src import master_weights
from optax_paged._src import sharded_checkpoint
from optax_paged._src import sharding as sharding_lib
from optax_paged._src import state_io
from optax_paged._src import tpu_state
from optax_paged._src.tpu_state import TpuLeafState
from optax_paged._src.tpu_state import TpuMaster
from optax_paged._src.tpu_state import TpuMoment
from optax_paged._src.tpu_state import TpuState

FINGERPRINT = master_weights.BLOCK_SIZE


def on_mesh(state: TpuState) -> bool:
  """Whether the state lives on a mesh of several devices (replicated or
  split), where the registry's state would save the sharded format."""
  return any(ls.sharding is not None for ls in _leaf_states(state))


def _leaf_states(state: TpuState) -> list[TpuLeafState]:
  return jax.tree.leaves(state.leaves, is_leaf=tpu_state.is_leaf_state)


def _record(state: TpuState) -> Any:
  """The registry record that ``sharded_checkpoint`` reads: the mesh
  layout of the parameters, devices in mesh order, the leaves."""
  pairs = jax.tree_util.tree_flatten_with_path(
      state.leaves, is_leaf=tpu_state.is_leaf_state)[0]
  meshes = {ls.sharding.mesh for _, ls in pairs if ls.sharding is not None}
  if len(meshes) != 1 or any(ls.sharding is None for _, ls in pairs):
    raise ValueError(
        f'{state.optimizer} (TPU): a state whose leaves are not all on one '
        'mesh has no sharded checkpoint; put every parameter on the same '
        'jax.sharding.Mesh (replicated ones with PartitionSpec()).')
  mesh = meshes.pop()
  leaf_states = [ls for _, ls in pairs]
  layout = sharding_lib.MeshLayout(
      mesh,
      tuple(sharding_lib.normalized_spec(ls.sharding.spec, len(ls.shape))
            for ls in leaf_states),
      tuple(tuple(ls.sharding.shard_shape(ls.shape)) for ls in leaf_states),
      None, (0,) * len(leaf_states))
  leaves = [types.SimpleNamespace(
      path=jax.tree_util.keystr(path), shape=ls.shape,
      quantized=ls.quantized, code_bits=ls.code_bits,
      correction_bits=(0 if ls.master is None
                       else 8 * np.dtype(ls.master.correction.dtype).itemsize))
            for path, ls in pairs]
  return types.SimpleNamespace(
      layout=layout, devices=layout.local_devices(), leaves=leaves,
      num_moments=len(state.signed))


def _arrays(ls: TpuLeafState, local: tuple[int, ...]
            ) -> list[tuple[tuple[int, ...], P, tuple[int, ...]]]:
  """(global shape, spec, shard shape) of a leaf's codes (or values),
  absmax, correction and fingerprints in the TPU layout on the mesh."""
  spec = ls.sharding.spec
  if not ls.quantized:
    prints = tpu_state.fingerprint_shape(ls.shape, False)
    return [(ls.shape, spec, local), (ls.shape, spec, local),
            (ls.shape, spec, local), (prints, P(), prints)]
  if not tpu_state.is_native(ls.shape):
    spec = P()  # a flat leaf is replicated: its shard is the whole leaf
  absmax = tpu_state.absmax_spec(spec, len(ls.shape))
  codes_shape, absmax_shape = tpu_state.moment_shapes(ls.shape, ls.code_bits)
  local_codes, local_absmax = tpu_state.moment_shapes(local, ls.code_bits)
  return [(codes_shape, spec, local_codes),
          (absmax_shape, absmax, local_absmax),
          (tpu_state.element_shape(ls.shape), spec,
           tpu_state.element_shape(local)),
          (tpu_state.fingerprint_shape(ls.shape, True), absmax,
           tpu_state.fingerprint_shape(local, True))]


def _shard(x: Any, device: jax.Device, mesh: jax.sharding.Mesh,
           array: tuple[tuple[int, ...], P, tuple[int, ...]]) -> np.ndarray:
  """The shard of a state array that ``device`` holds, in the TPU layout
  of the shard's own shape. A host-tier array narrower than 32 bits is
  kept one row a shard (``(*grid, shard_size)``): its device's row is the
  same elements in the same order."""
  shape, spec, local = array
  if tuple(np.shape(x)) == tuple(shape):
    flat = sharded_checkpoint._local(  # noqa: SLF001 - the registry's read
        x, device, NamedSharding(mesh, spec), tuple(shape))
  else:
    flat = next(np.asarray(s.data) for s in x.addressable_shards
                if s.device == device).reshape(-1)
  return flat.reshape(local)


def export_state(state: TpuState) -> dict[str, Any]:
  """The sharded state dictionary of a TPU-path state on a mesh: the
  registry's arrays and per-device checksums (``sharded_checkpoint``),
  new arrays that a later step (donating the state) leaves alone."""
  jax.block_until_ready(state)
  record = _record(state)
  layout = record.layout
  count = int(np.asarray(jax.device_get(state.count)))
  first = layout.mesh.devices.flat[0]
  read, masters = [], []
  for device in record.devices:
    moments, corrections = [], []
    for i, ls in enumerate(_leaf_states(state)):
      local = layout.local_shapes[i]
      arrays = _arrays(ls, local)
      if ls.quantized:
        moments.append([tpu_state.to_flat(TpuMoment(
            _shard(m.codes, device, layout.mesh, arrays[0]),
            _shard(m.absmax, device, layout.mesh, arrays[1])), local,
                                          ls.code_bits)
                        for m in ls.moments])
      else:
        moments.append([
            (_shard(m, device, layout.mesh, arrays[0]).reshape(-1), None)
            for m in ls.moments])
      if ls.master is None:
        corrections.append(None)
        continue
      resets = ls.master.resets if device == first else np.uint32(0)
      correction = _shard(ls.master.correction, device, layout.mesh,
                          arrays[2])
      prints = _shard(ls.master.fingerprints, device, layout.mesh, arrays[3])
      if not ls.quantized:
        prints = prints[_print_blocks(ls, device, i, layout)]
      corrections.append(tpu_state.master_to_flat(
          TpuMaster(correction, prints, resets), local, ls.quantized))
    read.append(moments)
    masters.append(corrections)
  return {
      **state_io._header(_header_record(state)),  # noqa: SLF001 - one format
      'count': jax.device_put(np.asarray(count, np.int32),
                              NamedSharding(layout.mesh, P())),
      **sharded_checkpoint.export(record, read,
                                  state_io.count_bytes(count), masters),
  }


def _header_record(state: TpuState) -> Any:
  """What ``state_io``'s header reads of a state."""
  return types.SimpleNamespace(code_bits=state.code_bits,
                               optimizer=state.optimizer,
                               leaves=_leaf_states(state))


def _print_blocks(ls: TpuLeafState, device: jax.Device, i: int,
                  layout: sharding_lib.MeshLayout) -> slice:
  """The blocks of a float32-moment leaf's whole-leaf fingerprints that
  are the device shard's own; refused where they are not whole blocks."""
  index = ls.sharding.devices_indices_map(ls.shape)[device]
  ranges = [s.indices(n)[:2] for s, n in zip(index, ls.shape, strict=True)]
  size = layout.local_size(i)
  n = math.prod(ls.shape)
  if size == n:
    return slice(None)
  # Contiguous: every dimension before the first one split has one index
  # in the shard, every one after it is whole.
  lengths = [stop - start for start, stop in ranges]
  k = next((d for d, length in enumerate(lengths) if length != 1), 0)
  start = int(np.ravel_multi_index([a for a, _ in ranges], ls.shape))
  if (any(length != ls.shape[d] for d, length in enumerate(lengths)
          if d > k) or size % FINGERPRINT or start % FINGERPRINT):
    raise ValueError(
        f'state_dict/load_state_dict: a float32-moment leaf of shape '
        f'{ls.shape} sharded as {ls.sharding.spec} with master weights: '
        'the TPU path fingerprints it whole, the registry per shard, and '
        'its shards are not whole blocks of 128 of the leaf; shard its '
        'first dimension or replicate it.')
  return slice(start // FINGERPRINT, (start + size) // FINGERPRINT)


def plan_import(state: TpuState, saved: dict[str, Any],
                version: int) -> state_io.Planned:
  """Checks a sharded checkpoint (from either path) against a fresh
  TPU-path state on the same mesh, as the registry checks it; the plan's
  result is the restored state. The header is checked by the caller."""
  refuse = state_io.refuse
  if not on_mesh(state):
    raise refuse(
        'the checkpoint was saved from a state on a mesh; restore it into a '
        'state initialised with the parameters on the same mesh.')
  if version < 2:
    raise refuse('states on a mesh need checkpoint format version 2.')
  leaf_states = _leaf_states(state)
  for ls, leaf in zip(leaf_states, saved['leaves'], strict=True):
    check_leaf(ls, leaf)
  count = state_io._int_scalar(saved, 'count', 0, 2**31 - 1)  # noqa: SLF001
  record = _record(state)
  writes = sharded_checkpoint.check(record, saved,
                                    state_io.count_bytes(count), refuse)
  parts = {(e, i, m): p for e, i, m, p in writes}
  for i, ls in enumerate(leaf_states):
    if ls.master is not None and not ls.quantized:
      for device in record.devices:
        _print_blocks(ls, device, i, record.layout)  # refuse before writing
  master = sharded_checkpoint.MASTER_MOMENT

  def result() -> TpuState:
    restored = []
    for i, ls in enumerate(leaf_states):
      moments = tuple(
          _restore_moment(record, ls, i, m, signed,
                          [parts[e, i, m] for e in range(len(record.devices))])
          for m, signed in enumerate(state.signed))
      new_master = ls.master
      if ls.master is not None:
        new_master = _restore_master(
            record, ls, i, [parts[e, i, master]
                            for e in range(len(record.devices))])
      restored.append(ls.replace(moments=moments, master=new_master))
    treedef = jax.tree.structure(state.leaves,
                                 is_leaf=tpu_state.is_leaf_state)
    # Replicated on the mesh, as the registry's count.
    return state.replace(
        count=jax.device_put(np.asarray(count, np.int32),
                             NamedSharding(record.layout.mesh, P())),
        leaves=jax.tree.unflatten(treedef, restored))

  return state_io.Planned(lambda: None, result)


def _assemble(fresh: Any, record: Any, shards: list[np.ndarray]
              ) -> jax.Array:
  """A state array laid out as ``fresh`` (shape, sharding, memory kind)
  from each device's shard in the TPU layout. A NumPy ``fresh`` (a flat
  leaf's initial moment) is replicated on the mesh."""
  sharding = getattr(fresh, 'sharding', None)
  if not isinstance(sharding, NamedSharding):
    sharding = NamedSharding(record.layout.mesh, P())
  local = sharding.shard_shape(fresh.shape)
  arrays = [jax.device_put(
      np.ascontiguousarray(a).reshape(local).astype(fresh.dtype),
      jax.sharding.SingleDeviceSharding(d, memory_kind=sharding.memory_kind))
            for d, a in zip(record.devices, shards, strict=True)]
  return jax.make_array_from_single_device_arrays(fresh.shape, sharding,
                                                  arrays)


def _restore_moment(record: Any, ls: TpuLeafState, i: int, m: int,
                    signed: bool, parts: list[dict[str, np.ndarray]]) -> Any:
  """Moment m of leaf i from each device's checked registry arrays."""
  fresh = ls.moments[m]
  if not ls.quantized:
    return _assemble(fresh, record, [p['values'] for p in parts])
  local = record.layout.local_shapes[i]
  new = [tpu_state.from_flat(p['codes'], p['absmax'], local, signed,
                            ls.code_bits) for p in parts]
  return TpuMoment(*(_assemble(f, record, list(shards))
                     for f, shards in zip(fresh, zip(*new, strict=True),
                                          strict=True)))


def _restore_master(record: Any, ls: TpuLeafState, i: int,
                    parts: list[dict[str, np.ndarray]]) -> TpuMaster:
  """Leaf i's master weights from each device's checked registry arrays;
  the reset count is the devices' sum."""
  layout = record.layout
  local = layout.local_shapes[i]
  resets = np.asarray(sum(int(p['fingerprints'][-1]) for p in parts)
                      % 2**32, np.uint32)
  resets = jax.device_put(resets, ls.master.resets.sharding)
  if ls.quantized:
    new = [tpu_state.master_from_flat(p['correction'], p['fingerprints'],
                                      local, True) for p in parts]
    correction, prints = (
        _assemble(f, record, [n[k] for n in new])
        for k, f in enumerate(ls.master[:2]))
    return TpuMaster(correction, prints, resets)
  if len(record.devices) != layout.mesh.size and layout.local_size(i) != (
      math.prod(ls.shape)):
    raise state_io.refuse(
        f'a float32-moment leaf of shape {ls.shape} with master weights, '
        'split over processes: the TPU path fingerprints it whole, and '
        'this process holds part of it.')
  prints = np.zeros(ls.master.fingerprints.shape, np.uint32)
  for device, p in zip(record.devices, parts, strict=True):
    prints[_print_blocks(ls, device, i, layout)] = p['fingerprints'][:-1]
  correction = _assemble(ls.master.correction, record,
                         [p['correction'] for p in parts])
  return TpuMaster(correction,
                   _assemble(ls.master.fingerprints, record,
                             [prints.view(np.int32)] * len(parts)),
                   resets)


def check_leaf(ls: TpuLeafState, leaf: dict[str, Any]) -> tuple[int, ...]:
  """Refuses a saved leaf of another shape, quantization or number of
  moments than ``ls``; returns its shape."""
  shape = tuple(np.asarray(leaf['shape']).tolist())
  if shape != ls.shape or bool(leaf['quantized']) != ls.quantized:
    raise state_io.refuse(
        f'a leaf: checkpoint has shape {shape} (quantized='
        f'{bool(leaf["quantized"])}), the state has {ls.shape} '
        f'(quantized={ls.quantized}).')
  if len(leaf['moments']) != len(ls.moments):
    raise state_io.refuse('a leaf has the wrong number of moments.')
  return shape
