"""On a mesh, too, jax.disable_jit runs the step the jitted one runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged


@pytest.mark.parametrize('name', ['adamw8bit', 'lamb8bit'])
def test_disable_jit_on_a_mesh_equals_the_jitted_step(name):
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  rows = NamedSharding(mesh, P('data', None))
  params = jax.device_put(
      {'w': jnp.arange(1024 * 64, dtype=jnp.float32).reshape(1024, 64) / 1e4},
      rows)
  grads = jax.tree.map(lambda x: jnp.cos(x) * 0.1, params)
  tx = getattr(optax_paged, name)(1e-2, min_8bit_size=256)
  jitted_state, eager_state = tx.init(params), tx.init(params)
  jitted, jitted_state = jax.jit(tx.update)(grads, jitted_state, params)
  with jax.disable_jit():
    eager, eager_state = tx.update(grads, eager_state, params)
  assert int(eager_state.count) == int(jitted_state.count) == 1
  np.testing.assert_array_equal(np.asarray(eager['w']),
                                np.asarray(jitted['w']))
