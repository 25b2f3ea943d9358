"""The TPU path's Pallas kernels, in Pallas' TPU interpreter, against the
CPU kernel; its selection, fused step, state and checkpoints.

The interpreter runs the kernel's arithmetic as XLA:CPU compiles it, and
XLA's fusion rounds a few operations of the update differently from the C++
kernel's one rounding per operation (the jitted reference differs from the
CPU kernel by the same ulps). So the updates agree to an ulp, the absmax to
float32 rounding, and a code may take its neighbour where a moment lands on
a midpoint; from the same float32 moments the codes are the CPU codec's bit
for bit (tpu_codec_test). On a TPU the update's arithmetic is the TPU's
(its division and square root are not IEEE-rounded), so there too the codes
are bit-compatible in format and equal but for such neighbours.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import tpu_state
from optax_paged._src import tpu_transform
from optax_paged._src.tpu_state import TpuState
from tests import helpers

# On the CPU on any host: the comparisons hold as XLA:CPU rounds.
pytestmark = pytest.mark.usefixtures('on_cpu')

# Native layouts (a row tile with a partial second one; a lane tile with a
# partial second one; three dimensions), a flat one, a float32 small leaf.
SHAPES = [(200, 256), (8, 2304), (2, 16, 512), (5000,), (100,)]
# Fewer for the other cases: each 2048-lane tile's kernel takes the
# interpreter seconds to compile.
SMALL_SHAPES = [(200, 256), (2, 16, 512), (100,)]


def tpu_optimizer(factory, *args, **kwargs):
  with tpu_transform.force('interpret'):
    return factory(*args, **kwargs)


def assert_moments_close(tpu_moments, cpu_moments):
  """Codes equal but for neighbours at a midpoint (a handful), absmax and
  float32 moments to rounding."""
  for (q1, m1), (q2, m2) in zip(tpu_moments, cpu_moments, strict=True):
    assert q1 == q2
    for a, b in zip(m1, m2, strict=True):
      if q1:
        diff = np.abs(a['codes'].astype(int) - b['codes'].astype(int))
        assert diff.max() <= 1 and np.sum(diff) <= max(2, diff.size // 2000)
        np.testing.assert_allclose(a['absmax'], b['absmax'], rtol=1e-6)
      else:
        np.testing.assert_allclose(
            a['values'], b['values'], rtol=1e-5,
            atol=1e-6 * float(np.max(np.abs(b['values']))))


def run_both(factory, dtype, steps=3, shapes=SMALL_SHAPES, **kwargs):
  params = helpers.random_tree(shapes, dtype)
  tpu = tpu_optimizer(factory, 1e-3, **kwargs)
  cpu = factory(1e-3, **kwargs)
  tpu_state_, cpu_state = tpu.init(params), cpu.init(params)
  assert isinstance(tpu_state_, TpuState)
  tpu_step = jax.jit(helpers.update_and_apply(tpu))
  cpu_step = jax.jit(helpers.update_and_apply(cpu))
  tpu_params = cpu_params = params
  for i in range(steps):
    grads = helpers.random_grads(params, seed=i)
    tpu_params, tpu_state_ = tpu_step(tpu_params, tpu_state_, grads)
    cpu_params, cpu_state = cpu_step(cpu_params, cpu_state, grads)
    for name in params:
      a, b = helpers.as_f32(tpu_params[name]), helpers.as_f32(cpu_params[name])
      assert tpu_params[name].dtype == dtype
      ulp = np.spacing(np.abs(b).astype(dtype).astype(np.float32)) if (
          dtype == jnp.float32) else np.abs(b) * 2.0**-7
      np.testing.assert_array_less(np.abs(a - b), 4 * ulp + 1e-9,
                                   err_msg=name)
    assert_moments_close(helpers.moments_of(tpu_state_),
                         helpers.moments_of(cpu_state))
  return tpu_state_


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_adamw8bit_as_the_cpu_kernel(dtype):
  shapes = SHAPES if dtype == jnp.float32 else SMALL_SHAPES
  state = run_both(optax_paged.adamw8bit, dtype, shapes=shapes,
                   weight_decay=0.01)
  assert int(state.count) == 3


def test_lion8bit_as_the_cpu_kernel():
  run_both(optax_paged.lion8bit, jnp.float32, steps=2, weight_decay=0.1)


def test_fused_step_is_update_and_apply():
  params = helpers.random_tree([(64, 512), (100,)], jnp.bfloat16)
  helpers.assert_fused_is_update_and_apply(
      tpu_optimizer(optax_paged.paged_adamw8bit, 1e-3), params,
      helpers.random_grads(params, seed=1))


def test_selection():
  assert tpu_transform.selected() is None  # the CPU backend: the registry
  assert not isinstance(optax_paged.adamw8bit(1e-3).init({'w': jnp.ones(8)}),
                        TpuState)
  with tpu_transform.force('interpret'):
    assert tpu_transform.selected() == 'interpret'
    chained = optax.chain(optax.clip_by_global_norm(1.0),
                          optax_paged.paged_adamw8bit(1e-3))
    # 4-bit states (tpu_kernel4_test) and trust-ratio families
    # (tpu_trust_ratio_test) are on the TPU path too.
    four_bit = optax_paged.adamw4bit(1e-3).init({'w': jnp.ones(8)})
    lamb = optax_paged.lamb8bit(1e-3).init({'w': jnp.ones(8)})
  assert isinstance(chained.init({'w': jnp.ones(8)})[1], TpuState)
  assert isinstance(four_bit, TpuState) and four_bit.code_bits == 4
  assert isinstance(lamb, TpuState)
  with pytest.raises(ValueError, match='expected one of'):
    with tpu_transform.force('gpu'):
      pass


def test_state_is_functional_and_laid_out_for_tpu():
  params = {'w': jnp.ones((3, 16, 512)), 'v': jnp.ones(5000),
            'b': jnp.ones(10)}
  state = tpu_optimizer(optax_paged.adamw8bit, 1e-3).init(params)
  w, v, b = (state.leaves[k] for k in ('w', 'v', 'b'))
  assert w.moments[0].codes.shape == (3, 16, 512)
  assert w.moments[0].absmax.shape == (3, 2, 16)
  assert v.moments[0].codes.shape == (3, 2048)
  assert v.moments[1].absmax.shape == (8, 3)
  assert b.moments[0].shape == (10,)
  assert all(x.dtype in (jnp.uint8, jnp.float32, jnp.int32)
             for x in jax.tree.leaves(state))
  # Its structure survives jit and eval_shape.
  abstract = jax.eval_shape(
      tpu_optimizer(optax_paged.adamw8bit, 1e-3).init, params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_host_tier_places_leaves_beyond_the_budget():
  params = {'a': jnp.ones((64, 512)), 'b': jnp.ones((64, 512))}
  tx = tpu_optimizer(optax_paged.paged_adamw8bit, 1e-3,
                     device_budget=70_000)
  state = tx.init(params)
  assert state.leaves['a'].tier == 'device' and state.leaves['b'].tier == 'host'
  kinds = {k: {x.sharding.memory_kind for x in jax.tree.leaves(state.leaves[k])}
           for k in params}
  assert kinds == {'a': {'device'}, 'b': {'pinned_host'}}


@pytest.mark.parametrize('direction', ['cpu_to_tpu', 'tpu_to_cpu'])
def test_checkpoint_moves_between_paths(direction):
  shapes = [(64, 512), (100,)] + ([(5000,)] if direction == 'cpu_to_tpu'
                                  else [])
  params = helpers.random_tree(shapes)
  grads = helpers.random_grads(params, seed=3)
  tpu = tpu_optimizer(optax_paged.paged_adamw8bit, 1e-3)
  cpu = optax_paged.paged_adamw8bit(1e-3)
  source, target = (cpu, tpu) if direction == 'cpu_to_tpu' else (tpu, cpu)
  _, state = jax.jit(source.update)(grads, source.init(params), params)
  saved = optax_paged.state_dict(state)
  restored = optax_paged.load_state_dict(target.init(params), saved)
  assert int(restored.count) == 1
  again = optax_paged.state_dict(restored)
  helpers.assert_trees_equal(
      {k: v for k, v in again.items() if k != 'leaves'},
      {k: v for k, v in saved.items() if k != 'leaves'})
  for a, b in zip(again['leaves'], saved['leaves'], strict=True):
    helpers.assert_trees_equal(a['moments'], b['moments'])
  if direction == 'cpu_to_tpu':
    # The restored TPU state steps on from the CPU moments.
    leaf = restored.leaves['leaf0'].moments[0]
    codes, _ = tpu_state.to_flat(leaf, (64, 512))
    np.testing.assert_array_equal(codes,
                                  saved['leaves'][0]['moments'][0]['codes'])
    jax.jit(tpu.update)(grads, restored, params)


def test_checkpoint_refusals():
  params = helpers.random_tree([(64, 512)])
  tpu = tpu_optimizer(optax_paged.adamw8bit, 1e-3)
  saved = optax_paged.state_dict(tpu.init(params))
  saved['leaves'][0]['moments'][0]['codes'] = (
      saved['leaves'][0]['moments'][0]['codes'] + 1)
  with pytest.raises(ValueError, match='checksum'):
    optax_paged.load_state_dict(tpu.init(params), saved)
  lion = tpu_optimizer(optax_paged.lion8bit, 1e-3)
  with pytest.raises(ValueError, match='is for adamw'):
    optax_paged.load_state_dict(lion.init(params),
                                optax_paged.state_dict(tpu.init(params)))


def test_compiled_path_refuses_float16_at_init():
  params = {'w': jnp.ones((64, 512), jnp.float16), 'b': jnp.ones(8)}
  with tpu_transform.force('tpu'):
    tx = optax_paged.adamw8bit(1e-3)
  with pytest.raises(ValueError, match='float16'):
    tx.init(params)
  # The interpreter runs float16, and a small float16 leaf keeps float32
  # moments in XLA on either path.
  with tpu_transform.force('tpu'):
    small = optax_paged.adamw8bit(1e-3).init({'b': jnp.ones(8, jnp.float16)})
  assert isinstance(small, TpuState)
