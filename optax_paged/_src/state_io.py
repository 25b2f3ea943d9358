"""Export and import of one optax_paged state's buffers, and its copies.

The core under ``checkpoint`` (``state_dict`` / ``load_state_dict`` over
whole optimizer trees), ``copy.deepcopy`` and ``pickle`` of a state, and
Flax's serialization of the buffers field. It works on any object with
``count`` and ``buffers`` fields and builds results of the type it was given,
so the state type (``transform.OptimizerState``) can use it for its own
copy protocol without an import cycle.
"""

import zlib
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import ffi
from optax_paged._src import master_weights
from optax_paged._src import paging
from optax_paged._src import quantization
from optax_paged._src import registry
from optax_paged._src import sharded_checkpoint


class CountAndBuffers(NamedTuple):
  """A step count and buffers, for exports that have no state object."""

  count: Any
  buffers: registry.StateBuffers


def zero_count(buffers: registry.StateBuffers) -> jax.Array:
  """A zero step count, replicated over the state's mesh if it has one."""
  record = None if buffers.is_abstract else buffers.record()
  if record is None or record.layout is None:
    return jnp.zeros([], jnp.int32)
  replicated = jax.sharding.NamedSharding(record.layout.mesh,
                                          jax.sharding.PartitionSpec())
  return jax.make_array_from_callback(
      (), replicated, lambda _: np.zeros((), np.int32))


def _checksum(leaves: list[dict[str, Any]], count: int | None) -> int:
  """CRC32 of the moments, (format 5 on) the master weights and (format 2
  on) the step count."""
  crc = 0
  for leaf in leaves:
    for part in (*leaf['moments'], *([leaf['master']] if 'master' in leaf
                                     else [])):
      for name in sorted(part):
        crc = zlib.crc32(np.ascontiguousarray(part[name]).tobytes(), crc)
  if count is not None:
    crc = zlib.crc32(count_bytes(count), crc)
  return crc


def count_bytes(count: int) -> bytes:
  """The step count as the checksum covers it (int32, little endian)."""
  return np.asarray(count, '<i4').tobytes()


def _header(record: Any) -> dict[str, Any]:
  bits = record.code_bits
  return {
      # 0-d arrays, not NumPy scalars: checkpointers store arrays.
      'format_version': np.asarray(base.FORMAT_VERSION, np.int32),
      'code_bits': np.asarray(bits, np.int32),
      'block_size': np.asarray(base.block_size(bits), np.int32),
      'signed_map': quantization.map_values(True, bits).copy(),
      'unsigned_map': quantization.map_values(False, bits).copy(),
      # Names as bytes: checkpointers store numbers, not strings.
      'optimizer': np.frombuffer(record.optimizer.encode(), np.uint8).copy(),
  }


def export_state(state: Any) -> dict[str, Any]:
  """The state dictionary of ``state``: its moments and count, checked."""
  record = state.buffers.record()
  count = int(np.asarray(jax.device_get(state.count)))
  # Read at once, so that a step on another thread lands before the read of
  # every leaf or after it.
  step, moments, masters = record.read_state()
  # A count from another point of training than the moments (a stale copy,
  # a reset count, a step that landed since the count was made) would make
  # a checkpoint that resumes wrongly.
  record.check_count(count, step)
  return _export(record, count, state.count, moments, masters)


def _export(record: Any, count: int, count_array: Any,
            moments: list[Any], masters: list[Any]) -> dict[str, Any]:
  """The state dictionary of what ``record.read_state`` read."""
  if record.layout is not None:
    # The count stays a global array on the mesh, as the moments are.
    return {**_header(record), 'count': count_array,
            **sharded_checkpoint.export(record, moments, count_bytes(count),
                                        masters)}
  entry = record.entries[0]
  leaves = []
  for index, layout in enumerate(record.leaves):
    moments_out = []
    for data, absmax in moments[0][index]:
      if layout.quantized:
        moments_out.append({'codes': data, 'absmax': absmax})
      else:
        moments_out.append({'values': data})
    leaf = {
        'shape': np.asarray(layout.shape, dtype=np.int64),
        'quantized': np.asarray(layout.quantized),
        'tier': np.asarray(
            registry.TIER_CODES[entry.leaf_info(index)['tier']], np.int32),
        'moments': moments_out,
    }
    if masters[0][index] is not None:
      correction, fingerprints = masters[0][index]
      leaf['master'] = {'correction': correction,
                        'fingerprints': fingerprints}
    leaves.append(leaf)
  return {
      **_header(record),
      'count': np.asarray(count, dtype=np.int32),
      'checksum': np.asarray(_checksum(leaves, count), np.uint32),
      'leaves': leaves,
  }


def refuse(message: str) -> ValueError:
  return ValueError(f'load_state_dict: {message}')


