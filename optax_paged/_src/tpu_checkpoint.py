"""``state_dict`` / ``load_state_dict`` of TPU-path states, in the format of
the GPU and CPU states (``state_io``), so that a checkpoint moves between
the paths: the same header, leaves, flat codes (4-bit: packed two a byte,
element ``2i`` in the low nibble) and absmax in block order,
count and CRC32, and with master weights each 16-bit leaf's ``master``
(flat correction, fingerprints in block order with the reset count last).
A TPU-path state's own arrays are in its layout (``tpu_state``); they are
converted here, and read by ``optax_paged.master_params`` (``masters``).
"""

import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import master_weights
from optax_paged._src import registry
from optax_paged._src import state_io
from optax_paged._src import tpu_host_tier
from optax_paged._src import tpu_sharded_checkpoint
from optax_paged._src import tpu_state
from optax_paged._src.tpu_state import TpuLeafState
from optax_paged._src.tpu_state import TpuMaster
from optax_paged._src.tpu_state import TpuMoment
from optax_paged._src.tpu_state import TpuState


def _record(state: TpuState, leaves: list[TpuLeafState]) -> Any:
  """What ``state_io``'s header checks read of a state."""
  return types.SimpleNamespace(code_bits=state.code_bits,
                               optimizer=state.optimizer,
                               leaves=leaves)


def _leaf_states(state: TpuState) -> list[TpuLeafState]:
  return jax.tree.leaves(state.leaves, is_leaf=tpu_state.is_leaf_state)


def export_state(state: TpuState) -> dict[str, Any]:
  """The state dictionary of a TPU-path state (arrays gathered to host;
  on a mesh the registry's sharded one, ``tpu_sharded_checkpoint``)."""
  if tpu_sharded_checkpoint.on_mesh(state):
    return tpu_sharded_checkpoint.export_state(state)
  jax.block_until_ready(state)
  count = int(np.asarray(jax.device_get(state.count)))
  leaves = []
  for ls in _leaf_states(state):
    ls = tpu_host_tier.in_device_layout(ls)
    if ls.quantized:
      moments = [dict(zip(('codes', 'absmax'),
                          tpu_state.to_flat(m, ls.shape, ls.code_bits),
                          strict=True)) for m in ls.moments]
    else:
      moments = [{'values': np.asarray(m).reshape(-1)} for m in ls.moments]
    leaf = {
        'shape': np.asarray(ls.shape, dtype=np.int64),
        'quantized': np.asarray(ls.quantized),
        'tier': np.asarray(registry.TIER_CODES[ls.tier], np.int32),
        'moments': moments,
    }
    if ls.master is not None:
      leaf['master'] = dict(zip(
          ('correction', 'fingerprints'),
          tpu_state.master_to_flat(ls.master, ls.shape, ls.quantized),
          strict=True))
    leaves.append(leaf)
  return {
      **state_io._header(_record(state, leaves)),  # noqa: SLF001 - one format
      'count': np.asarray(count, dtype=np.int32),
      'checksum': np.asarray(state_io._checksum(leaves, count), np.uint32),  # noqa: SLF001
      'leaves': leaves,
  }


