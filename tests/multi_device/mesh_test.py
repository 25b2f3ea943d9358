"""Optimizer states on a 2x2 mesh: every view, every optimizer, bit for bit.

References: a leaf split into contiguous 256-aligned row ranges, a
replicated leaf and a ZeRO-1 state equal the one-device run; any other
split equals running each shard as a leaf of its own.
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged
from optax_paged._src import ffi
from tests.helpers import assert_trees_equal
from tests.helpers import refusal_of
from tests.helpers import update_and_apply

SPECS = {
    'rows': P('data', None),
    'grid': P('data', 'model'),
    'cols': P(None, 'model'),
    'flat_rows': P(('data', 'model')),
    'replicated': P(),
}
SHAPES = {
    'rows': (1024, 48),
    'grid': (512, 96),
    'cols': (256, 40),
    'flat_rows': (2048, 16),
    'replicated': (3000,),
}
# Leaves whose shards are whole, contiguous blocks of the flattened leaf.
EXACT = ('rows', 'flat_rows', 'replicated')

FACTORIES = {
    'adamw8bit': lambda: optax_paged.adamw8bit(1e-2, weight_decay=0.1,
                                               min_8bit_size=256),
    'adamw4bit': lambda: optax_paged.adamw4bit(1e-2, weight_decay=0.1,
                                               min_8bit_size=256),
    'paged_adamw': lambda: optax_paged.paged_adamw(1e-2, weight_decay=0.1),
    'lion8bit': lambda: optax_paged.lion8bit(1e-3, min_8bit_size=256),
    'ademamix8bit': lambda: optax_paged.ademamix8bit(1e-2, min_8bit_size=256),
    'sgd8bit': lambda: optax_paged.sgd8bit(1e-2, momentum=0.9,
                                           min_8bit_size=256),
    'rmsprop8bit': lambda: optax_paged.rmsprop8bit(1e-2, min_8bit_size=256),
    'adagrad8bit': lambda: optax_paged.adagrad8bit(1e-2, min_8bit_size=256),
}


def _devices() -> int:
  return jax.device_count()


def _mesh(axis_type=AxisType.Auto):
  # 2x2 on four CPU devices; 2x1 on two GPUs.
  return jax.make_mesh((2, _devices() // 2), ('data', 'model'),
                       axis_types=(axis_type,) * 2)


def _tree(seed, dtype, scale=1.0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(SHAPES))
  return {
      name: (jax.random.normal(k, shape) * scale).astype(dtype)
      for k, (name, shape) in zip(keys, SHAPES.items(), strict=True)
  }


def _put(tree, mesh):
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
          for k, v in tree.items()}


def _fused(tx):
  return lambda p, s, g: optax_paged.apply_gradients(tx, g, s, p)


def _run(tx, params, grads_list, fused, jit=jax.jit):
  state = tx.init(params)
  step = jit(_fused(tx) if fused else update_and_apply(tx))
  for grads in grads_list:
    params, state = step(params, state, grads)
  return params, state


def _shards_as_leaves(tree, mesh):
  """Each device-0..3 shard of each leaf as a leaf of its own."""
  out = {}
  for name, value in tree.items():
    sharding = NamedSharding(mesh, SPECS[name])
    seen = set()
    for index in sharding.devices_indices_map(value.shape).values():
      key = tuple((s.start, s.stop) for s in index)
      if key in seen:
        continue
      seen.add(key)
      out[(name, key)] = np.asarray(value)[index]
  return out


def _equal(a, b):
  np.testing.assert_array_equal(np.asarray(a, np.float32),
                                np.asarray(b, np.float32))


def _pairwise_cases():
  # Every optimizer in every dtype; the step (update and apply, or fused)
  # alternates, so each optimizer and each dtype runs both steps: a pairwise
  # cover of (optimizer, dtype, step): whatever a mesh could break for one
  # optimizer, one dtype or one step, or for a pair of them, has a case.
  dtypes = [jnp.float32, jnp.bfloat16, jnp.float16]
  return [
      pytest.param(name, dtype, bool((i + j) % 2),
                   id=f'{name}-{jnp.dtype(dtype).name}-'
                      f'{"fused" if (i + j) % 2 else "update"}')
      for i, name in enumerate(FACTORIES)
      for j, dtype in enumerate(dtypes)
  ]


@pytest.mark.parametrize('name, dtype, fused', _pairwise_cases())
def test_sharded_equals_one_device_and_per_shard_runs(name, dtype, fused):
  mesh = _mesh()
  params = _tree(0, dtype)
  grads = [_tree(10 + i, dtype, 0.1) for i in range(3)]
  make = FACTORIES[name]
  p_mesh, _ = _run(make(), _put(params, mesh), [_put(g, mesh) for g in grads],
                   fused)
  p_one, _ = _run(make(), params, grads, fused)
  for leaf in EXACT:
    _equal(p_mesh[leaf], p_one[leaf])
  # Every other split: the same algorithm run on each shard as a leaf.
  p_shards, _ = _run(make(), {str(k): v for k, v in
                              _shards_as_leaves(params, mesh).items()},
                     [{str(k): v for k, v in
                       _shards_as_leaves(g, mesh).items()} for g in grads],
                     fused)
  for key, value in _shards_as_leaves(p_mesh, mesh).items():
    _equal(value, p_shards[str(key)])


def test_four_bit_state_on_the_mesh_restores_bit_identically():
  # 4-bit codes are saved as a row of bytes per shard, not parameter-shaped.
  mesh = _mesh()
  params = _put(_tree(0, jnp.float32), mesh)
  grads = [_put(_tree(10 + i, jnp.float32, 0.1), mesh) for i in range(3)]
  make = FACTORIES['adamw4bit']
  p, state = _run(make(), params, grads[:2], False)
  saved = optax_paged.state_dict(state)
  assert int(saved['code_bits']) == 4
  restored = optax_paged.load_state_dict(make().init(params), saved)
  step = jax.jit(update_and_apply(make()))
  assert_trees_equal(step(p, restored, grads[2])[0],
                     step(p, state, grads[2])[0])


@pytest.mark.parametrize('fused', [False, True], ids=['update', 'fused'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_four_bit_lion_rounds_its_codes_by_global_index(dtype, fused):
  # 4-bit Lion rounds its momentum codes with random bits of (step, leaf,
  # element in the whole leaf): a contiguous shard draws what one device
  # draws, so those leaves match one device bit for bit. (A shard run as a
  # leaf of its own draws other bits: no per-shard comparison here.)
  mesh = _mesh()
  params = _tree(3, dtype)
  grads = [_tree(30 + i, dtype, 0.1) for i in range(3)]
  make = lambda: optax_paged.lion4bit(1e-3, min_8bit_size=256)  # noqa
  p_mesh, s_mesh = _run(make(), _put(params, mesh),
                        [_put(g, mesh) for g in grads], fused)
  p_one, s_one = _run(make(), params, grads, fused)
  for leaf in EXACT:
    _equal(p_mesh[leaf], p_one[leaf])
  # The codes too (Lion's steps are signs, which a code step rarely flips).
  # The mesh's state_dict holds a row per shard: in order, the whole leaf.
  names = sorted(SHAPES)  # the tree's order
  mesh_leaves = optax_paged.state_dict(s_mesh)['leaves']
  one_leaves = optax_paged.state_dict(s_one)['leaves']
  for leaf in EXACT:
    (ours,) = mesh_leaves[names.index(leaf)]['moments']
    (theirs,) = one_leaves[names.index(leaf)]['moments']
    for part in ('codes', 'absmax'):
      np.testing.assert_array_equal(np.ravel(ours[part]), theirs[part])
  shards = [np.asarray(shard.data)
            for shard in p_mesh['replicated'].addressable_shards]
  for shard in shards[1:]:
    np.testing.assert_array_equal(shard, shards[0])


def test_every_view_gives_the_same_result():
  mesh = _mesh()
  params, grads = _tree(1, jnp.float32), [_tree(20 + i, jnp.float32, 0.1)
                                          for i in range(3)]
  make = FACTORIES['adamw8bit']
  run = lambda jit: _run(make(), _put(params, mesh),  # noqa: E731
                         [_put(g, mesh) for g in grads], False, jit)
  reference, ref_state = run(jax.jit)
  manual = lambda step: jax.jit(jax.shard_map(  # noqa: E731
      step, mesh=mesh, in_specs=(SPECS, P(), SPECS),
      out_specs=(SPECS, P()), check_vma=False))
  partial_specs = {k: P(*[a if a == 'data' else None for a in spec])
                   if spec else P() for k, spec in SPECS.items()}
  partial_specs['flat_rows'] = P('data')
  partial = lambda step: jax.jit(jax.shard_map(  # noqa: E731
      step, mesh=mesh, in_specs=(partial_specs, P(), partial_specs),
      out_specs=(partial_specs, P()), axis_names={'data'}, check_vma=False))
  for jit in (manual, partial):
    result, state = run(jit)
    assert_trees_equal(result, reference)
    assert_trees_equal(optax_paged.state_dict(state),
                       optax_paged.state_dict(ref_state))


@pytest.mark.parametrize('kind', ['optax', 'bitsandbytes'])
@pytest.mark.parametrize('name', ['lamb', 'lars'])
@pytest.mark.parametrize('bits', [8, 32])
def test_trust_ratio_uses_whole_leaf_norms_in_every_view(name, bits, kind):
  # LAMB and LARS scale each leaf's update by its norm: on a mesh that is
  # the norm of the whole leaf, never of a shard. Sums over shards run in
  # another order than on one device, so results agree to float rounding.
  # 8-bit moments of a leaf split into non-contiguous shards are quantized
  # in other blocks than on one device (see above): those leaves are
  # compared with fp32 state only.
  mesh = _mesh()
  small = 256 if bits == 8 else 10**9
  # optax's LARS scales the gradient before the momentum (by its trust
  # coefficient, 0.001, too): a larger rate moves the parameters as far.
  make = {'lamb': lambda: optax_paged.lamb8bit(
              1e-2, weight_decay=0.1, min_8bit_size=small, trust_ratio=kind),
          'lars': lambda: optax_paged.lars8bit(
              1e-1 if kind == 'bitsandbytes' else 10.0, weight_decay=0.01,
              min_8bit_size=small, trust_ratio=kind)}[name]
  params, grads = _tree(4, jnp.float32), [_tree(40 + i, jnp.float32, 0.1)
                                          for i in range(3)]
  p_one, s_one = _run(make(), params, grads, False)
  manual = lambda step: jax.jit(jax.shard_map(  # noqa: E731
      step, mesh=mesh, in_specs=(SPECS, P(), SPECS),
      out_specs=(SPECS, P()), check_vma=False))
  compared = EXACT if bits == 8 else tuple(SHAPES)
  scaled = name == 'lars' and kind == 'optax'
  for fused, jit in ((False, jax.jit), (True, jax.jit), (False, manual)):
    p_mesh, s_mesh = _run(make(), _put(params, mesh),
                          [_put(g, mesh) for g in grads], fused, jit)
    for leaf in compared:
      np.testing.assert_allclose(np.asarray(p_mesh[leaf]),
                                 np.asarray(p_one[leaf]), rtol=2e-6,
                                 atol=1e-7, err_msg=leaf)
    # LAMB's moments never see the scale: bit-identical. LARS adds its L2
    # decay to the gradient, so its momentum sees the parameters, which the
    # scale moved by float rounding (GPU reductions may sum in any order);
    # optax's LARS momentum holds the scaled gradients themselves, whose
    # ratio is rounded too: to 1e-6 of the largest.
    mesh_leaves = optax_paged.state_dict(s_mesh)['leaves']
    one_leaves = optax_paged.state_dict(s_one)['leaves']
    names = sorted(SHAPES)
    # (8-bit LARS codes may then take the neighbouring code: not compared.)
    for leaf in EXACT if name == 'lamb' or bits == 32 else ():
      jax.tree.map(
          lambda a, b: np.testing.assert_allclose(
              np.ravel(a), np.ravel(b),
              atol=1e-6 * np.max(np.abs(b)) if scaled else 0,
              rtol=0 if name == 'lamb' else 1e-6),
          mesh_leaves[names.index(leaf)]['moments'],
          one_leaves[names.index(leaf)]['moments'])
  # A shard's own norm would have scaled differently: the whole-leaf norm
  # is what matters (a control that the comparison can fail).
  halves = {k: v[: v.shape[0] // 2] for k, v in params.items()}
  p_half, _ = _run(make(), halves, [{k: v[: v.shape[0] // 2]
                                     for k, v in g.items()} for g in grads],
                   False)
  assert not np.allclose(np.asarray(p_half['rows']),
                         np.asarray(p_one['rows'])[:512], rtol=2e-6,
                         atol=1e-7)


def test_explicit_mesh_and_donation():
  mesh = _mesh(AxisType.Explicit)
  params, grads = _tree(2, jnp.float32), [_tree(30, jnp.float32, 0.1)]
  # The one-device run first: device_put may share a buffer with the
  # replicated leaf's shard on device 0, which the donated step deletes.
  one, _ = _run(FACTORIES['adamw8bit'](), params, grads, False)
  tx = FACTORIES['adamw8bit']()
  donated = jax.jit(update_and_apply(tx), donate_argnums=(0, 1))
  result, _ = _run(tx, _put(params, mesh), [_put(g, mesh) for g in grads],
                   False, lambda f: donated)
  for leaf in EXACT:
    _equal(result[leaf], one[leaf])
  assert result['grid'].sharding.spec == SPECS['grid']


def test_jit_with_in_and_out_shardings_and_donation():
  mesh = _mesh()
  params, grads = _tree(15, jnp.float32), [_tree(150 + i, jnp.float32, 0.1)
                                           for i in range(2)]
  one, _ = _run(FACTORIES['adamw8bit'](), params, grads, True)
  tx = FACTORIES['adamw8bit']()
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  p = _put(params, mesh)
  state = tx.init(p)
  state_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  step = jax.jit(_fused(tx), in_shardings=(shardings, state_shardings,
                                           shardings),
                 out_shardings=(shardings, state_shardings),
                 donate_argnums=(0, 1))
  for g in grads:
    p, state = step(p, state, _put(g, mesh))
  for leaf in EXACT:
    _equal(p[leaf], one[leaf])
  assert p['grid'].sharding == shardings['grid']


@pytest.mark.parametrize('fused', [False, True], ids=['update', 'fused'])
def test_compiled_update_has_no_collectives(fused):
  mesh = _mesh()
  tx = FACTORIES['adamw8bit']()
  params = _put(_tree(3, jnp.float32), mesh)
  state = tx.init(params)
  step = _fused(tx) if fused else update_and_apply(tx)
  hlo = jax.jit(step).lower(params, state, params).compile().as_text()
  for op in ('all-gather', 'all-reduce', 'collective-permute', 'all-to-all',
             'reduce-scatter'):
    assert op not in hlo, op


@pytest.mark.parametrize('fused', [False, True], ids=['update', 'fused'])
def test_zero1_is_bit_identical_and_splits_the_state(fused):
  mesh = _mesh()
  params = _tree(4, jnp.float32)
  grads = [_tree(40 + i, jnp.float32, 0.1) for i in range(3)]
  zero = optax_paged.shard_state_over(FACTORIES['adamw8bit'](), 'data')
  p_zero, s_zero = _run(zero, _put(params, mesh),
                        [_put(g, mesh) for g in grads], fused)
  p_rep, s_rep = _run(FACTORIES['adamw8bit'](), _put(params, mesh),
                      [_put(g, mesh) for g in grads], fused)
  assert_trees_equal(p_zero, p_rep)
  zero_bytes = optax_paged.memory_report(s_zero).per_device
  rep_bytes = optax_paged.memory_report(s_rep).per_device
  # The replicated leaf's state halves (data axis of 2); the rest keep
  # their per-shard state.
  rows = {r.path: r.bytes for r in optax_paged.memory_report(s_zero).rows}
  rep_rows = {r.path: r.bytes for r in optax_paged.memory_report(s_rep).rows}
  assert rows["['replicated']"] * 2 <= rep_rows["['replicated']"] + 2 * 256
  first = str(jax.devices()[0])
  assert sum(zero_bytes[first].values()) < sum(rep_bytes[first].values())
  # The gathered result: one all-gather per ZeRO-1 leaf, nothing else.
  step = _fused(zero) if fused else update_and_apply(zero)
  hlo = jax.jit(step).lower(_put(params, mesh), s_zero,
                            _put(params, mesh)).compile().as_text()
  assert 'all-reduce' not in hlo


@pytest.mark.parametrize('name', list(FACTORIES))
def test_zero1_on_one_axis_mesh_equals_one_device(name):
  n = _devices()
  mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,))
  params = {'w': jax.random.normal(jax.random.PRNGKey(5), (3000, 7))}
  grads = [{'w': jax.random.normal(jax.random.PRNGKey(50 + i), (3000, 7))}
           for i in range(3)]
  replicated = NamedSharding(mesh, P())
  zero = optax_paged.shard_state_over(FACTORIES[name](), 'data')
  p_zero, s_zero = _run(zero, jax.device_put(params, replicated),
                        [jax.device_put(g, replicated) for g in grads], True)
  p_one, s_one = _run(FACTORIES[name](), params, grads, True)
  assert_trees_equal(p_zero, p_one)
  one = optax_paged.memory_report(s_one).total_bytes
  first = str(jax.devices()[0])
  per_device = sum(
      optax_paged.memory_report(s_zero).per_device[first].values())
  # Within a 256-element block per moment of 1/N (chunks are whole blocks).
  assert per_device <= one / n + 3 * 256 * 4


def test_stochastic_rounding_draws_by_global_index():
  mesh = _mesh()
  params = {'rows': _tree(6, jnp.bfloat16)['rows'],
            'replicated': _tree(6, jnp.bfloat16)['replicated']}
  grads = {k: (jax.random.normal(jax.random.PRNGKey(60), v.shape) * 1e-3)
           .astype(jnp.bfloat16) for k, v in params.items()}

  def run(p, g):
    tx = optax_paged.adamw8bit(1e-4, min_8bit_size=256)
    step = jax.jit(lambda p, s, g: optax_paged.apply_gradients(
        tx, g, s, p, stochastic_rounding=True))
    return step(p, tx.init(p), g)[0]

  put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))  # noqa
                   for k, v in t.items()}
  on_mesh, one = run(put(params), put(grads)), run(params, grads)
  assert_trees_equal(on_mesh, one)
  # Replicas of the replicated leaf agree.
  shards = [np.asarray(shard.data)
            for shard in on_mesh['replicated'].addressable_shards]
  for shard in shards[1:]:
    np.testing.assert_array_equal(shard, shards[0])


def test_under_scan_chain_inject_and_accumulation():
  mesh = _mesh()
  params = _put(_tree(7, jnp.float32), mesh)
  grads = [_put(_tree(70 + i, jnp.float32, 0.1), mesh) for i in range(4)]
  inner = lambda: optax_paged.adamw8bit(1e-2, min_8bit_size=256)  # noqa
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner())
  ref = optax.chain(optax.clip_by_global_norm(1.0), inner())
  stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)

  @jax.jit
  def scanned(p, s, stacked):
    def body(carry, g):
      return update_and_apply(tx)(*carry, g), None
    return jax.lax.scan(body, (p, s), stacked)[0]

  p_scan, _ = scanned(params, tx.init(params), stacked)
  p_loop, _ = _run(ref, params, grads, False)
  assert_trees_equal(p_scan, p_loop)

  injected = lambda: optax.inject_hyperparams(optax_paged.adamw8bit)(  # noqa
      learning_rate=1e-2, min_8bit_size=256)
  p_inj, _ = _run(injected(), params, grads[:2], False)
  one_device = [jax.tree.map(np.asarray, g) for g in grads[:2]]
  p_one, _ = _run(injected(), jax.tree.map(np.asarray, params), one_device,
                  False)
  for leaf in EXACT:
    _equal(p_inj[leaf], p_one[leaf])

  acc = optax_paged.accumulate_gradients(inner(), every_k=2)
  p_acc, s_acc = _run(acc, params, grads[:2], False)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[0], grads[1])
  p_mean, _ = _run(inner(), params, [mean], False)
  assert_trees_equal(p_acc, p_mean)


def test_jit_create_train_state_then_allocate_state():
  mesh = _mesh()
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  tx = FACTORIES['adamw8bit']()

  @jax.jit
  def create(key):
    params = {k: jax.random.normal(jax.random.fold_in(key, i), s)
              for i, (k, s) in enumerate(SHAPES.items())}
    return params, tx.init(params)

  create = jax.jit(create, out_shardings=(shardings, None))
  params, state = create(jax.random.PRNGKey(8))
  grads = _put(_tree(80, jnp.float32, 0.1), mesh)
  with pytest.raises(ValueError, match='allocate_state'):
    jax.jit(update_and_apply(tx))(params, state, grads)
  state = optax_paged.allocate_state(state, params)
  assert len(state.buffers.record().entries) == _devices()
  fresh = FACTORIES['adamw8bit']().init(params)
  assert_trees_equal(optax_paged.state_dict(state),
                     optax_paged.state_dict(fresh))
  result, _ = jax.jit(update_and_apply(tx))(params, state, grads)
  expected, _ = jax.jit(update_and_apply(FACTORIES['adamw8bit']()))(
      params, fresh, grads)
  assert_trees_equal(result, expected)


def test_checkpoint_round_trip_and_other_mesh_refused():
  mesh = _mesh()
  params = _put(_tree(9, jnp.float32), mesh)
  grads = [_put(_tree(90 + i, jnp.float32, 0.1), mesh) for i in range(4)]
  tx = FACTORIES['adamw8bit']()
  p_full, s_full = _run(tx, params, grads, False)
  p_half, s_half = _run(tx, params, grads[:2], False)
  saved = optax_paged.state_dict(s_half)
  grid = sorted(SHAPES).index('grid')  # leaves in the tree's (sorted) order
  assert saved['leaves'][grid]['moments'][0]['codes'].sharding.spec == SPECS[
      'grid']
  restored = optax_paged.load_state_dict(tx.init(p_half), saved)
  step = jax.jit(update_and_apply(tx))
  p, s = p_half, restored
  for g in grads[2:]:
    p, s = step(p, s, g)
  assert_trees_equal(p, p_full)
  assert_trees_equal(optax_paged.state_dict(s), optax_paged.state_dict(s_full))
  other = jax.make_mesh((_devices(), 1), ('data', 'model'),
                        axis_types=(AxisType.Auto,) * 2)
  if other.devices.shape == mesh.devices.shape:
    other = jax.make_mesh((1, _devices()), ('data', 'model'),
                          axis_types=(AxisType.Auto,) * 2)
  target = tx.init(_put(_tree(9, jnp.float32), other))
  with pytest.raises(ValueError, match='same mesh'):
    optax_paged.load_state_dict(target, saved)


def test_misrouted_shards_are_refused():
  mesh = _mesh()
  permuted = jax.sharding.Mesh(mesh.devices[::-1], mesh.axis_names,
                               axis_types=(AxisType.Auto,) * 2)
  tx = FACTORIES['adamw8bit']()
  state = tx.init(_put(_tree(10, jnp.float32), mesh))
  record = state.buffers.record()

  def moments():
    return [entry.read_moment(i, m) for entry in record.entries
            for i in range(len(SHAPES)) for m in range(2)]

  before = moments()
  state = state._replace(
      count=jax.device_put(state.count, NamedSharding(permuted, P())))
  step = jax.jit(jax.shard_map(
      update_and_apply(tx), mesh=permuted, in_specs=(SPECS, P(), SPECS),
      out_specs=(SPECS, P()), check_vma=False))
  try:
    params, _ = step(_put(_tree(10, jnp.float32), permuted), state,
                     _put(_tree(11, jnp.float32), permuted))
    jax.block_until_ready(params)
  except Exception as error:  # noqa: BLE001 - the CPU handlers refuse it
    assert 'mesh position' in str(error), error
  else:
    # A GPU kernel cannot fail its call: it returns NaN, leaves the state
    # alone and marks the entry, which the next export reports.
    for leaf in jax.tree.leaves(params):
      assert np.isnan(np.asarray(leaf)).all()
    with pytest.raises(ValueError, match='another mesh position'):
      optax_paged.state_dict(state)
  for (a, b), (c, d) in zip(before, moments(), strict=True):
    np.testing.assert_array_equal(a, c)
    if b is not None:
      np.testing.assert_array_equal(b, d)


def test_clear_errors():
  mesh = _mesh()
  tx = FACTORIES['adamw8bit']()
  one_device = tx.init({'w': jnp.ones((64, 64))})
  with pytest.raises(ValueError, match='pmap'):
    n = _devices()
    jax.pmap(lambda p, g: tx.update(g, one_device, p)[0])(
        jnp.ones((n, 64, 64)), jnp.ones((n, 64, 64)))
  on_mesh = jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P()))
  with pytest.raises(ValueError, match='on a mesh'):
    jax.jit(update_and_apply(tx))({'w': on_mesh}, one_device, {'w': on_mesh})
  other = jax.make_mesh((_devices(),), ('x',))
  with pytest.raises(ValueError, match='one mesh'):
    tx.init({'a': on_mesh,
             'b': jax.device_put(jnp.ones((8,)), NamedSharding(other, P()))})
  with pytest.raises(ValueError, match='not on a mesh'):
    tx.init({'a': on_mesh, 'b': np.ones((8,), np.float32)})
  with pytest.raises(ValueError, match='axes'):
    optax_paged.shard_state_over(tx, 'pipeline').init({'a': on_mesh})


def test_min_8bit_size_is_decided_on_the_global_size():
  n = _devices()
  mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,))
  # 2048 elements a shard, under the default 4096, yet 8-bit: the leaf has
  # 2048 n >= 4096.
  w = jax.device_put(jnp.ones((2048 * n,)), NamedSharding(mesh, P('data')))
  state = optax_paged.adamw8bit(1e-3).init({'w': w})
  assert all(row.bits == 8 for row in optax_paged.memory_report(state).rows)


def test_entries_are_freed_on_release_and_collection():
  mesh = _mesh()
  # States orphaned during a full collection are freed at the next one.
  gc.collect()
  gc.collect()
  baseline = ffi.extension().testing.live_state_count()
  tx = FACTORIES['adamw8bit']()
  state = tx.init(_put(_tree(12, jnp.float32), mesh))
  assert ffi.extension().testing.live_state_count() == baseline + _devices()
  optax_paged.release(state)
  assert ffi.extension().testing.live_state_count() == baseline
  state = tx.init(_put(_tree(12, jnp.float32), mesh))
  del state
  gc.collect()
  assert ffi.extension().testing.live_state_count() == baseline


@pytest.mark.skipif(jax.devices()[0].platform != 'gpu',
                    reason='memory tiers exist on GPUs only')
def test_paged_tiers_and_budgets_are_per_device():
  mesh = _mesh()
  params = _tree(13, jnp.float32)
  grads = [_put(_tree(130 + i, jnp.float32, 0.1), mesh) for i in range(4)]
  make = lambda: optax_paged.paged_adamw8bit(  # noqa: E731
      1e-2, min_8bit_size=256, device_budget=1.0)
  stay, moved = make(), make()
  p_stay = _put(params, mesh)
  s_stay = stay.init(p_stay)
  p_moved = _put(params, mesh)
  s_moved = moved.init(p_moved)
  report = optax_paged.memory_report(s_moved)
  assert set(report.per_device) == {str(d) for d in mesh.devices.flat}
  assert all(set(t) == {'device'} for t in report.per_device.values())
  step_stay = jax.jit(update_and_apply(stay))
  step_moved = jax.jit(update_and_apply(moved))
  for i, g in enumerate(grads):
    if i == 2:
      optax_paged.set_device_budget(s_moved, 0)
      tiers = optax_paged.memory_report(s_moved).per_device
      assert all(set(t) == {'host'} for t in tiers.values())
    p_stay, s_stay = step_stay(p_stay, s_stay, g)
    p_moved, s_moved = step_moved(p_moved, s_moved, g)
  assert_trees_equal(p_moved, p_stay)
  assert_trees_equal(optax_paged.state_dict(s_moved),
                     optax_paged.state_dict(s_stay))


def test_deepcopy_is_independent_and_pickle_is_refused():
  import copy
  import pickle

  mesh = _mesh()
  params = _put(_tree(14, jnp.float32), mesh)
  grads = _put(_tree(140, jnp.float32, 0.1), mesh)
  tx = FACTORIES['adamw8bit']()
  step = jax.jit(update_and_apply(tx))
  _, state = step(params, tx.init(params), grads)
  twin = copy.deepcopy(state)
  assert twin.buffers.state_id != state.buffers.state_id
  assert_trees_equal(optax_paged.state_dict(twin),
                     optax_paged.state_dict(state))
  p_a, _ = step(params, state, grads)
  p_b, _ = step(params, twin, grads)
  assert_trees_equal(p_a, p_b)
  with pytest.raises(TypeError, match='state_dict'):
    pickle.dumps(state)


def test_checkpoint_of_another_layout_on_the_same_mesh_is_refused():
  # P('data', 'model') and P('model', 'data') give the same grid of shards,
  # but each device holds another region: its saved blocks are not its own.
  mesh = _mesh()
  w = jax.random.normal(jax.random.PRNGKey(16), (512, 512))
  tx = FACTORIES['adamw8bit']()
  saved_params = {'w': jax.device_put(w, NamedSharding(mesh, P('data',
                                                              'model')))}
  state = tx.init(saved_params)
  _, state = jax.jit(tx.update)(saved_params, state, saved_params)
  saved = optax_paged.state_dict(state)
  other = {'w': jax.device_put(w, NamedSharding(mesh, P('model', 'data')))}
  target = tx.init(other)
  before = optax_paged.state_dict(target)
  if mesh.devices.shape[1] == 1:  # 2x1 mesh: the two layouts differ in grid
    with pytest.raises(ValueError, match='load_state_dict'):
      optax_paged.load_state_dict(target, saved)
  else:
    with pytest.raises(ValueError, match='sharded differently'):
      optax_paged.load_state_dict(target, saved)
  assert_trees_equal(optax_paged.state_dict(target), before)


def test_a_stale_count_on_a_mesh_is_refused():
  # A state reset with jax.tree.map keeps its moments at step 1: every
  # device's handler (or kernel) refuses the step and the moments stay.
  mesh = _mesh()
  tx = FACTORIES['adamw8bit']()
  params = _put(_tree(12, jnp.float32), mesh)
  step = jax.jit(update_and_apply(tx))
  _, state = step(params, tx.init(params), _put(_tree(13, jnp.float32), mesh))
  before = optax_paged.state_dict(state)
  reset = jax.tree.map(jnp.zeros_like, state)
  message = refusal_of(
      lambda: step(params, reset, _put(_tree(14, jnp.float32), mesh))[0],
      lambda: optax_paged.state_dict(reset))
  assert 'moments are at step 1' in message, message
  assert_trees_equal(optax_paged.state_dict(state), before)
