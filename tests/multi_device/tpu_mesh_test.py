"""The TPU path on a mesh of 4 CPU devices, in Pallas' TPU interpreter:
sharded steps against the one-device run, and the registry's sharded
checkpoint format both ways (tpu_sharded_checkpoint).

Each kernel runs on its shard under ``jax.shard_map``, replicated leaves
too: the interpreter makes all devices of a call meet at barriers, so every
kernel of a step must be a call over the whole mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged
from optax_paged._src import tpu_transform
from optax_paged._src.tpu_state import TpuState
from tests.helpers import assert_trees_equal

# Last dimension split in 256s, first dimension split, a float32-moment
# leaf split in whole fingerprint blocks, a replicated 8-bit leaf, and a
# replicated flat one.
SPECS = {
    'cols': ((16, 1024), P(None, 'x')),
    'rows': ((64, 256), P('x', None)),
    'bias': ((512,), P('x')),
    'rep': ((8, 256), P()),
    'flat': ((4096,), P()),
}
# The leaves of the interpreted runs: a flat leaf's 2048-lane tile is slow
# to interpret (its sharded step equals the one-device step as well,
# checked once by hand), so it is checked in checkpoints only.
RUN = ('cols', 'rows', 'bias', 'rep')
MASTER_RUN = ('cols', 'rows', 'bias')  # bfloat16, 24-bit master
STEPS = 2
pytestmark = pytest.mark.skipif(jax.device_count() != 4,
                                reason='needs 4 devices')


def _mesh(shape=(4,), names=('x',)):
  return jax.make_mesh(shape, names)


def _tree(names, seed, dtype, scale=1.0):
  key = jax.random.PRNGKey(seed)
  return {k: (jax.random.normal(jax.random.fold_in(key, i), SPECS[k][0])
              * scale).astype(dtype) for i, k in enumerate(names)}


def _put(tree, mesh, specs=None):
  return {k: jax.device_put(v, NamedSharding(
      mesh, (specs or {})[k] if specs else SPECS[k][1]))
          for k, v in tree.items()}


def _make(path, bits=None):
  make = functools.partial(optax_paged.adamw8bit, 1e-2, weight_decay=0.1,
                           min_8bit_size=1024, master_weight_bits=bits)
  if path == 'tpu':
    with tpu_transform.force('interpret'):
      return make()
  return make()


@functools.cache
def _tx(path, bits=None):
  return _make(path, bits)


@functools.cache
def _step(tx):
  return jax.jit(lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p))


def _run(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    # Waited for: JAX work dispatched while the interpreter's callbacks of
    # a step on the mesh run can deadlock with them.
    params, state = jax.block_until_ready(_step(tx)(g, state, params))
  return params, state


@functools.cache
def _runs(path, names, dtype, bits=None, mesh=True):
  """(params, state) after STEPS fused steps, on the mesh or one device."""
  params = _tree(names, 0, dtype)
  grads = [_tree(names, 10 + i, dtype, 0.1) for i in range(STEPS)]
  if mesh:
    params = _put(params, _mesh())
    grads = [_put(g, _mesh()) for g in grads]
  return _run(_tx(path, bits), params, grads)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint16) if x.dtype.itemsize == 2 else x


@pytest.mark.parametrize('names, dtype, bits', [
    (RUN, jnp.float32, None),
    (MASTER_RUN, jnp.bfloat16, 24),
], ids=['fp32', 'bf16-master24'])
def test_sharded_run_equals_one_device_run_bit_for_bit(names, dtype, bits):
  p_mesh, s_mesh = _runs('tpu', names, dtype, bits)
  p_one, s_one = _runs('tpu', names, dtype, bits, mesh=False)
  assert isinstance(s_mesh, TpuState)
  for k in names:
    assert p_mesh[k].sharding.is_equivalent_to(
        NamedSharding(_mesh(), SPECS[k][1]), p_mesh[k].ndim)
    np.testing.assert_array_equal(_bits(p_mesh[k]), _bits(p_one[k]))
  leaves = jax.tree.leaves(s_mesh.leaves)
  for a, b in zip(leaves, jax.tree.leaves(s_one.leaves), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  codes = s_mesh.leaves['cols'].moments[0].codes
  assert codes.sharding.spec == SPECS['cols'][1]
  assert {s.data.shape for s in codes.addressable_shards} == {(16, 256)}


def test_stochastic_rounding_on_a_mesh_draws_one_devices_bits():
  # Each shard's element indices come from its offsets in the whole leaf
  # (columns, rows, a float32-moment leaf in XLA).
  names = MASTER_RUN
  tx = _tx('tpu')
  step = jax.jit(lambda g, s, p: optax_paged.apply_gradients(
      tx, g, s, p, stochastic_rounding=True))
  params = _tree(names, 0, jnp.bfloat16)
  grads = _tree(names, 10, jnp.bfloat16, 0.1)
  one, _ = step(grads, tx.init(params), params)
  params, grads = _put(params, _mesh()), _put(grads, _mesh())
  sharded, _ = jax.block_until_ready(step(grads, tx.init(params), params))
  nearest, _ = jax.block_until_ready(
      _step(tx)(grads, tx.init(params), params))
  for k in names:
    np.testing.assert_array_equal(_bits(sharded[k]), _bits(one[k]))
    assert np.any(_bits(sharded[k]) != _bits(nearest[k]))


def _saved_arrays(saved):
  """name path -> (shape, dtype, spec) of a sharded state dictionary."""
  return {jax.tree_util.keystr(path): (
      np.shape(x), np.asarray(x).dtype,
      getattr(getattr(x, 'sharding', None), 'spec', None))
          for path, x in jax.tree_util.tree_flatten_with_path(saved)[0]}


@pytest.mark.parametrize('names, dtype, bits', [
    (RUN, jnp.float32, None),
    (MASTER_RUN, jnp.bfloat16, 24),
], ids=['fp32', 'bf16-master24'])
def test_checkpoints_move_between_the_paths_on_a_mesh(names, dtype, bits):
  _, s_tpu = _runs('tpu', names, dtype, bits)
  _, s_reg = _runs('registry', names, dtype, bits)
  tpu_saved = optax_paged.state_dict(s_tpu)
  reg_saved = optax_paged.state_dict(s_reg)
  # The registry's format: arrays, shapes, dtypes and shardings.
  assert _saved_arrays(tpu_saved) == _saved_arrays(reg_saved)
  assert 'mesh_shape' in tpu_saved and 'checksum' not in tpu_saved
  # The same moments, but for the update's rounding (FMA contraction in
  # the interpreter, tests/tpu_kernel_test.py): in the same block order.
  for a, b in zip(tpu_saved['leaves'], reg_saved['leaves'], strict=True):
    for ma, mb in zip(a['moments'], b['moments'], strict=True):
      for name in ma:
        x, y = np.asarray(ma[name]), np.asarray(mb[name])
        if name == 'codes':
          assert np.mean(x != y) < 1e-3
        else:
          np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
  # Each checkpoint loads into the other path's state and exports the same
  # dictionary bit for bit, per-device checksums included.
  params = _put(_tree(names, 0, dtype), _mesh())
  into_tpu = optax_paged.load_state_dict(_tx('tpu', bits).init(params),
                                         reg_saved)
  assert_trees_equal(optax_paged.state_dict(into_tpu), reg_saved)
  into_reg = optax_paged.load_state_dict(_tx('registry', bits).init(params),
                                         tpu_saved)
  assert_trees_equal(optax_paged.state_dict(into_reg), tpu_saved)
  if bits:
    return  # the step below, interpreted once more, is checked in fp32
  # The loaded TPU state trains on: its next step is the registry's (but
  # for code flips).
  grads = _put(_tree(names, 99, dtype, 0.1), _mesh())
  p_tpu, _ = _step(_tx('tpu', bits))(grads, into_tpu, params)
  p_reg, _ = _step(_tx('registry', bits))(
      grads, optax_paged.load_state_dict(_tx('registry', bits).init(params),
                                         reg_saved), params)
  for k in names:
    a, b = np.asarray(p_tpu[k], np.float32), np.asarray(p_reg[k], np.float32)
    assert np.mean(~np.isclose(a, b, rtol=1e-5, atol=1e-6)) < 1e-3, k


def test_refusals_are_the_registrys():
  names = RUN
  _, s_tpu = _runs('tpu', names, jnp.float32)
  saved = optax_paged.state_dict(s_tpu)
  tx = _tx('tpu')
  params = _tree(names, 0, jnp.float32)
  # Another mesh shape.
  other = _mesh((2, 2), ('a', 'b'))
  specs = {'cols': P(None, ('a', 'b')), 'rows': P(('a', 'b'), None),
           'bias': P(('a', 'b')), 'rep': P()}
  with pytest.raises(ValueError, match='same mesh'):
    optax_paged.load_state_dict(tx.init(_put(params, other, specs)), saved)
  # One device.
  with pytest.raises(ValueError, match='on a mesh'):
    optax_paged.load_state_dict(tx.init(params), saved)
  # A corrupted byte.
  mesh_params = _put(params, _mesh())
  cols = sorted(names).index('cols')
  codes = saved['leaves'][cols]['moments'][0]['codes']
  bad = jax.device_put(np.asarray(codes) ^ np.uint8(1), codes.sharding)
  corrupted = jax.tree.map(lambda x: x, saved)
  corrupted['leaves'][cols]['moments'][0]['codes'] = bad
  with pytest.raises(ValueError, match='checksum mismatch'):
    optax_paged.load_state_dict(tx.init(mesh_params), corrupted)
  # A ZeRO-1 checkpoint of the registry.
  zero = optax_paged.shard_state_over(_tx('registry'), 'x')
  with pytest.raises(ValueError, match='ZeRO-1'):
    optax_paged.load_state_dict(
        tx.init(mesh_params),
        optax_paged.state_dict(zero.init(mesh_params)))
  # Master weights into a state without them.
  _, s_master = _runs('tpu', MASTER_RUN, jnp.bfloat16, 24)
  with pytest.raises(ValueError, match='master'):
    optax_paged.load_state_dict(
        tx.init(_put(_tree(MASTER_RUN, 0, jnp.bfloat16), _mesh())),
        optax_paged.state_dict(s_master))
  # An unsharded checkpoint still loads into a state on a mesh.
  unsharded = optax_paged.state_dict(
      _runs('tpu', names, jnp.float32, mesh=False)[1])
  restored = optax_paged.load_state_dict(tx.init(mesh_params), unsharded)
  assert_trees_equal(optax_paged.state_dict(restored), saved)


def test_unaligned_float32_moment_fingerprints_are_refused():
  # The TPU path fingerprints a float32-moment leaf whole, the registry
  # per shard: 16 elements a shard are not whole blocks of 128.
  tx = _tx('tpu', 24)
  w = jax.device_put(jnp.ones((64,), jnp.bfloat16),
                     NamedSharding(_mesh(), P('x')))
  with pytest.raises(ValueError, match='whole blocks of 128'):
    optax_paged.state_dict(tx.init({'w': w}))


def test_orbax_round_trip(tmp_path):
  names = MASTER_RUN
  _, s_tpu = _runs('tpu', names, jnp.bfloat16, 24)
  saved = optax_paged.state_dict(s_tpu)
  params = _put(_tree(names, 0, jnp.bfloat16), _mesh())
  fresh = _tx('tpu', 24).init(params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', saved)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / 'ckpt',
                                    optax_paged.state_dict(fresh))
  cols = sorted(names).index('cols')  # leaves in the tree's order
  codes = restored['leaves'][cols]['moments'][0]['codes']
  assert codes.sharding.spec == SPECS['cols'][1]
  resumed = optax_paged.load_state_dict(fresh, restored)
  assert_trees_equal(optax_paged.state_dict(resumed), saved)
  into_reg = optax_paged.load_state_dict(
      _tx('registry', 24).init(params), restored)
  assert_trees_equal(optax_paged.state_dict(into_reg), saved)


def test_flat_and_host_tier_leaves_take_the_registrys_checkpoint():
  # A replicated flat leaf is one shard, the whole leaf; a host leaf's
  # codes and corrections are kept one row a shard (tpu_host_tier).
  names = tuple(SPECS)
  _, s_reg = _runs('registry', names, jnp.bfloat16, 24)
  saved = optax_paged.state_dict(s_reg)
  params = _put(_tree(names, 0, jnp.bfloat16), _mesh())
  with tpu_transform.force('interpret'):
    paged = optax_paged.paged_adamw8bit(1e-2, weight_decay=0.1,
                                        min_8bit_size=1024,
                                        master_weight_bits=24,
                                        device_budget=0)
  for tx in (_tx('tpu', 24), paged):
    state = optax_paged.load_state_dict(tx.init(params), saved)
    assert_trees_equal(optax_paged.state_dict(state), saved)
  assert {ls.tier for ls in state.leaves.values()} == {'host'}
  assert state.leaves['rows'].moments[0].codes.ndim == 3  # one row a shard


# 4-bit Lion (stochastic rounding: each shard draws the bits of its
# elements' indices in the whole leaf): the last dimension split in 256s,
# the first, the first of three (the view's L rows) and a float32-moment
# leaf (leaf 0: the key counts every leaf). Replicated leaves take the
# 8-bit tests' path.
FOUR_BIT_SPECS = {
    'bias': ((512,), P('x')),
    'cols': ((16, 1024), P(None, 'x')),
    'cube': ((8, 4, 256), P('x', None, None)),
    'rows': ((64, 256), P('x', None)),
}


@functools.cache
def _tx4(path):
  make = functools.partial(optax_paged.lion4bit, 1e-2, weight_decay=0.1,
                           min_8bit_size=1024)
  if path == 'tpu':
    with tpu_transform.force('interpret'):
      return make()
  return make()


def _tree4(seed, scale=1.0):
  key = jax.random.PRNGKey(seed)
  return {k: jax.random.normal(jax.random.fold_in(key, i), shape) * scale
          for i, (k, (shape, _)) in enumerate(FOUR_BIT_SPECS.items())}


@functools.cache
def _runs4(path, mesh=True):
  params = _tree4(0)
  grads = [_tree4(10 + i, 0.1) for i in range(STEPS)]
  if mesh:
    specs = {k: spec for k, (_, spec) in FOUR_BIT_SPECS.items()}
    params = _put(params, _mesh(), specs)
    grads = [_put(g, _mesh(), specs) for g in grads]
  return _run(_tx4(path), params, grads)


def test_four_bit_sharded_run_and_checkpoints():
  p_mesh, s_mesh = _runs4('tpu')
  p_one, s_one = _runs4('tpu', mesh=False)
  assert s_mesh.code_bits == 4
  for k in FOUR_BIT_SPECS:
    np.testing.assert_array_equal(np.asarray(p_mesh[k]), np.asarray(p_one[k]))
  for a, b in zip(jax.tree.leaves(s_mesh.leaves),
                  jax.tree.leaves(s_one.leaves), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  codes = s_mesh.leaves['cols'].moments[0].codes
  assert {s.data.shape for s in codes.addressable_shards} == {(16, 128)}
  # The registry's sharded 4-bit checkpoint, both ways, bit for bit.
  _, s_reg = _runs4('registry')
  tpu_saved = optax_paged.state_dict(s_mesh)
  reg_saved = optax_paged.state_dict(s_reg)
  assert _saved_arrays(tpu_saved) == _saved_arrays(reg_saved)
  specs = {k: spec for k, (_, spec) in FOUR_BIT_SPECS.items()}
  params = _put(_tree4(0), _mesh(), specs)
  into_tpu = optax_paged.load_state_dict(_tx4('tpu').init(params), reg_saved)
  assert_trees_equal(optax_paged.state_dict(into_tpu), reg_saved)
  into_reg = optax_paged.load_state_dict(_tx4('registry').init(params),
                                         tpu_saved)
  assert_trees_equal(optax_paged.state_dict(into_reg), tpu_saved)
