"""The float32 master weights an optimizer keeps for 16-bit parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import master_weights
from optax_paged._src import registry
from optax_paged._src import tpu_checkpoint
from optax_paged._src import tpu_state


def master_params(state: Any, params: base.Params) -> base.Params:
  """The float32 master weights of ``params``, from the state's corrections.

  For evaluation, export or a switch of optimizer at full precision: each
  bfloat16 or float16 parameter kept with ``master_weight_bits`` becomes its
  master, the parameter plus its correction; other leaves are cast to
  float32. A block of 128 parameters that changed since the optimizer wrote
  them (new weights loaded) has no valid correction: its masters are the
  parameters, as the next step would take them.

  Args:
    state: the optimizer's state, or any pytree holding it (a train state,
      a chain's state).
    params: the parameters the state was made for, as they are now.

  Returns:
    A tree like ``params`` of float32 arrays.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> params = {'w': jnp.ones((256,), jnp.bfloat16)}
    >>> tx = optax_paged.sgd8bit(1e-4, master_weight_bits=32)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((256,), jnp.bfloat16)},
    ...                            state, params)
    >>> float(optax_paged.master_params(state, params)['w'][0])
    0.9998999834060669
  """
  found = [buffers for buffers in registry.find_buffers(state)
           if buffers.record().has_master_weights]
  # The TPU path's functional states (tpu_transform).
  tpu_found = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, tpu_state.TpuState))
               if isinstance(x, tpu_state.TpuState)
               and tpu_checkpoint.has_master_weights(x)]
  if len(found) + len(tpu_found) != 1:
    raise ValueError(
        'master_params: expected one optax_paged state with master weights '
        f'in the tree, found {len(found) + len(tpu_found)} (make the '
        'optimizer with master_weight_bits=24 or 32).')
  if tpu_found:
    return tpu_checkpoint.masters(tpu_found[0], params)
  record = found[0].record()
  record.check_paths('master_params', 'params', params)
  # The step that wrote the corrections may still be running: read_state
  # reads them after it.
  _, _, masters = record.read_state()
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, leaf in enumerate(leaves):
    if not record.leaves[i].correction_bits:
      out.append(jnp.asarray(leaf).astype(jnp.float32))
    elif record.layout is None:
      out.append(_decoded(np.ravel(np.asarray(leaf)), masters[0][i])
                 .reshape(np.shape(leaf)))
    else:
      out.append(_mesh_masters(record, i, leaf, [m[i] for m in masters]))
  return treedef.unflatten(out)


def _decoded(flat: np.ndarray, master: tuple[np.ndarray, np.ndarray]
             ) -> jax.Array:
  """The masters of ``flat`` parameters, as one entry's kernel saw them."""
  correction, fingerprints = master
  valid = master_weights.valid_corrections(
      jnp.asarray(flat), jnp.asarray(correction),
      jnp.asarray(fingerprints[:-1]))
  return master_weights.decode(jnp.asarray(flat), valid,
                               8 * correction.itemsize)


def _mesh_masters(record: registry.StateRecord, i: int, leaf: jax.Array,
                  masters: list[Any]) -> jax.Array:
  """Leaf i's masters on a mesh, sharded as the parameter is.

  Each entry holds the corrections of its device's parameter shard (or, under
  ZeRO-1, of its chunk of that shard): the shards are decoded where their
  entries are, and a ZeRO-1 shard is put together from its chunks.
  """
  layout = record.layout
  shards = {shard.device: np.ravel(np.asarray(shard.data))
            for shard in leaf.addressable_shards}
  chunk = layout.chunks[i]
  decoded = {}
  for device, master in zip(record.devices, masters, strict=True):
    flat = shards[device]
    if chunk:
      # The kernel's chunk: zero-padded past the shard's end (spmd).
      start = layout.chunk_start(device, i)
      piece = np.zeros([chunk], flat.dtype)
      taken = flat[start:start + chunk]
      piece[:taken.size] = taken
      decoded[device] = np.asarray(_decoded(piece, master))
    else:
      decoded[device] = np.asarray(_decoded(flat, master))
  blocks = []
  for device in record.devices:
    if chunk:
      # The chunks of this device's shard: the devices holding the same
      # shard, one a ZeRO-1 position.
      full = np.zeros([layout.local_size(i)], np.float32)
      covered = np.zeros([full.size], bool)
      for other in record.devices:
        if layout.shard_index(other, i) != layout.shard_index(device, i):
          continue
        start = layout.chunk_start(other, i)
        stop = min(start + chunk, full.size)
        if stop > start:
          full[start:stop] = decoded[other][:stop - start]
          covered[start:stop] = True
      if not covered.all():
        raise NotImplementedError(
            'master_params: this ZeRO-1 state keeps chunks of a shard in '
            'other processes; gather the masters per process with '
            'optax_paged.state_dict(state) instead.')
    else:
      full = decoded[device]
    blocks.append(jax.device_put(full.reshape(layout.local_shapes[i]),
                                 device))
  return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding,
                                                  blocks)
