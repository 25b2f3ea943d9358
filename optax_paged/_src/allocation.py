"""Allocating the states that ``tx.init`` made under ``jax.jit``.

``tx.init`` inside a trace cannot allocate (nothing may escape it), so it
returns a state whose ``StateBuffers`` carry a ``PendingInit``: what it would
have allocated. ``allocate_state`` allocates those afterwards, for the
concrete parameters' shardings.
"""

from typing import Any

import jax
import numpy as np

from optax_paged._src import paging
from optax_paged._src import registry
from optax_paged._src import transform


def allocate_state(state: Any, params: Any) -> Any:
  """Allocates the buffers of states that ``tx.init`` made under tracing.

  ``tx.init`` inside ``jax.jit`` (the common ``jax.jit(create_train_state)``
  idiom, with or without ``out_shardings``) cannot allocate: it returns a
  state that records what it would have allocated. Pass that state (or any
  pytree holding it, such as a Flax ``TrainState``) with the concrete
  parameters the jitted call returned; each abstract optax_paged state gets
  zeroed buffers laid out for the parameters' shardings, exactly as
  ``tx.init(params)`` outside ``jit`` would have made them.

  Args:
    state: a pytree holding optax_paged states (abstract ones are
      allocated; live ones are kept as they are).
    params: the parameters, with the tree ``tx.init`` was traced with (the
      full tree for states inside ``optax.multi_transform``).

  Returns:
    ``state`` with every abstract optax_paged state allocated.

  Example:
    >>> import jax, optax_paged
    >>> tx = optax_paged.adamw8bit(1e-3)
    >>> @jax.jit
    ... def create(key):
    ...   params = {'w': jax.random.normal(key, (64, 64))}
    ...   return params, tx.init(params)
    >>> params, opt_state = create(jax.random.key(0))
    >>> opt_state = optax_paged.allocate_state(opt_state, params)
  """
  by_path = {
      jax.tree_util.keystr(path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }

  def allocate(node: Any) -> Any:
    if not isinstance(node, registry.StateBuffers) or node.pending is None:
      return node
    pending = node.pending
    missing = [leaf.path for leaf in pending.leaves if leaf.path not in by_path]
    if missing:
      raise ValueError(
          f'allocate_state: the state was traced for parameters at '
          f'{missing[:3]}, which `params` does not have; pass the parameter '
          'tree tx.init was called with.'
      )
    leaves = [by_path[leaf.path] for leaf in pending.leaves]
    for leaf, layout in zip(leaves, pending.leaves, strict=True):
      if tuple(np.shape(leaf)) != layout.shape:
        raise ValueError(
            f'allocate_state: parameter {layout.path} has shape '
            f'{np.shape(leaf)}, the state was traced for {layout.shape}.'
        )
    return paging.place_new_state(registry.REGISTRY.allocate(
        pending.optimizer, pending.num_moments, leaves,
        [leaf.quantized for leaf in pending.leaves],
        [leaf.decay for leaf in pending.leaves],
        paged=pending.paged, device_budget=pending.device_budget,
        zero_axis=pending.zero_axis, initial_values=pending.initial_values,
        signed=pending.signed, paths=[leaf.path for leaf in pending.leaves],
        code_bits=pending.leaves[0].code_bits if pending.leaves else 8,
        master_weight_bits=pending.master_weight_bits,
    ), pending.device_budget)

  allocated = jax.tree.map(
      allocate, state, is_leaf=lambda x: isinstance(x, registry.StateBuffers))
  return _with_mesh_counts(allocated)


def _with_mesh_counts(state: Any) -> Any:
  """Counts of sharded states replicated over their mesh (as init makes)."""
  def fix(node: Any) -> Any:
    if not isinstance(node, transform.OptimizerState):
      return node
    if node.buffers.is_abstract or node.buffers.record().layout is None:
      return node
    mesh = node.buffers.record().layout.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if getattr(node.count, 'sharding', None) == replicated:
      return node
    value = np.asarray(jax.device_get(node.count), np.int32)
    count = jax.make_array_from_callback((), replicated, lambda _: value)
    return node._replace(count=count)

  return jax.tree.map(
      fix, state,
      is_leaf=lambda x: isinstance(x, transform.OptimizerState))
