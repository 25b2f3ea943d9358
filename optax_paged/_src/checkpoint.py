"""Export and import of optimizer states as pytrees of NumPy arrays.

The registry's buffers are not leaves of the optimizer state, so generic
checkpointers cannot see them. ``state_dict`` turns every optax_paged state
inside a (possibly chained) optimizer state into a dictionary of arrays,
recording the format version, block size and quantization maps with a CRC32
of the contents; ``load_state_dict`` checks all of it and writes the arrays
back into a freshly initialised state. One state's export and import live in
``state_io``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import state_io
from optax_paged._src import tpu_checkpoint
from optax_paged._src import tpu_state
from optax_paged._src import transform


def _is_optax_paged_state(x: Any) -> bool:
  return isinstance(x, (transform.OptimizerState, tpu_state.TpuState))


def _export(x: Any) -> dict[str, Any]:
  if isinstance(x, tpu_state.TpuState):  # the TPU path's functional state
    return tpu_checkpoint.export_state(x)
  return state_io.export_state(x)


def _plan_import(fresh: Any, stored: Any) -> state_io.Planned:
  if isinstance(fresh, tpu_state.TpuState):
    return tpu_checkpoint.plan_import(fresh, stored)
  return state_io.plan_import(fresh, stored)


def state_dict(state: base.OptState) -> Any:
  """Exports an optimizer state as a pytree of NumPy arrays.

  Waits for pending updates first. Every optax_paged state inside ``state``
  (for example inside ``optax.chain``) becomes a dictionary holding the
  quantized moments, the step count, the format version, the block size, the
  quantization maps and a CRC32 checksum; every other leaf becomes a NumPy
  array. A state on a mesh exports its moments as global ``jax.Array``s
  sharded like the parameters (see ``sharded_checkpoint``), so Orbax saves
  and restores them from every process.

  Args:
    state: the state returned by ``tx.init`` / ``tx.update``.

  Returns:
    A pytree of arrays, suitable for any checkpointing library.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  optax_paged.adamw8bit(1e-3))
    >>> saved = optax_paged.state_dict(tx.init(params))
    >>> moments = saved[1]['leaves'][0]['moments']  # codes and absmax
    >>> [m['codes'].dtype.name for m in moments], int(saved[1]['count'])
    (['uint8', 'uint8'], 0)
  """
  jax.block_until_ready(state)
  return jax.tree.map(
      lambda x: (_export(x) if _is_optax_paged_state(x)
                 else _host_leaf(x)),
      state,
      is_leaf=_is_optax_paged_state,
  )


def _host_leaf(x: Any) -> Any:
  # Arrays spread over processes stay global arrays (no process holds them).
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x
  return np.asarray(x)


def load_state_dict(state: base.OptState, saved: Any) -> base.OptState:
  """Restores a ``state_dict`` into a state from ``tx.init``.

  Args:
    state: a state from ``tx.init(params)`` for the same optimizer and
      parameter tree as the one exported.
    saved: the output of ``state_dict``, possibly after a round trip through
      a checkpointing library.

  Returns:
    The restored state (its registry buffers now hold the saved moments).

  Raises:
    ValueError: if the checkpoint has another format version, block size,
      map, optimizer, tree, shape or dtype, a step count that is not a
      non-negative int32 scalar, or its checksum (which covers the moments
      and, from format 2, the count) does not match. Every optax_paged state
      in the tree is checked before any is written: after a refusal every
      state is as it was.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.adamw8bit(1e-3)
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> saved = optax_paged.state_dict(state)  # save it with any library
    >>> restored = optax_paged.load_state_dict(tx.init(params), saved)
    >>> int(restored.count)
    1
  """
  jax.block_until_ready(state)
  planned = state_io.checked(lambda: jax.tree.map(
      lambda fresh, stored: (
          _plan_import(fresh, stored)
          if _is_optax_paged_state(fresh)
          else _restore_leaf(fresh, stored)
      ),
      state,
      saved,
      is_leaf=_is_optax_paged_state,
  ))
  # Every state in the tree passed every check: only now is anything written.
  is_planned = lambda x: isinstance(x, state_io.Planned)  # noqa: E731
  for plan in jax.tree.leaves(planned, is_leaf=is_planned):
    if is_planned(plan):
      plan.write()
  return jax.tree.map(lambda x: x.result() if is_planned(x) else x, planned,
                      is_leaf=is_planned)


def _restore_leaf(fresh: Any, stored: Any) -> Any:
  stored = np.asarray(stored)
  if stored.shape != np.shape(fresh) or stored.dtype != np.asarray(fresh).dtype:
    raise state_io.refuse(
        f'a leaf has shape {stored.shape} and dtype {stored.dtype}, the state '
        f'expects {np.shape(fresh)} and {np.asarray(fresh).dtype}.'
    )
  return jnp.asarray(stored)


def _unpickle_state(layout: dict[str, Any], saved: dict[str, Any]) -> Any:
  # Pickles made before state_io existed name this function.
  return state_io.unpickle_state(transform.OptimizerState, layout, saved)
