"""The TPU path's host tier (tpu_host_tier) in Pallas' TPU interpreter.

The step runs eagerly: jax 0.10.2 fails to lower a jitted interpreted step
whose arguments carry memory kinds (a length mismatch inside JAX's
lowering); the compiled host-tier step is checked by tests/tpu_compile_test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from optax_paged._src import tpu_transform

# On the CPU on any host: the comparisons hold as XLA:CPU rounds.
pytestmark = pytest.mark.usefixtures('on_cpu')

PARAMS = {
    'native': jnp.linspace(-1, 1, 16 * 512).reshape(16, 512),
    'flat': jnp.linspace(-1, 1, 3000).reshape(3, 1000),
    'bf16': jnp.linspace(-2, 2, 8 * 256).reshape(8, 256).astype(jnp.bfloat16),
    'small': jnp.ones((10,), jnp.bfloat16),
}
# Each run takes the leaves whose host layouts it is about: each eager
# step recompiles every leaf's kernel in the interpreter (seconds, a
# 2048-lane flat leaf's most). Without a master, a float32 native leaf,
# a flat one and a small one (XLA); a bf16 native leaf moves as the
# float32 one does. With one, only 16-bit leaves take a master, so the
# float32 leaves would repeat the run without one: the bf16 native leaf
# with its correction, and the small one with its master in XLA.
LEAVES = {None: ('native', 'flat', 'small'), 24: ('bf16', 'small')}


def _run(budget, master_weight_bits, factory=optax_paged.paged_adamw8bit,
         params=PARAMS):
  with tpu_transform.force('interpret'):
    tx = factory(
        1e-2, weight_decay=0.01, device_budget=budget, min_8bit_size=1000,
        master_weight_bits=master_weight_bits)
  state = tx.init(params)
  for i in range(2):
    grads = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)).astype(x.dtype),
                         params)
    params, state = optax_paged.apply_gradients(tx, grads, state, params)
  return tx, params, state


def _saved(state):
  saved = optax_paged.state_dict(state)
  for leaf in saved['leaves']:
    leaf.pop('tier')
  return saved


def _equal(a, b):
  return jax.tree.all(jax.tree.map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


# tests/tpu_kernel4_test.py runs it for paged_adamw4bit with a 24-bit master
# (behind the slow marker: pytest -m slow).
@pytest.mark.parametrize('master_weight_bits', [None, 24])
def test_host_tier_steps_as_the_device_tier(
    master_weight_bits, factory=optax_paged.paged_adamw8bit):
  params = {k: PARAMS[k] for k in LEAVES[master_weight_bits]}
  _, device_params, device_state = _run(None, master_weight_bits, factory,
                                        params)
  tx, host_params, host_state = _run(0, master_weight_bits, factory, params)
  assert {ls.tier for ls in host_state.leaves.values()} == {'host'}
  native = 'bf16' if master_weight_bits else 'native'
  codes = host_state.leaves[native].moments[0].codes
  # Narrow arrays are kept one row (a shard) in host memory (4-bit codes:
  # two a byte; a master's correction one an element).
  per_byte = 2 if factory is optax_paged.paged_adamw4bit else 1
  assert codes.shape == (PARAMS[native].size // per_byte,)
  if master_weight_bits:
    assert host_state.leaves['bf16'].master.correction.shape == (8 * 256,)
  assert codes.sharding.memory_kind == 'pinned_host'
  assert _equal(device_params, host_params)
  assert _equal(_saved(device_state), _saved(host_state))
  if master_weight_bits:
    assert _equal(optax_paged.master_params(device_state, device_params),
                  optax_paged.master_params(host_state, host_params))
  # A checkpoint restores into the host tier in its host layout.
  restored = optax_paged.load_state_dict(tx.init(params),
                                         optax_paged.state_dict(device_state))
  fresh = tx.init(params)
  assert ([(x.shape, x.sharding.memory_kind) for x in jax.tree.leaves(restored)]
          == [(x.shape, x.sharding.memory_kind)
              for x in jax.tree.leaves(fresh)])
  assert _equal(_saved(restored), _saved(device_state))
