"""4-bit states on the TPU path: the Pallas kernel in Pallas' TPU
interpreter against the CPU kernel, bit for bit; selection, layout, fused
step and checkpoints (the host tier's 4-bit run is in tpu_host_tier_test).

Bit for bit needs one rounding an operation on both sides. The interpreter
runs the kernel's arithmetic as XLA:CPU compiles it, and on a CPU with FMA
XLA contracts ``a * b + c`` into one (the C++ kernel does not: CMakeLists
builds it without contraction), so the moments and updates would differ
by ulps. With XLA's codegen limited to AVX (``--xla_cpu_max_isa=AVX``: no
FMA instruction) the arithmetic is the same, and the updates, parameters,
codes and absmax of 3 steps are the CPU kernel's bit for bit. The tests
marked ``in_session`` run in such a session, which ``test_session``
starts beside the suite (``tests/background.py``); in the main session they
skip. The 4-bit host tier's eager run (slow in the interpreter) is behind
the slow marker (pytest -m slow).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from optax_paged._src import tpu_state
from optax_paged._src import tpu_transform
from optax_paged._src.tpu_state import TpuState
from tests import background
from tests import helpers
from tests import tpu_host_tier_test

# On the CPU on any host: the comparisons hold as XLA:CPU rounds.
pytestmark = pytest.mark.usefixtures('on_cpu')

IN_SESSION = background.IN_NO_FMA_SESSION
in_session = pytest.mark.skipif(
    not IN_SESSION, reason='run without FMA by test_session')

# Native layouts (a row tile with a partial second one; a lane tile with a
# partial second one; three dimensions), a flat one with a partial block
# and a partial row, a float32 small leaf.
SHAPES = [(200, 256), (8, 2304), (2, 16, 512), (5000,), (100,)]
SMALL_SHAPES = [(200, 256), (5000,), (100,)]


def tpu_optimizer(factory, *args, **kwargs):
  with tpu_transform.force('interpret'):
    return factory(*args, **kwargs)


def assert_states_equal(tpu, cpu):
  """The registry-format moments (packed codes, absmax, values) and the
  checksum over them and the count, bit for bit."""
  a, b = optax_paged.state_dict(tpu), optax_paged.state_dict(cpu)
  assert int(a['code_bits']) == int(b['code_bits']) == 4
  for x, y in zip(a['leaves'], b['leaves'], strict=True):
    helpers.assert_trees_equal(x['moments'], y['moments'])
    helpers.assert_trees_equal(x.get('master'), y.get('master'))
  assert int(a['checksum']) == int(b['checksum'])


def run_both(factory, dtype, shapes, steps=3, **kwargs):
  params = helpers.random_tree(shapes, dtype)
  tpu = tpu_optimizer(factory, 1e-3, **kwargs)
  cpu = factory(1e-3, **kwargs)
  tpu_state_, cpu_state = tpu.init(params), cpu.init(params)
  assert isinstance(tpu_state_, TpuState) and tpu_state_.code_bits == 4
  assert_states_equal(tpu_state_, cpu_state)
  tpu_step = jax.jit(helpers.update_and_apply(tpu))
  cpu_step = jax.jit(helpers.update_and_apply(cpu))
  tpu_params = cpu_params = params
  for i in range(steps):
    grads = helpers.random_grads(params, seed=i)
    tpu_params, tpu_state_ = tpu_step(tpu_params, tpu_state_, grads)
    cpu_params, cpu_state = cpu_step(cpu_params, cpu_state, grads)
    helpers.assert_trees_equal(tpu_params, cpu_params)
    assert_states_equal(tpu_state_, cpu_state)
  return tpu_state_


# bfloat16 on fewer leaves: each leaf shape's kernel takes the interpreter
# seconds to compile, and the session's time is the suite's (2 cores).
DTYPES = [pytest.param(jnp.float32, SHAPES, id='float32'),
          pytest.param(jnp.bfloat16, SMALL_SHAPES, id='bfloat16')]


@in_session
@pytest.mark.parametrize('dtype, shapes', DTYPES)
def test_paged_adamw4bit_as_the_cpu_kernel(dtype, shapes):
  run_both(optax_paged.paged_adamw4bit, dtype, shapes, weight_decay=0.01)


@in_session
@pytest.mark.parametrize('dtype, shapes', DTYPES)
def test_lion4bit_as_the_cpu_kernel(dtype, shapes):
  # Lion's 4-bit momentum rounds stochastically: the same hashed bits,
  # keyed by the leaf's index among all leaves (a float32 one first).
  run_both(optax_paged.lion4bit, dtype, shapes[-1:] + shapes[:-1],
           weight_decay=0.1)


@in_session
def test_master_weights_as_the_cpu_kernel():
  run_both(optax_paged.adamw4bit, jnp.bfloat16, SMALL_SHAPES,
           master_weight_bits=24, weight_decay=0.01)


@in_session
def test_host_tier_steps_as_the_device_tier():
  # Eagerly (tests/tpu_host_tier_test.py says why): every leaf on the host
  # against every leaf on the device, one step.
  params = helpers.random_tree([(32, 512), (3000,)], jnp.bfloat16)
  grads = helpers.random_grads(params, seed=2)
  states = []
  for budget in (None, 0):
    tx = tpu_optimizer(optax_paged.paged_adamw4bit, 1e-3, device_budget=budget,
                       min_8bit_size=1000, master_weight_bits=24)
    new_params, state = optax_paged.apply_gradients(tx, grads, tx.init(params),
                                                    params)
    states.append((new_params, state))
  (device_params, device_state), (host_params, host_state) = states
  assert {ls.tier for ls in host_state.leaves.values()} == {'host'}
  codes = host_state.leaves['leaf0'].moments[0].codes
  assert codes.sharding.memory_kind == 'pinned_host'
  assert codes.shape == (32 * 256,)  # packed, one row
  assert host_state.leaves['leaf0'].master.correction.shape == (32 * 512,)
  helpers.assert_trees_equal(device_params, host_params)
  a, b = (optax_paged.state_dict(s) for s in (device_state, host_state))
  for x, y in zip(a['leaves'], b['leaves'], strict=True):
    helpers.assert_trees_equal(x['moments'], y['moments'])
    helpers.assert_trees_equal(x['master'], y['master'])


@pytest.mark.slow
def test_host_tier_runs_the_host_tier_test_in_four_bits():
  tpu_host_tier_test.test_host_tier_steps_as_the_device_tier(
      24, optax_paged.paged_adamw4bit)


_run_session = background.no_fma_pytest(
    __file__, 'as_the_cpu_kernel or host_tier')
BACKGROUND_JOBS = {
    'tpu-4bit-session': (_run_session, ['test_session']),
}


def test_session():
  if IN_SESSION:
    pytest.skip('this is the session')
  background.assert_session_passed('tpu-4bit-session', _run_session, 6)


def test_selection_and_layout():
  with tpu_transform.force('interpret'):
    txs = [optax_paged.adamw4bit(1e-3), optax_paged.paged_adamw4bit(1e-3),
           optax_paged.lion4bit(1e-3), optax_paged.paged_lion4bit(1e-3)]
  params = {'w': jnp.ones((3, 16, 512)), 'v': jnp.ones(5000),
            'b': jnp.ones(10)}
  for tx in txs:
    state = tx.init(params)
    assert isinstance(state, TpuState) and state.code_bits == 4
  w, v, b = (txs[0].init(params).leaves[k] for k in ('w', 'v', 'b'))
  # Two codes a byte, one absmax a block of 128 (transposed).
  assert w.moments[0].codes.shape == (3, 16, 256)
  assert w.moments[0].absmax.shape == (3, 4, 16)
  assert v.moments[0].codes.shape == (3, 1024)
  assert v.moments[1].absmax.shape == (16, 3)
  assert b.moments[0].shape == (10,)
  # Zero bytes and absmax, as the registry's fresh buffers.
  assert not np.any(np.asarray(w.moments[0].codes))
  assert not np.any(np.asarray(w.moments[1].absmax))
  abstract = jax.eval_shape(txs[0].init, params)
  assert jax.tree.structure(abstract) == jax.tree.structure(
      txs[0].init(params))


def test_fused_step_is_update_and_apply():
  params = helpers.random_tree([(64, 512), (3000,)], jnp.bfloat16)
  helpers.assert_fused_is_update_and_apply(
      tpu_optimizer(optax_paged.paged_lion4bit, 1e-3), params,
      helpers.random_grads(params, seed=1))


def test_checkpoint_moves_between_paths():
  """A CPU registry checkpoint into a TPU-path state, a step there, and
  its checkpoint into a registry state: each export the same dictionary."""
  params = helpers.random_tree([(64, 512), (5000,), (100,)])
  tpu = tpu_optimizer(optax_paged.paged_adamw4bit, 1e-3)
  cpu = optax_paged.paged_adamw4bit(1e-3)
  state = cpu.init(params)
  for step, (source, target) in enumerate([(cpu, tpu), (tpu, cpu)]):
    grads = helpers.random_grads(params, seed=3 + step)
    _, state = jax.jit(source.update)(grads, state, params)
    saved = optax_paged.state_dict(state)
    # The registry's packed bytes: two codes a byte.
    assert saved['leaves'][0]['moments'][0]['codes'].shape == (64 * 256,)
    state = optax_paged.load_state_dict(target.init(params), saved)
    assert int(state.count) == step + 1
    again = optax_paged.state_dict(state)
    helpers.assert_trees_equal(
        {k: v for k, v in again.items() if k != 'leaves'},
        {k: v for k, v in saved.items() if k != 'leaves'})
    for a, b in zip(again['leaves'], saved['leaves'], strict=True):
      helpers.assert_trees_equal(a['moments'], b['moments'])
    if step == 0:
      # Unpacked into the TPU layout: the flat leaf's partial last group.
      leaf = state.leaves['leaf1'].moments[1]
      codes, _ = tpu_state.to_flat(leaf, (5000,), 4)
      np.testing.assert_array_equal(
          codes, saved['leaves'][1]['moments'][1]['codes'])


def test_checkpoint_refusals():
  params = helpers.random_tree([(64, 512)])
  four = tpu_optimizer(optax_paged.adamw4bit, 1e-3)
  eight = tpu_optimizer(optax_paged.adamw8bit, 1e-3)
  with pytest.raises(ValueError, match='8-bit moments'):
    optax_paged.load_state_dict(four.init(params),
                                optax_paged.state_dict(eight.init(params)))
  saved = optax_paged.state_dict(four.init(params))
  saved['leaves'][0]['moments'][1]['codes'] = (
      saved['leaves'][0]['moments'][1]['codes'] + 1)
  with pytest.raises(ValueError, match='checksum'):
    optax_paged.load_state_dict(four.init(params), saved)
  with pytest.raises(ValueError, match='this state was made by'):
    jax.jit(eight.update)(params, four.init(params), params)
