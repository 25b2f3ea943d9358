"""Every view of "Many devices" on a one-device mesh equals one device.

A single GPU (or the CPU) gives ``jax.make_mesh((1,), ('data',))``: whoever
copies the recipes of docs/many_devices.md there gets a mesh of one device,
and each view must run and give the plain one-device result bit for bit.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged
from tests.helpers import assert_trees_equal
from tests.helpers import update_and_apply
from tests.readme_many_devices_test import _recipes
from tests.readme_many_devices_test import assert_recipe_ran
from tests.readme_many_devices_test import background_job

BACKGROUND_JOBS = background_job('')

SPECS = {'rows': P('data', None), 'cols': P(None, 'model'), 'bias': P()}


def _mesh():
  return jax.make_mesh((1, 1), ('data', 'model'))


def _tree(seed, scale=1.0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  shapes = {'rows': (512, 16), 'cols': (64, 80), 'bias': (300,)}
  return {name: jax.random.normal(k, shape) * scale
          for k, (name, shape) in zip(keys, shapes.items(), strict=True)}


def _put(tree, mesh):
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
          for k, v in tree.items()}


def _make():
  return optax_paged.adamw8bit(1e-2, weight_decay=0.1, min_8bit_size=256)


def _fused(tx):
  return lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p)


def _run(tx, params, grads, step):
  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _manual(step, mesh, axes=None, check_vma=True):
  specs = SPECS if axes is None else {
      k: P(*[a if a in axes else None for a in s]) for k, s in SPECS.items()}
  return jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(specs, P(), specs), out_specs=(specs, P()),
      axis_names=set(axes or mesh.axis_names), check_vma=check_vma))


@pytest.mark.parametrize('fused', [False, True], ids=['update', 'fused'])
@pytest.mark.parametrize('view', ['jit', 'shard_map', 'partial_shard_map'])
def test_each_view_equals_one_device(view, fused):
  mesh = _mesh()
  params, grads = _tree(0), [_tree(10 + i, 0.1) for i in range(2)]
  make_step = _fused if fused else update_and_apply
  p_one, s_one = _run(_make(), params, grads, jax.jit(make_step(_make())))
  tx = _make()
  step = {
      'jit': lambda f: jax.jit(f),
      'shard_map': lambda f: _manual(f, mesh),
      'partial_shard_map': lambda f: _manual(f, mesh, axes={'data'}),
  }[view](make_step(tx))
  p_mesh, s_mesh = _run(tx, _put(params, mesh),
                        [_put(g, mesh) for g in grads], step)
  assert_trees_equal(p_mesh, p_one)
  assert_trees_equal(optax_paged.state_dict(s_mesh),
                     optax_paged.state_dict(s_one))


@pytest.mark.parametrize('view', ['jit', 'shard_map'])
def test_zero1_and_accumulation_equal_one_device(view):
  mesh = _mesh()
  params, grads = _tree(1), [_tree(20 + i, 0.1) for i in range(4)]
  # ZeRO-1's gathered results carry no replication type (as on any mesh).
  wrap = jax.jit if view == 'jit' else lambda f: _manual(f, mesh,
                                                          check_vma=False)
  zero = optax_paged.shard_state_over(_make(), 'data')
  p_one, _ = _run(_make(), params, grads[:2], jax.jit(_fused(_make())))
  p_zero, _ = _run(zero, _put(params, mesh),
                   [_put(g, mesh) for g in grads[:2]], wrap(_fused(zero)))
  assert_trees_equal(p_zero, p_one)
  acc = optax_paged.accumulate_gradients(_make(), every_k=2)
  p_acc, _ = _run(acc, _put(params, mesh), [_put(g, mesh) for g in grads],
                  wrap(update_and_apply(acc)))
  means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1])
           for i in (0, 2)]
  p_mean, _ = _run(_make(), params, means, jax.jit(update_and_apply(_make())))
  assert_trees_equal(p_acc, p_mean)


def test_state_made_in_jit_then_allocated_steps_in_shard_map():
  mesh = _mesh()
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  tx = _make()

  def create(key):
    params = jax.tree.map(lambda x: x + jax.random.normal(key, x.shape),
                          _tree(2))
    return params, tx.init(params)

  params, state = jax.jit(create, out_shardings=(shardings, None))(
      jax.random.PRNGKey(0))
  state = optax_paged.allocate_state(state, params)
  grads = _put(_tree(30, 0.1), mesh)
  result, state = _manual(update_and_apply(tx), mesh)(params, state, grads)
  one = jax.tree.map(jnp.asarray, params)
  expected, _ = jax.jit(update_and_apply(_make()))(
      one, _make().init(one), jax.tree.map(jnp.asarray, grads))
  assert_trees_equal(result, expected)


def test_discarded_updates_still_step_inside_shard_map():
  mesh = _mesh()
  tx = _make()
  params, grads = _put(_tree(3), mesh), _put(_tree(40, 0.1), mesh)
  state = tx.init(params)
  only_state = _manual(lambda p, s, g: (p, tx.update(g, s, p)[1]), mesh)
  for _ in range(2):
    _, state = only_state(params, state, grads)
  _, ref_state = _run(_make(), params, [grads, grads],
                      jax.jit(update_and_apply(_make())))
  assert int(state.count) == 2
  assert_trees_equal(optax_paged.state_dict(state),
                     optax_paged.state_dict(ref_state))


@pytest.mark.parametrize('index', range(len(_recipes())))
def test_readme_recipe_runs_on_one_device(index):
  assert_recipe_ran(index, '')