def _int_scalar(saved: dict[str, Any], name: str, low: int, high: int) -> int:
  """``saved[name]`` as an int in [low, high]; else a refusal."""
  if name not in saved:
    raise refuse(f'the checkpoint has no {name!r}.')
  value = np.asarray(jax.device_get(saved[name]))
  if value.shape != () or not np.issubdtype(value.dtype, np.integer):
    raise refuse(f'{name} must be an integer scalar, got '
                  f'{value.dtype}{list(value.shape)}.')
  if not low <= int(value) <= high:
    raise refuse(f'{name} {int(value)} is outside [{low}, {high}].')
  return int(value)


def _check_header(saved: dict[str, Any], record: Any) -> int:
  """Checks the fields every state dictionary has; returns its version."""
  version = _int_scalar(saved, 'format_version', 0, 2**31 - 1)
  if version not in base.READABLE_FORMAT_VERSIONS:
    raise refuse(
        f'checkpoint format version {version}, this optax_paged reads '
        f'versions {list(base.READABLE_FORMAT_VERSIONS)}.'
    )
  # Before version 4 every quantized state was 8-bit.
  bits = (_int_scalar(saved, 'code_bits', 0, 64) if 'code_bits' in saved
          else 8)
  if bits != record.code_bits:
    raise refuse(
        f'checkpoint holds {bits}-bit moments, the state {record.code_bits}-bit'
        ' ones (a checkpoint restores into the optimizer that saved it).'
    )
  block_size = _int_scalar(saved, 'block_size', 0, 2**31 - 1)
  if block_size != base.block_size(bits):
    raise refuse(
        f'checkpoint block size {block_size}, expected '
        f'{base.block_size(bits)}.'
    )
  for name, signed in (('signed_map', True), ('unsigned_map', False)):
    stored = np.asarray(saved[name], dtype=np.float32)
    if not np.array_equal(stored, quantization.map_values(signed, bits)):
      raise refuse(f'checkpoint {name} differs from this build\'s map.')
  optimizer = np.asarray(saved['optimizer'], np.uint8).tobytes().decode()
  if optimizer != record.optimizer:
    raise refuse(
        f'checkpoint is for {optimizer}, the state is for {record.optimizer}.'
    )
  if len(saved['leaves']) != len(record.leaves):
    raise refuse(
        f'checkpoint has {len(saved["leaves"])} leaves, the state has '
        f'{len(record.leaves)}.'
    )
  return version