def plan_import(state: TpuState, saved: Any) -> state_io.Planned:
  """Checks ``saved`` (from any path) against a fresh TPU-path state; the
  plan's result is the restored state (nothing is written in place)."""
  refuse = state_io.refuse
  if not isinstance(saved, dict) or 'format_version' not in saved:
    raise refuse('expected an optax_paged state dictionary where the state '
                  'has an optax_paged optimizer.')
  leaf_states = _leaf_states(state)
  version = state_io._check_header(saved, _record(state, leaf_states))  # noqa: SLF001
  if 'mesh_shape' in saved:
    return tpu_sharded_checkpoint.plan_import(state, saved, version)
  count = state_io._int_scalar(saved, 'count', 0, 2**31 - 1)  # noqa: SLF001
  restored = []
  for ls, leaf in zip(leaf_states, saved['leaves'], strict=True):
    shape = tpu_sharded_checkpoint.check_leaf(ls, leaf)
    master = _import_master(ls, leaf.get('master'))
    n = int(np.prod(shape))
    moments = []
    for moment, fresh, signed in zip(leaf['moments'], ls.moments,
                                     state.signed, strict=True):
      if ls.quantized:
        codes = np.asarray(moment['codes'])
        absmax = np.asarray(moment['absmax'])
        bits = ls.code_bits
        if (codes.shape != (base.code_bytes(n, bits),)
            or codes.dtype != np.uint8
            or absmax.shape != (-(-n // base.block_size(bits)),)
            or absmax.dtype != np.float32):
          raise refuse(f'a leaf of shape {shape}: wrong codes or absmax.')
        new = tpu_state.from_flat(codes, absmax, shape, signed, bits)
        moments.append(TpuMoment(*(
            jax.device_put(tpu_host_tier.as_stored(ls, a), f.sharding)
            for a, f in zip(new, fresh, strict=True))))
      else:
        values = np.asarray(moment['values'])
        if values.shape != (n,) or values.dtype != np.float32:
          raise refuse(f'a leaf of shape {shape}: wrong values.')
        moments.append(jax.device_put(values.reshape(shape), fresh.sharding))
    restored.append(ls.replace(moments=tuple(moments), master=master))
  stored = state_io._int_scalar(saved, 'checksum', 0, 2**32 - 1)  # noqa: SLF001
  if stored != state_io._checksum(  # noqa: SLF001
      saved['leaves'], count if version >= 2 else None):
    raise refuse('checksum mismatch: the checkpoint is corrupted.')
  treedef = jax.tree.structure(state.leaves, is_leaf=tpu_state.is_leaf_state)
  result = state.replace(
      count=jax.device_put(jnp.asarray(count, jnp.int32),
                           getattr(state.count, 'sharding', None)),
      leaves=jax.tree.unflatten(treedef, restored))
  return state_io.Planned(lambda: None, lambda: result)


def _import_master(ls: TpuLeafState, saved: Any) -> TpuMaster | None:
  """A leaf's restored master weights, placed as the fresh state's, from
  its saved ``master`` (None: the checkpoint has none, and the masters
  start from the parameters, as on the registry's path)."""
  refuse = state_io.refuse
  if ls.master is None:
    if saved is not None:
      raise refuse(
          f'a leaf of shape {ls.shape}: the checkpoint keeps master '
          'weights, and this state has none: make the optimizer with the '
          'master_weight_bits it was saved with (or take the masters out '
          'with optax_paged.master_params before changing it).')
    return None
  if saved is None:
    return ls.master
  n = int(np.prod(ls.shape))
  dtype = ls.master.correction.dtype
  correction = np.asarray(saved['correction'])
  fingerprints = np.asarray(saved['fingerprints'])
  if correction.dtype != dtype or correction.shape != (n,):
    raise refuse(
        f'a leaf of shape {ls.shape}: the checkpoint holds a '
        f'{correction.dtype} master correction of {correction.size} '
        f'elements, the state {np.dtype(dtype).name} of {n} '
        '(master_weight_bits differs from the saved one?).')
  if fingerprints.dtype != np.uint32 or fingerprints.shape != (
      -(-n // master_weights.BLOCK_SIZE) + 1,):
    raise refuse(f'a leaf of shape {ls.shape}: wrong master-weight '
                 'fingerprints.')
  new = tpu_state.master_from_flat(correction, fingerprints, ls.shape,
                                   ls.quantized)
  return TpuMaster(*(jax.device_put(tpu_host_tier.as_stored(ls, a), f.sharding)
                     for a, f in zip(new, ls.master, strict=True)))


def has_master_weights(state: TpuState) -> bool:
  return any(ls.master is not None for ls in _leaf_states(state))


def masters(state: TpuState, params: base.Params) -> base.Params:
  """``optax_paged.master_params`` of a TPU-path state: each corrected
  leaf's float32 master (``master_weights.decode`` of its valid
  corrections), other leaves cast to float32; in JAX, placed as XLA
  places the parameters."""
  leaves, treedef = jax.tree.flatten(params)
  leaf_states = _leaf_states(state)
  if len(leaves) != len(leaf_states) or any(
      tuple(np.shape(p)) != ls.shape
      for p, ls in zip(leaves, leaf_states, strict=True)):
    raise ValueError(
        'master_params: the parameters are not those the state was made '
        f'for ({len(leaves)} leaves of shapes '
        f'{[tuple(np.shape(p)) for p in leaves]}, the state has '
        f'{[ls.shape for ls in leaf_states]}).')
  out = []
  for param, ls in zip(leaves, leaf_states, strict=True):
    param = jnp.asarray(param)
    if ls.tier == 'host':
      ls = tpu_host_tier.to_device(ls)
    if ls.master is None:
      out.append(param.astype(jnp.float32))
      continue
    n = param.size
    correction = ls.master.correction.reshape(-1)[:n]
    prints = ls.master.fingerprints
    if ls.quantized:
      prints = jnp.swapaxes(prints, -1, -2)
    prints = jax.lax.bitcast_convert_type(
        prints.reshape(-1)[:-(-n // master_weights.BLOCK_SIZE)], jnp.uint32)
    flat = param.reshape(-1)
    valid = master_weights.valid_corrections(flat, correction, prints)
    out.append(master_weights.decode(flat, valid, 8 * correction.itemsize)
               .reshape(param.shape))
  return treedef.unflatten(out)
