"""A step on a mesh runs on every device or on none.

Two ways it once ran on some devices only: a jitted step whose updates are
discarded (JAX dropped the shard_map holding the update call, while the
count advanced), and a shard_map over the init mesh's devices in another
order (the misrouted devices refused their shard, the others applied
theirs). Either left the state split and unexportable.
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged
from optax_paged._src import sharding
from tests.helpers import assert_trees_equal
from tests.helpers import update_and_apply

SPECS = {'rows': P('data', None), 'grid': P('data', 'model'),
         'replicated': P()}
SHAPES = {'rows': (1024, 16), 'grid': (512, 32), 'replicated': (3000,)}


def _mesh(devices=None):
  devices = np.asarray(jax.devices()) if devices is None else devices
  return jax.sharding.Mesh(devices.reshape(2, -1), ('data', 'model'),
                           axis_types=(AxisType.Auto,) * 2)


def _tree(seed, scale=1.0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(SHAPES))
  return {name: jax.random.normal(k, shape) * scale
          for k, (name, shape) in zip(keys, SHAPES.items(), strict=True)}


def _put(tree, mesh):
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
          for k, v in tree.items()}


FACTORIES = {
    'adamw8bit': lambda: optax_paged.adamw8bit(1e-2, min_8bit_size=256),
    'lamb8bit': lambda: optax_paged.lamb8bit(1e-2, min_8bit_size=256),
    'zero1': lambda: optax_paged.shard_state_over(
        optax_paged.adamw8bit(1e-2, min_8bit_size=256), 'data'),
}


def _partial(specs):
  return {k: P(*[a if a == 'data' else None for a in s])
          for k, s in specs.items()}


def _state_only(view, tx, mesh):
  """A jitted step that returns the new state only, in ``view``."""
  update = lambda s, p, g: tx.update(g, s, p)[1]  # noqa: E731
  if view == 'jit':
    return jax.jit(update)
  if view == 'fused':
    return jax.jit(lambda s, p, g: optax_paged.apply_gradients(tx, g, s, p)[1])
  if view == 'nested_jit':
    return jax.jit(lambda s, p, g: jax.jit(tx.update)(g, s, p)[1])
  specs = SPECS if view == 'shard_map' else _partial(SPECS)
  return jax.jit(jax.shard_map(
      update, mesh=mesh, in_specs=(P(), specs, specs), out_specs=P(),
      axis_names={'data', 'model'} if view == 'shard_map' else {'data'},
      check_vma=False))


@pytest.mark.parametrize('name,view', [
    ('adamw8bit', 'jit'), ('adamw8bit', 'fused'), ('adamw8bit', 'nested_jit'),
    ('adamw8bit', 'shard_map'), ('adamw8bit', 'partial_shard_map'),
    ('lamb8bit', 'jit'), ('zero1', 'jit'),
])
def test_a_step_whose_updates_are_discarded_runs_on_every_device(name, view):
  mesh = _mesh()
  params, grads = _put(_tree(0), mesh), _put(_tree(1, 0.1), mesh)
  tx = FACTORIES[name]()
  step = _state_only(view, tx, mesh)
  state = tx.init(params)
  for _ in range(3):
    state = step(state, params, grads)
  # Waiting for the new state (its count) waits for every device's update,
  # as release and export do.
  jax.block_until_ready(state)
  record = state.buffers.record()
  assert [entry.moments_steps() for entry in record.entries] == [
      [3] * len(SHAPES)] * len(record.entries)
  # The same steps with their updates kept leave the same state.
  reference = FACTORIES[name]()
  ref_state = reference.init(params)
  keep = jax.jit(lambda s, p, g: reference.update(g, s, p))
  for _ in range(3):
    _, ref_state = keep(ref_state, params, grads)
  assert_trees_equal(optax_paged.state_dict(state),
                     optax_paged.state_dict(ref_state))
  # A later state that takes this one's id runs the same compiled step.
  state_id = state.buffers.state_id
  del state, record
  gc.collect()
  later = tx.init(params)
  assert later.buffers.state_id == state_id
  later = jax.block_until_ready(step(later, params, grads))
  assert later.buffers.record().moments_step() == 1
  assert int(optax_paged.state_dict(later)['count']) == 1


def _moments(state):
  record = state.buffers.record()
  return [entry.read_moment(i, m) for entry in record.entries
          for i in range(len(SHAPES)) for m in range(2)]


def _assert_same_moments(a, b):
  for (codes, absmax), (codes2, absmax2) in zip(a, b, strict=True):
    np.testing.assert_array_equal(codes, codes2)
    if absmax is not None:
      np.testing.assert_array_equal(absmax, absmax2)


@pytest.mark.parametrize('view', ['shard_map', 'partial_shard_map', 'jit'])
def test_a_mesh_reordered_after_init_is_refused_before_any_device_steps(
    view):
  mesh = _mesh()
  # Devices 0 and 1 swap places; 2 and 3 keep theirs (they alone would
  # have stepped).
  devices = np.asarray(jax.devices())
  devices[[0, 1]] = devices[[1, 0]]
  swapped = _mesh(devices)
  tx = FACTORIES['adamw8bit']()
  params, grads = _put(_tree(2), mesh), _put(_tree(3, 0.1), mesh)
  step = jax.jit(update_and_apply(tx))
  # The raw reads below do not wait for a step: the first one must be done.
  params, state = jax.block_until_ready(step(params, tx.init(params), grads))
  before, saved = _moments(state), optax_paged.state_dict(state)
  moved = state._replace(
      count=jax.device_put(state.count, NamedSharding(swapped, P())))
  specs = SPECS if view != 'partial_shard_map' else _partial(SPECS)
  wrong = {
      'jit': jax.jit(update_and_apply(tx)),
      'shard_map': jax.jit(jax.shard_map(
          update_and_apply(tx), mesh=swapped, in_specs=(specs, P(), specs),
          out_specs=(specs, P()), check_vma=False)),
      'partial_shard_map': jax.jit(jax.shard_map(
          update_and_apply(tx), mesh=swapped, in_specs=(specs, P(), specs),
          out_specs=(specs, P()), axis_names={'data'}, check_vma=False)),
  }[view]
  on_swapped = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(swapped, x.sharding.spec)),
      (params, grads))
  with pytest.raises(ValueError) as error:
    jax.block_until_ready(wrong(on_swapped[0], moved, on_swapped[1]))
  if view == 'jit':
    # JAX refuses a jit whose arguments' devices are not the mesh's of the
    # shard_map the update runs in (the state's mesh), before lowering it.
    assert 'incompatible devices' in str(error.value), error.value
  else:
    assert 'Use the mesh the parameters had at init' in str(error.value)
  _assert_same_moments(before, _moments(state))
  assert_trees_equal(optax_paged.state_dict(state), saved)
  # The state is whole: the next step on the init mesh runs everywhere.
  _, state = jax.block_until_ready(step(params, state, grads))
  assert state.buffers.record().moments_step() == 2


def test_a_one_device_mesh_must_be_the_state_device():
  first, second = jax.devices()[:2]
  on_second = jax.sharding.Mesh(np.asarray([second]), ('data',))
  on_first = jax.sharding.Mesh(np.asarray([first]), ('data',))
  tx = FACTORIES['adamw8bit']()
  spec = {'w': P('data', None)}

  def put(mesh):
    return {'w': jax.device_put(jnp.ones((512, 8)),
                                NamedSharding(mesh, spec['w']))}

  def local_step(mesh):
    return jax.jit(jax.shard_map(update_and_apply(tx), mesh=mesh,
                                 in_specs=(spec, P(), spec),
                                 out_specs=(spec, P())))

  state = tx.init(put(on_second))
  _, state = local_step(on_second)(put(on_second), state, put(on_second))
  assert int(state.count) == 1
  moved = state._replace(count=jax.device_put(state.count, first))
  with pytest.raises(ValueError, match=f'device {second.id}'):
    local_step(on_first)(put(on_first), moved, put(on_first))
  assert state.buffers.record().moments_step() == 1


def test_pmap_of_a_mesh_state_is_refused():
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ('data',))
  tx = FACTORIES['adamw8bit']()
  params = {'w': jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P()))}
  state = tx.init(params)
  stacked = {'w': jnp.ones((n, 64, 64))}
  # pmap over an axis of the state's own name is pmap still.
  with pytest.raises(ValueError) as error:
    jax.pmap(lambda g, s, p: tx.update(g, s, p)[0], in_axes=(0, None, 0),
             axis_name='data')(stacked, state, stacked)
  assert str(error.value) == sharding.PMAP_MSG
  assert state.buffers.record().moments_step() == 0
