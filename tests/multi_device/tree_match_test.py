"""On a mesh, too, a renamed leaf is refused by path in every view."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged
from tests.helpers import moments_of


def _mesh_trees():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  rows = NamedSharding(mesh, P('data', None))
  init = jax.device_put({'w': jnp.ones((1024, 64)), 'b': jnp.ones((512, 8))},
                        rows)
  renamed = jax.device_put(
      {'w': jnp.ones((1024, 64)), 'c': jnp.ones((512, 8))}, rows)
  return mesh, init, renamed


@pytest.mark.parametrize('view', ['jit', 'shard_map', 'zero1'])
def test_renamed_leaf_on_a_mesh_is_refused_before_any_device_writes(view):
  mesh, init, renamed = _mesh_trees()
  tx = optax_paged.adamw8bit(1e-2, min_8bit_size=256)
  if view == 'zero1':
    tx = optax_paged.shard_state_over(tx, 'data')
  state = tx.init(init)
  before = moments_of(state)
  grads = jax.tree.map(lambda x: x * 0.5, renamed)
  if view == 'shard_map':
    step = jax.jit(jax.shard_map(
        lambda g, p: optax_paged.apply_gradients(tx, g, state, p)[0],
        mesh=mesh, in_specs=P('data', None), out_specs=P('data', None)))
  else:
    step = jax.jit(lambda g, p: tx.update(g, state, p)[0])
  with pytest.raises(ValueError, match=r"\['c'\].*\['b'\]"):
    step(grads, renamed)
  jax.tree.map(np.testing.assert_array_equal, before, moments_of(state))
