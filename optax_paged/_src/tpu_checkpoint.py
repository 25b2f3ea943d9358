"""``state_dict`` / ``load_state_dict`` of TPU-path states, in the format of
the GPU and CPU states (``state_io``), so that a checkpoint moves between
the paths: the same header, leaves, flat codes and absmax in block order,
count and CRC32. A TPU-path state's own arrays are in its layout
(``tpu_state``); they are converted here.
"""

import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import registry
from optax_paged._src import state_io
from optax_paged._src import tpu_state
from optax_paged._src.tpu_state import TpuLeafState
from optax_paged._src.tpu_state import TpuMoment
from optax_paged._src.tpu_state import TpuState


def _record(state: TpuState, leaves: list[TpuLeafState]) -> Any:
  """What ``state_io``'s header checks read of a state."""
  return types.SimpleNamespace(code_bits=8, optimizer=state.optimizer,
                               leaves=leaves)


def _leaf_states(state: TpuState) -> list[TpuLeafState]:
  return jax.tree.leaves(state.leaves, is_leaf=tpu_state.is_leaf_state)


def export_state(state: TpuState) -> dict[str, Any]:
  """The state dictionary of a TPU-path state (arrays gathered to host)."""
  jax.block_until_ready(state)
  count = int(np.asarray(jax.device_get(state.count)))
  leaves = []
  for ls in _leaf_states(state):
    if ls.quantized:
      moments = [dict(zip(('codes', 'absmax'), tpu_state.to_flat(m, ls.shape),
                          strict=True)) for m in ls.moments]
    else:
      moments = [{'values': np.asarray(m).reshape(-1)} for m in ls.moments]
    leaves.append({
        'shape': np.asarray(ls.shape, dtype=np.int64),
        'quantized': np.asarray(ls.quantized),
        'tier': np.asarray(registry.TIER_CODES[ls.tier], np.int32),
        'moments': moments,
    })
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
    raise refuse('the checkpoint was saved from a registry state on a mesh; '
                 'the TPU path restores unsharded state dictionaries.')
  count = state_io._int_scalar(saved, 'count', 0, 2**31 - 1)  # noqa: SLF001
  restored = []
  for ls, leaf in zip(leaf_states, saved['leaves'], strict=True):
    shape = tuple(np.asarray(leaf['shape']).tolist())
    if shape != ls.shape or bool(leaf['quantized']) != ls.quantized:
      raise refuse(
          f'a leaf: checkpoint has shape {shape} (quantized='
          f'{bool(leaf["quantized"])}), the state has {ls.shape} '
          f'(quantized={ls.quantized}).')
    if 'master' in leaf:
      raise refuse('the checkpoint keeps master weights, which the TPU path '
                   'does not.')
    if len(leaf['moments']) != len(ls.moments):
      raise refuse('a leaf has the wrong number of moments.')
    n = int(np.prod(shape))
    moments = []
    for moment, fresh, signed in zip(leaf['moments'], ls.moments,
                                     state.signed, strict=True):
      if ls.quantized:
        codes = np.asarray(moment['codes'])
        absmax = np.asarray(moment['absmax'])
        if (codes.shape != (n,) or codes.dtype != np.uint8
            or absmax.shape != (-(-n // base.BLOCK_SIZE),)
            or absmax.dtype != np.float32):
          raise refuse(f'a leaf of shape {shape}: wrong codes or absmax.')
        new = tpu_state.from_flat(codes, absmax, shape, signed)
        moments.append(TpuMoment(*(
            jax.device_put(a, f.sharding) for a, f in zip(new, fresh,
                                                          strict=True))))
      else:
        values = np.asarray(moment['values'])
        if values.shape != (n,) or values.dtype != np.float32:
          raise refuse(f'a leaf of shape {shape}: wrong values.')
        moments.append(jax.device_put(values.reshape(shape), fresh.sharding))
    restored.append(ls.with_moments(tuple(moments)))
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
