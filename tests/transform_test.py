"""paged_adamw8bit / adamw8bit inside the JAX and optax machinery."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import ffi
from optax_paged._src import reference
from tests.helpers import assert_trees_equal
from tests.helpers import random_tree
from tests.helpers import reference_state_from
from tests.helpers import update_and_apply

SHAPES = [(64, 80), (300,), (3, 5)]
FACTORIES = [optax_paged.paged_adamw8bit, optax_paged.adamw8bit]


def _grads(params, seed):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape) * 0.1,
      params,
  )


def _run(tx, params, steps, step_fn=None):
  state = tx.init(params)
  step_fn = step_fn or jax.jit(update_and_apply(tx))
  for i in range(steps):
    params, state = step_fn(params, state, _grads(params, i))
  return params, state


@pytest.mark.parametrize('factory', FACTORIES)
def test_jit_with_donation(factory):
  params = random_tree(SHAPES, seed=0)
  tx = factory(1e-2, weight_decay=0.1, min_8bit_size=256)
  donated = jax.jit(update_and_apply(tx), donate_argnums=(0, 1))
  p_donated, s_donated = _run(tx, jax.tree.map(jnp.copy, params), 4, donated)
  p_jit, s_jit = _run(tx, params, 4, jax.jit(update_and_apply(tx)))
  assert_trees_equal(p_donated, p_jit)
  assert_trees_equal(optax_paged.state_dict(s_donated),
                     optax_paged.state_dict(s_jit))
  # Op-by-op dispatch computes the bias corrections outside a fusion, so
  # agreement is to float rounding rather than bitwise.
  p_eager, _ = _run(tx, params, 4, update_and_apply(tx))
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      p_eager, p_jit,
  )


def test_lax_scan_over_steps_matches_python_loop():
  params = random_tree(SHAPES, seed=1)
  tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  grads = [_grads(params, i) for i in range(5)]
  stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)

  @jax.jit
  def scanned(params, state, stacked):
    def body(carry, g):
      p, s = carry
      return update_and_apply(tx)(p, s, g), None
    return jax.lax.scan(body, (params, state), stacked)[0]

  p_scan, s_scan = scanned(params, tx.init(params), stacked)
  state = tx.init(params)
  p_loop = params
  step = jax.jit(update_and_apply(tx))
  for g in grads:
    p_loop, state = step(p_loop, state, g)
  assert_trees_equal(p_scan, p_loop)
  assert int(s_scan.count) == 5
  assert_trees_equal(optax_paged.state_dict(s_scan),
                     optax_paged.state_dict(state))


def test_chain_with_clipping_matches_reference():
  params = random_tree(SHAPES, seed=2)
  kwargs = dict(learning_rate=1e-2, weight_decay=0.05, min_8bit_size=256)
  tx = optax.chain(optax.clip_by_global_norm(0.5),
                   optax_paged.paged_adamw8bit(**kwargs))
  ref = optax.chain(optax.clip_by_global_norm(0.5),
                    reference.adamw8bit(**kwargs))
  state, ref_state = tx.init(params), ref.init(params)
  for i in range(3):
    g = _grads(params, i)
    u, state = jax.jit(tx.update)(g, state, params)
    ru, ref_state = jax.jit(ref.update)(g, ref_state, params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9),
        u, ru,
    )
    # Continue the reference from our moments so rounding cannot compound.
    ref_state = (ref_state[0], reference_state_from(state[1], params))


def _trace_counter():
  traces = []

  def count(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      traces.append(1)
      return fn(*args)
    return wrapped

  return traces, count


def test_schedule_needs_no_recompilation_and_follows_optax():
  params = random_tree(SHAPES, seed=3)
  schedule = optax.linear_schedule(1e-2, 1e-4, transition_steps=5)
  tx = optax_paged.paged_adamw8bit(schedule, min_8bit_size=10**9)
  ref = optax.adamw(schedule, weight_decay=1e-4)
  traces, count = _trace_counter()
  step = jax.jit(count(update_and_apply(tx)))
  ref_step = jax.jit(update_and_apply(ref))
  p, s = params, tx.init(params)
  rp, rs = params, ref.init(params)
  for i in range(6):
    g = _grads(params, i)
    p, s = step(p, s, g)
    rp, rs = ref_step(rp, rs, g)
  assert len(traces) == 1
  # With every leaf in fp32 state the update is optax.adamw's.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      p, rp,
  )


def test_inject_hyperparams_changes_values_without_recompiling():
  params = random_tree(SHAPES, seed=4)
  tx = optax.inject_hyperparams(optax_paged.paged_adamw8bit)(
      learning_rate=1e-2, weight_decay=0.0, min_8bit_size=10**9
  )
  ref = optax.inject_hyperparams(optax.adamw)(
      learning_rate=1e-2, weight_decay=0.0
  )
  traces, count = _trace_counter()
  step = jax.jit(count(update_and_apply(tx)))
  ref_step = jax.jit(update_and_apply(ref))
  p, s = params, tx.init(params)
  rp, rs = params, ref.init(params)
  for i, lr in enumerate([1e-2, 5e-3, 0.0, 2e-2]):
    s.hyperparams['learning_rate'] = jnp.asarray(lr)
    rs.hyperparams['learning_rate'] = jnp.asarray(lr)
    g = _grads(params, i)
    before = p
    p, s = step(p, s, g)
    rp, rs = ref_step(rp, rs, g)
    if lr == 0.0:
      assert_trees_equal(p, before)
  assert len(traces) == 1
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      p, rp,
  )


def test_eval_shape_allocates_nothing():
  params = random_tree(SHAPES, seed=5)
  tx = optax_paged.paged_adamw8bit(1e-3)
  before = ffi.extension().testing.live_state_count()
  shapes = jax.eval_shape(tx.init, params)
  assert ffi.extension().testing.live_state_count() == before
  assert shapes.count.shape == () and shapes.count.dtype == jnp.int32
  assert shapes.buffers.is_abstract
  real = tx.init(params)
  assert jax.tree.structure(real.count) == jax.tree.structure(shapes.count)


def test_init_under_jit_gives_a_clear_error_on_update():
  params = random_tree(SHAPES, seed=6)
  tx = optax_paged.paged_adamw8bit(1e-3)
  state = jax.jit(tx.init)(params)
  with pytest.raises(ValueError, match='outside jax.jit'):
    tx.update(_grads(params, 0), state, params)


def test_two_optimizers_never_touch_each_others_state():
  params = random_tree(SHAPES, seed=7)
  tx_a = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  tx_b = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  step_a = jax.jit(update_and_apply(tx_a))
  alone, _ = _run(tx_a, params, 3, step_a)
  state_a, state_b = tx_a.init(params), tx_b.init(params)
  assert state_a.buffers.state_id != state_b.buffers.state_id
  untouched = optax_paged.state_dict(state_b)
  p_a = params
  for i in range(3):
    p_a, state_a = step_a(p_a, state_a, _grads(p_a, i))
  assert_trees_equal(optax_paged.state_dict(state_b), untouched)
  assert_trees_equal(p_a, alone)


def test_small_leaves_keep_fp32_state():
  params = {'big': jnp.ones((64, 64)), 'small': jnp.ones((4095,))}
  state = optax_paged.paged_adamw8bit(1e-3).init(params)
  layouts = state.buffers.record().leaves
  assert [layout.quantized for layout in layouts] == [True, False]
  saved = optax_paged.state_dict(state)['leaves']
  assert saved[0]['moments'][0]['codes'].dtype == np.uint8
  assert saved[1]['moments'][0]['values'].dtype == np.float32


@pytest.mark.parametrize('mask', [
    {'w': True, 'b': False},
    lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
])
def test_weight_decay_mask(mask):
  params = {'w': jnp.ones((64, 64)), 'b': jnp.ones((64,))}
  tx = optax_paged.paged_adamw8bit(0.1, weight_decay=0.5, mask=mask)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates['b'], 0.0)


def test_non_finite_gradient_poisons_only_its_block():
  # Documented behaviour: a NaN gradient element makes its own update NaN at
  # once; its block's absmax becomes NaN, so from the next step every
  # element of that block of 256 has a NaN update. Other blocks and leaves
  # are unaffected. (fp32-state leaves behave as optax: only the element.)
  params = {'w': jnp.ones((4, 1024)), 'small': jnp.ones((10,))}
  tx = optax_paged.paged_adamw8bit(1e-3, min_8bit_size=256)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1), params)
  bad = {'w': grads['w'].at[1, 3].set(jnp.nan),
         'small': grads['small'].at[2].set(jnp.inf)}
  step = jax.jit(tx.update)
  first, state = step(bad, state, params)
  w = np.asarray(first['w'])
  assert np.isnan(w[1, 3]) and np.isfinite(np.delete(w.ravel(), 1024 + 3)).all()
  second, state = step(grads, state, params)
  w = np.asarray(second['w']).ravel()
  assert np.all(np.isnan(w[1024:1280]))
  assert np.all(np.isfinite(np.delete(w, np.s_[1024:1280])))
  small = np.asarray(second['small'])
  assert not np.isfinite(small[2]) and np.isfinite(np.delete(small, 2)).all()


def _fused_cases():
  # Every factory in every dtype; donation alternates, so each factory and
  # each dtype runs with and without it: a pairwise cover of (factory,
  # dtype, donation).
  factories = [optax_paged.paged_adamw8bit, optax_paged.paged_adamw4bit,
               optax_paged.paged_lion4bit]
  dtypes = [jnp.float32, jnp.bfloat16, jnp.float16]
  return [
      pytest.param(factory, dtype, bool((i + j) % 2),
                   id=f'{factory.__name__}-{jnp.dtype(dtype).name}-'
                      f'{"donated" if (i + j) % 2 else "kept"}')
      for i, factory in enumerate(factories)
      for j, dtype in enumerate(dtypes)
  ]


@pytest.mark.parametrize('factory, dtype, donate', _fused_cases())
def test_fused_step_is_bit_identical_to_update_and_apply(factory, dtype,
                                                         donate):
  params = random_tree(SHAPES, dtype=dtype, seed=8)
  tx = factory(1e-2, weight_decay=0.1, min_8bit_size=256)

  def fused(p, s, g):
    return optax_paged.apply_gradients(tx, g, s, p)

  fused = jax.jit(fused, donate_argnums=(0, 1) if donate else ())
  strict = jax.jit(update_and_apply(tx))
  p_f, s_f = jax.tree.map(jnp.copy, params), tx.init(params)
  p_s, s_s = params, tx.init(params)
  for i in range(3):
    g = jax.tree.map(lambda x: x.astype(dtype), _grads(params, i))
    p_f, s_f = fused(p_f, s_f, g)
    p_s, s_s = strict(p_s, s_s, g)
  assert_trees_equal(p_f, p_s)
  assert_trees_equal(optax_paged.state_dict(s_f), optax_paged.state_dict(s_s))


def test_update_writes_over_gradients_made_in_the_step():
  # In a training step the gradients die at the update, so their memory can
  # hold the updates: the step needs no parameter-sized buffer of its own.
  params = {'w': jnp.ones((1024, 1024)), 'b': jnp.ones((300,))}
  tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  state = tx.init(params)

  def step(x, s, p):
    grads = jax.tree.map(lambda v: v * x, p)  # stands in for jax.grad
    return tx.update(grads, s, p)

  compiled = jax.jit(step).lower(2.0, state, params).compile()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert compiled.memory_analysis().temp_size_in_bytes < param_bytes // 4
  updates, _ = compiled(2.0, state, params)
  expected, _ = jax.jit(tx.update)(
      jax.tree.map(lambda v: v * 2.0, params), tx.init(params), params)
  assert_trees_equal(updates, expected)


def test_update_keeps_gradients_that_are_still_used():
  params = random_tree(SHAPES, seed=11)
  tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  grads = _grads(params, 0)

  @jax.jit
  def update_and_keep(g, s, p):
    updates, s = tx.update(g, s, p)
    return updates, g  # g is read after the call: XLA must copy it first

  _, kept = update_and_keep(grads, tx.init(params), params)
  assert_trees_equal(kept, grads)


def test_fused_step_refuses_a_chain():
  tx = optax.chain(optax.clip(1.0), optax_paged.paged_adamw8bit(1e-3))
  params = {'w': jnp.ones((8,))}
  with pytest.raises(TypeError, match='apply the earlier transformations'):
    optax_paged.apply_gradients(tx, params, tx.init(params), params)


@pytest.mark.parametrize('keep', [
    {'embed': True, 'w': False},
    lambda p: {name: name == 'embed' for name in p},
])
def test_keep_32bit_keeps_chosen_leaves_in_fp32_state(keep):
  params = {'embed': jnp.ones((1000, 64)), 'w': jnp.ones((64, 64))}
  tx = optax_paged.paged_adamw8bit(1e-2, weight_decay=0.0, keep_32bit=keep)
  state = tx.init(params)
  bits = {row.path: row.bits for row in optax_paged.memory_report(state).rows}
  assert bits == {"['embed']": 32, "['w']": 8}
  # The fp32 leaf follows optax.adamw to float rounding.
  ref = optax.adamw(1e-2, weight_decay=0.0)
  ref_state = ref.init(params)
  p, rp = params, params
  step, ref_step = jax.jit(update_and_apply(tx)), jax.jit(update_and_apply(ref))
  for i in range(3):
    g = _grads(params, i)
    p, state = step(p, state, g)
    rp, ref_state = ref_step(rp, ref_state, g)
  np.testing.assert_allclose(p['embed'], rp['embed'], rtol=1e-6, atol=1e-7)


def _sgd_fused_steps(params, grads, steps, stochastic):
  tx = optax_paged.sgd8bit(1.0, momentum=0.0)
  state = tx.init(params)
  step = jax.jit(functools.partial(
      optax_paged.apply_gradients, tx, stochastic_rounding=stochastic))
  for _ in range(steps):
    params, state = step(grads, state, params)
  return params


def test_stochastic_rounding_keeps_tiny_bf16_updates_on_average():
  # Each step adds 1e-4 to parameters at 1.0, whose bf16 spacing is 2^-7:
  # rounding to nearest loses every step; stochastic rounding keeps them
  # on average.
  n = 1 << 16
  params = {'w': jnp.ones((n,), jnp.bfloat16)}
  grads = {'w': jnp.full((n,), -1e-4, jnp.bfloat16)}
  step_size = float(jnp.asarray(1e-4, jnp.bfloat16))
  nearest = _sgd_fused_steps(params, grads, 20, stochastic=False)
  np.testing.assert_array_equal(np.asarray(nearest['w'], np.float32), 1.0)
  for steps in (1, 20):
    drawn = np.asarray(
        _sgd_fused_steps(params, grads, steps, stochastic=True)['w'],
        np.float32)
    if steps == 1:  # one step rounds to one of the two neighbours
      assert set(np.unique(drawn).tolist()) == {1.0, 1.0 + 2**-7}
    # Mean of n Bernoulli draws of size 2^-7: standard error about
    # 2^-7 * sqrt(p / n); allow six of them.
    p = steps * step_size / 2**-7
    tolerance = 6 * 2**-7 * np.sqrt(p / n)
    assert abs(drawn.mean() - 1.0 - steps * step_size) < tolerance


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float16])
def test_stochastic_rounding_has_no_effect_but_on_bf16(dtype):
  # As documented: float32 and float16 parameters keep update + apply's
  # bits. (A learning rate of 0.3 makes the float16 update inexact, where
  # one rounding of p + u would differ from update + apply's two.)
  params = random_tree(SHAPES, dtype, seed=9)
  grads = _grads(params, 0)
  tx = optax_paged.sgd8bit(0.3, momentum=0.0)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  drawn, _ = jax.jit(functools.partial(
      optax_paged.apply_gradients, tx, stochastic_rounding=True))(
          grads, tx.init(params), params)
  assert_trees_equal(optax.apply_updates(params, updates), drawn)
