"""Master weights on a 2x2 mesh: every view, ZeRO-1 and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax_paged
from tests.helpers import assert_trees_equal
from tests.multi_device.mesh_test import EXACT
from tests.multi_device.mesh_test import SPECS
from tests.multi_device.mesh_test import _mesh
from tests.multi_device.mesh_test import _put
from tests.multi_device.mesh_test import _run
from tests.multi_device.mesh_test import _shards_as_leaves
from tests.multi_device.mesh_test import _tree


def _make(bits):
  return optax_paged.adamw8bit(1e-2, weight_decay=0.1, min_8bit_size=256,
                               master_weight_bits=bits)


def _bits16(x):
  return np.asarray(x).view(np.uint16)


@pytest.mark.parametrize('bits, fused', [(24, True), (32, False)],
                         ids=['24-fused', '32-update'])
def test_sharded_masters_equal_one_device_and_per_shard_runs(bits, fused):
  # Fingerprint blocks are local to a shard, as quantization blocks are.
  mesh = _mesh()
  params = _tree(0, jnp.bfloat16)
  grads = [_tree(10 + i, jnp.bfloat16, 0.1) for i in range(3)]
  p_mesh, _ = _run(_make(bits), _put(params, mesh),
                   [_put(g, mesh) for g in grads], fused)
  p_one, _ = _run(_make(bits), params, grads, fused)
  for leaf in EXACT:
    np.testing.assert_array_equal(_bits16(p_mesh[leaf]), _bits16(p_one[leaf]))
  p_shards, _ = _run(_make(bits), {str(k): v for k, v in
                                   _shards_as_leaves(params, mesh).items()},
                     [{str(k): v for k, v in
                       _shards_as_leaves(g, mesh).items()} for g in grads],
                     fused)
  for key, value in _shards_as_leaves(p_mesh, mesh).items():
    np.testing.assert_array_equal(_bits16(value), _bits16(p_shards[str(key)]))


def test_shard_map_view_keeps_the_same_masters():
  mesh = _mesh()
  params = _tree(1, jnp.bfloat16)
  grads = [_tree(20 + i, jnp.bfloat16, 0.1) for i in range(3)]
  run = lambda jit: _run(_make(32), _put(params, mesh),  # noqa: E731
                         [_put(g, mesh) for g in grads], False, jit)
  reference, ref_state = run(jax.jit)
  manual = lambda step: jax.jit(jax.shard_map(  # noqa: E731
      step, mesh=mesh, in_specs=(SPECS, P(), SPECS),
      out_specs=(SPECS, P()), check_vma=False))
  result, state = run(manual)
  assert_trees_equal(result, reference)
  assert_trees_equal(optax_paged.state_dict(state),
                     optax_paged.state_dict(ref_state))


@pytest.mark.parametrize('fused', [False, True], ids=['update', 'fused'])
def test_zero1_masters_are_bit_identical_to_replicated_state(fused):
  mesh = _mesh()
  params = _tree(4, jnp.bfloat16)
  grads = [_tree(40 + i, jnp.bfloat16, 0.1) for i in range(3)]
  zero = optax_paged.shard_state_over(_make(24), 'data')
  p_zero, s_zero = _run(zero, _put(params, mesh),
                        [_put(g, mesh) for g in grads], fused)
  p_rep, _ = _run(_make(24), _put(params, mesh),
                  [_put(g, mesh) for g in grads], fused)
  assert_trees_equal(p_zero, p_rep)
  rows = {r.path: r.bytes for r in optax_paged.memory_report(s_zero).rows}
  assert rows["['replicated']"] > 0


def test_checkpoint_round_trip_with_masters():
  mesh = _mesh()
  params = _put(_tree(9, jnp.bfloat16), mesh)
  grads = [_put(_tree(90 + i, jnp.bfloat16, 0.1), mesh) for i in range(4)]
  tx = optax_paged.shard_state_over(_make(32), 'data')
  p_full, s_full = _run(tx, params, grads, False)
  p_half, s_half = _run(tx, params, grads[:2], False)
  saved = optax_paged.state_dict(s_half)
  grid = sorted(SPECS).index('grid')
  master = saved['leaves'][grid]['master']
  assert master['correction'].dtype == jnp.int16
  assert master['correction'].sharding.spec == SPECS['grid']
  fresh = optax_paged.load_state_dict(tx.init(p_half), saved)
  p, s = p_half, fresh
  step = jax.jit(lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p))
  for g in grads[2:]:
    # update + apply above, fused here: the same parameters either way.
    p, s = step(p, s, g)
  assert_trees_equal(p, p_full)
  assert_trees_equal(optax_paged.state_dict(s), optax_paged.state_dict(s_full))
  plain = optax_paged.shard_state_over(
      optax_paged.adamw8bit(1e-2, weight_decay=0.1, min_8bit_size=256),
      'data')
  with pytest.raises(ValueError, match='keeps master weights'):
    optax_paged.load_state_dict(plain.init(p_half), saved)


@pytest.mark.parametrize('zero', [False, True], ids=['fsdp', 'zero1'])
def test_master_params_on_a_mesh_equal_one_device_s(zero):
  # The exact leaves' shards are contiguous runs of the one-device leaf, so
  # their masters match it; each comes back sharded as its parameter.
  mesh = _mesh()
  params = _tree(2, jnp.bfloat16)
  grads = [_tree(30 + i, jnp.bfloat16, 0.1) for i in range(3)]
  tx = _make(32)
  if zero:
    tx = optax_paged.shard_state_over(tx, 'data')
  p_mesh, s_mesh = _run(tx, _put(params, mesh),
                        [_put(g, mesh) for g in grads], True)
  p_one, s_one = _run(_make(32), params, grads, True)
  m_mesh = optax_paged.master_params(s_mesh, p_mesh)
  m_one = optax_paged.master_params(s_one, p_one)
  for leaf in EXACT:
    assert m_mesh[leaf].sharding == p_mesh[leaf].sharding
    np.testing.assert_array_equal(np.asarray(m_mesh[leaf]),
                                  np.asarray(m_one[leaf]))
  for leaf in m_mesh:
    # Every leaf: the masters lie within a bf16 ulp of their parameters.
    np.testing.assert_allclose(np.asarray(m_mesh[leaf]),
                               np.asarray(p_mesh[leaf], np.float32),
                               rtol=2 ** -7, atol=0)
