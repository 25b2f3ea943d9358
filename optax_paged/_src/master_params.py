"""The float32 master weights an optimizer keeps for 16-bit parameters."""

from typing import Any

import jax
import jax.numpy as jnp

from optax_paged._src import base
from optax_paged._src import master_weights
from optax_paged._src import registry


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
  if len(found) != 1:
    raise ValueError(
        'master_params: expected one optax_paged state with master weights '
        f'in the tree, found {len(found)} (make the optimizer with '
        'master_weight_bits=24 or 32).')
  record = found[0].record()
  if record.layout is not None:
    raise NotImplementedError(
        'master_params of a state on a mesh is not available yet; '
        'optax_paged.state_dict(state) holds its corrections.')
  record.check_paths('master_params', 'params', params)
  _, _, masters = record.read_state()
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for leaf, master in zip(leaves, masters[0], strict=True):
    if master is None:
      out.append(jnp.asarray(leaf, jnp.float32))
      continue
    correction, fingerprints = master
    flat = jnp.ravel(jnp.asarray(leaf))
    valid = master_weights.valid_corrections(
        flat, jnp.asarray(correction), jnp.asarray(fingerprints[:-1]))
    out.append(master_weights.decode(flat, valid, 8 * correction.itemsize)
               .reshape(jnp.shape(leaf)))
  return treedef.unflatten(out)