def _expected_arrays(layout: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  if layout.quantized:
    blocks = -(-layout.size // base.block_size(layout.code_bits))
    return {
        'codes': ((base.code_bytes(layout.size, layout.code_bits),), np.uint8),
        'absmax': ((blocks,), np.float32),
    }
  return {'values': ((layout.size,), np.float32)}


MASTER_MOMENT = sharded_checkpoint.MASTER_MOMENT


def master_write(layout: Any, saved: dict[str, Any] | None, where: str
                 ) -> tuple[np.ndarray, np.ndarray] | None:
  """(correction, fingerprints) bytes to write for a leaf from its saved
  ``master`` dict (None: the checkpoint has none), or None for a leaf
  without master weights. A checkpoint without them restores the state's
  corrections as zero: the masters start from the parameters.

  Args:
    layout: the leaf's ``LeafLayout``.
    saved: its saved ``{'correction', 'fingerprints'}``, flat.
    where: the leaf, for messages.
  """
  bits = layout.correction_bits
  if not bits:
    if saved is not None:
      raise refuse(
          f'leaf {where}: the checkpoint keeps master weights, and this '
          'state has none: make the optimizer with the master_weight_bits '
          'it was saved with (or take the masters out with '
          'optax_paged.master_params before changing it).')
    return None
  blocks = -(-layout.size // master_weights.BLOCK_SIZE) + 1
  dtype = np.int8 if bits == 8 else np.int16
  if saved is None:
    return (np.zeros([layout.size], dtype).view(np.uint8),
            np.zeros([blocks], np.uint32).view(np.uint8))
  correction = np.asarray(saved['correction'])
  fingerprints = np.asarray(saved['fingerprints'])
  if correction.dtype != dtype or correction.size != layout.size:
    raise refuse(
        f'leaf {where}: the checkpoint holds a {correction.dtype} master '
        f'correction of {correction.size} elements, the state '
        f'{np.dtype(dtype).name} of {layout.size} (master_weight_bits '
        'differs from the saved one?).')
  if fingerprints.dtype != np.uint32 or fingerprints.size != blocks:
    raise refuse(f'leaf {where}: wrong master-weight fingerprints.')
  return (np.ascontiguousarray(correction).reshape(-1).view(np.uint8),
          np.ascontiguousarray(fingerprints).reshape(-1).view(np.uint8))


def _master_write(layout: Any, leaf: dict[str, Any]):
  return master_write(layout, leaf.get('master'), layout.path)


class Planned:
  """A state whose checkpoint passed every check, not yet written."""

  def __init__(self, write: Callable[[], None],
               result: Callable[[], Any]):
    self.write = write
    self.result = result


def plan_import(state: Any, saved: Any) -> Planned:
  """Checks ``saved`` against ``state`` completely; writes nothing."""
  if not isinstance(saved, dict) or 'format_version' not in saved:
    raise refuse(
        'expected an optax_paged state dictionary where the state has an '
        'optax_paged optimizer.'
    )
  record = state.buffers.record()
  version = _check_header(saved, record)
  count = _int_scalar(saved, 'count', 0, 2**31 - 1)
  if record.layout is not None:
    if version < 2:
      raise refuse('states on a mesh need checkpoint format version 2.')
    writes = sharded_checkpoint.check(record, saved, count_bytes(count),
                                      refuse)
    def write_sharded() -> None:
      record.write_moments(sharded_checkpoint.moment_writes(writes), count)

    return Planned(
        write_sharded,
        lambda: type(state)(
            count=zero_count(state.buffers) + count,
            buffers=state.buffers))
  if 'mesh_shape' in saved:
    raise refuse(
        'the checkpoint was saved from a state on a mesh; restore it into a '
        'state initialised with the parameters on the same mesh.'
    )
  checked = []
  master_writes = []
  pairs = zip(record.leaves, saved['leaves'], strict=True)
  for index, (layout, leaf) in enumerate(pairs):
    if tuple(np.asarray(leaf['shape']).tolist()) != layout.shape or bool(
        leaf['quantized']
    ) != layout.quantized:
      raise refuse(
          f'leaf {layout.path}: checkpoint has shape '
          f'{tuple(np.asarray(leaf["shape"]).tolist())} '
          f'(quantized={bool(leaf["quantized"])}), the state has '
          f'{layout.shape} (quantized={layout.quantized}).'
      )
    if len(leaf['moments']) != record.num_moments:
      raise refuse(f'leaf {layout.path}: wrong number of moments.')
    for m, moment in enumerate(leaf['moments']):
      expected = _expected_arrays(layout)
      if set(moment) != set(expected):
        raise refuse(f'leaf {layout.path} moment {m}: wrong arrays.')
      for name, (shape, dtype) in expected.items():
        array = np.asarray(moment[name])
        if array.shape != shape or array.dtype != dtype:
          raise refuse(
              f'leaf {layout.path} moment {m} {name}: expected {dtype.__name__}'
              f'{list(shape)}, got {array.dtype}{list(array.shape)}.'
          )
      checked.append((index, m, moment))
    master_writes.append(_master_write(layout, leaf))
  stored = _int_scalar(saved, 'checksum', 0, 2**32 - 1)
  # Format 1 checksums cover the moments only.
  if stored != _checksum(saved['leaves'], count if version >= 2 else None):
    raise refuse('checksum mismatch: the checkpoint is corrupted.')
  tiers = [int(np.asarray(leaf.get('tier', -1))) for leaf in saved['leaves']]

  def write() -> None:
    empty = np.zeros([0], np.uint8)
    record.write_moments([
        (0, index, m, np.ascontiguousarray(moment['codes']),
         np.ascontiguousarray(moment['absmax']).view(np.uint8))
        if 'codes' in moment else
        (0, index, m, np.ascontiguousarray(moment['values']).view(np.uint8),
         empty)
        for index, m, moment in checked] + [
            (0, index, MASTER_MOMENT, *write)
            for index, write in enumerate(master_writes)
            if write is not None], count)
    if record.paged:
      _restore_tiers(record, tiers)

  return Planned(write, lambda: type(state)(
      count=jnp.asarray(count, dtype=jnp.int32), buffers=state.buffers))


def _import_state(state: Any, saved: Any) -> Any:
  planned = plan_import(state, saved)
  planned.write()
  return planned.result()


def _restore_tiers(record: Any, tiers: list[int]) -> None:
  """Puts each leaf back in its saved tier, as far as the GPU has room."""

  paged_tiers = {registry.TIER_CODES['device'], registry.TIER_CODES['host']}
  if not all(tier in paged_tiers for tier in tiers):
    return  # saved from the CPU or an unpaged state: keep the init's tiers
  device = registry.TIER_CODES['device']
  sizes = [record.entries[0].leaf_info(i)['bytes']
           for i in range(len(tiers))]
  budget = sum(n for n, tier in zip(sizes, tiers, strict=True)
               if tier == device)
  paging.apply_budget(record, budget)


def checked(plan: Callable[[], Any]) -> Any:
  """``plan()``, with a malformed checkpoint's errors as refusals."""
  try:
    return plan()
  except (KeyError, TypeError, ValueError, OverflowError) as error:
    if str(error).startswith('load_state_dict:'):
      raise
    raise refuse(f'checkpoint does not match the state: {error}') from None


def _empty_like(layout: dict[str, Any]) -> registry.StateBuffers:
  """Zeroed buffers of a record's layout (paged ones on the host tier)."""
  return registry.REGISTRY.create(
      layout['optimizer'], layout['num_moments'], layout['platform'],
      layout['treedef'], layout['leaves'], layout['devices'],
      layout['mesh_layout'], paged=layout['paged'],
  )


def _layout_of(record: Any) -> dict[str, Any]:
  return {
      'optimizer': record.optimizer,
      'num_moments': record.num_moments,
      'platform': record.platform,
      'treedef': record.treedef,
      'leaves': record.leaves,
      'paged': record.paged,
      'devices': record.devices,
      'mesh_layout': record.layout,
  }


def export_buffers(buffers: registry.StateBuffers) -> dict[str, Any]:
  """The moments of ``buffers`` as a state dictionary.

  For serializers that store a state's ``count`` and ``buffers`` fields
  apart (Flax's, for named tuples): the dictionary's count is the step the
  moments are at, which the state's own count must equal.
  """
  record = buffers.record()
  step, moments, masters = record.read_state()
  if not record.has_moments:
    step = 0  # any count fits a state without moments
  elif step is None:
    raise ValueError(
        f'{record.optimizer}: the leaves of this state are at different '
        'steps; it cannot be exported.')
  return _export(record, step, zero_count(buffers) + step, moments, masters)


def restore_buffers(target: registry.StateBuffers,
                    saved: Any) -> registry.StateBuffers:
  """New buffers laid out as ``target``'s, holding the moments of ``saved``.

  ``saved`` comes from ``export_buffers``; it is checked completely before
  the new buffers are written, and ``target`` is never touched.
  """
  record = target.record()
  fresh = CountAndBuffers(zero_count(target), _empty_like(_layout_of(record)))
  try:
    planned = checked(lambda: plan_import(fresh, saved))
  except BaseException:
    registry.REGISTRY.release(fresh.buffers)
    raise
  planned.write()
  if int(np.asarray(saved['format_version'])) < 3:
    # Before format 3 the export's count was 0, not the moments' step: the
    # state's own count, restored beside it, says which step they are at.
    fresh.buffers.record().adopt_count = True
  return fresh.buffers


def copy_state(
    state: Any,
) -> Any:
  """``copy.deepcopy`` of a state: new buffers, same moments and tiers.

  Later updates of either state leave the other alone. The count is a new
  array too (the import makes it), so donating the original's to a step
  leaves the copy's alive.
  """
  if state.buffers.is_abstract:
    return type(state)._make(state)
  jax.block_until_ready(state.count)  # the step that made it has finished
  saved = export_state(state)
  fresh = type(state)._make(
      (state.count, _empty_like(_layout_of(state.buffers.record()))))
  return _import_state(fresh, saved)


def reduce_state(state: Any) -> tuple[Any, ...]:
  """``pickle`` support: the layout and the exported moments, by value."""
  if state.buffers.is_abstract:
    raise TypeError(
        'pickle: this optimizer state was made under a JAX transformation and '
        'holds no buffers; pickle the state returned by tx.init outside jit.'
    )
  jax.block_until_ready(state.count)
  record = state.buffers.record()
  if record.layout is not None:
    raise TypeError(
        'pickle: this optimizer state is spread over a mesh; save it with '
        'optax_paged.state_dict and a checkpointer such as Orbax, and '
        'restore it with load_state_dict.'
    )
  layout = _layout_of(record)
  devices = layout.pop('devices')
  layout['device_id'] = devices[0].id
  del layout['mesh_layout']
  return unpickle_state, (type(state), layout, export_state(state))


def unpickle_state(state_type: type, layout: dict[str, Any],
                   saved: dict[str, Any]) -> Any:
  """A state of ``state_type`` in new buffers of ``layout``, from ``saved``."""
  if layout['platform'] == 'cuda' and not ffi.has_cuda_backend():
    raise ValueError(
        'unpickling an optax_paged state saved on a GPU, but this process '
        'has no CUDA backend; save it with state_dict and restore it with '
        'load_state_dict into a state initialised on this machine.'
    )
  device = {d.id: d for d in jax.local_devices()}.get(layout.pop('device_id'))
  layout['devices'] = [device or jax.local_devices()[0]]
  layout['mesh_layout'] = None
  fresh = state_type._make(
      (jnp.asarray(saved['count'], jnp.int32), _empty_like(layout)))
  return _import_state(fresh, saved)
