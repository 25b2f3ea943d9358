"""Calls the user may not make raise clear Python errors; nothing crashes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_paged
from optax_paged._src import registry
from tests import background
from tests.helpers import random_tree
from tests.helpers import refusal_of

SHAPES = [(64, 80), (300,)]


@pytest.fixture
def setup():
  params = random_tree(SHAPES, seed=0)
  tx = optax_paged.paged_adamw8bit(1e-3, min_8bit_size=256)
  grads = jax.tree.map(jnp.ones_like, params)
  return tx, tx.init(params), params, grads


def test_update_without_params(setup):
  tx, state, _, grads = setup
  with pytest.raises(ValueError, match='need the parameters'):
    tx.update(grads, state)


def test_wrong_tree(setup):
  tx, state, params, grads = setup
  del grads['leaf1']
  with pytest.raises(ValueError, match='does not match the parameter'):
    tx.update(grads, state, params)


def test_wrong_shape(setup):
  tx, state, params, grads = setup
  grads['leaf0'] = jnp.ones((80, 64))
  with pytest.raises(ValueError, match=r'shape \(80, 64\)'):
    jax.jit(tx.update)(grads, state, params)


def test_wrong_param_dtype(setup):
  tx, state, params, grads = setup
  params['leaf1'] = params['leaf1'].astype(jnp.bfloat16)
  with pytest.raises(TypeError, match='initialised for float32'):
    tx.update(grads, state, params)


def test_integer_parameters_are_refused_at_init():
  tx = optax_paged.paged_adamw8bit(1e-3)
  with pytest.raises(TypeError, match='float32, bfloat16 and float16'):
    tx.init({'steps': jnp.zeros((5000,), jnp.int32)})


@pytest.mark.parametrize('kwargs, message', [
    (dict(b1=1.0), 'b1'),
    (dict(b2=-0.1), 'b2'),
    (dict(eps=-1.0), 'eps'),
    (dict(min_8bit_size=-1), 'min_8bit_size'),
])
def test_bad_hyperparameters(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_paged.paged_adamw8bit(1e-3, **kwargs)


def test_released_state(setup):
  tx, state, params, grads = setup
  optax_paged.release(state)
  with pytest.raises(ValueError, match='released'):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match='released'):
    optax_paged.state_dict(state)


def test_vmap_of_update_is_refused(setup):
  tx, state, params, grads = setup
  batched = jax.tree.map(lambda g: jnp.stack([g, g]), grads)
  before = optax_paged.state_dict(state)
  with pytest.raises(ValueError, match='cannot be vmapped'):
    jax.vmap(lambda g: tx.update(g, state, params)[0])(batched)
  after = optax_paged.state_dict(state)
  jax.tree.map(lambda a, b: (a == b).all() or pytest.fail('state changed'),
               before, after)


def test_differentiating_through_update_is_refused(setup):
  tx, state, params, grads = setup

  def loss(g):
    updates, _ = tx.update(g, state, params)
    return sum(jnp.sum(u) for u in jax.tree.leaves(updates))

  with pytest.raises(ValueError, match='cannot be differentiated'):
    jax.grad(loss)(grads)
  with pytest.raises(ValueError, match='cannot be differentiated'):
    jax.jvp(loss, (grads,), (grads,))


def test_state_of_another_kind_is_refused(setup):
  tx, _, params, grads = setup
  with pytest.raises(TypeError, match='expected the state'):
    tx.update(grads, (), params)


_COMPILED_STEP_AFTER_RELEASE = background.python_job('''
      import jax, jax.numpy as jnp, optax_paged
      params = {'w': jnp.ones((64, 80))}
      tx = optax_paged.paged_adamw8bit(1e-3)
      state = tx.init(params)
      step = jax.jit(tx.update)
      step(params, state, params)
      optax_paged.release(state)
      try:
        updates, _ = step(params, state, params)  # compiled: no retrace
        jax.block_until_ready(updates)
      except Exception as error:
        assert 'released' in str(error), error
        print('refused')
      else:
        raise SystemExit('a released state was updated')
''')


def test_compiled_step_after_release_fails_cleanly():
  result = background.result('errors-compiled-step-after-release',
                             _COMPILED_STEP_AFTER_RELEASE)
  assert result.returncode == 0, result.stderr
  assert 'refused' in result.stdout


# Bypasses the Python checks: the handler itself must refuse a call whose
# operands do not match the registry entry, without touching memory.
_KERNEL_OPERANDS = background.python_job('''
      import jax.numpy as jnp, optax_paged
      from optax_paged._src import ffi
      params = {'w': jnp.ones((64, 80))}
      state = optax_paged.paged_adamw8bit(1e-3).init(params)
      state_id = state.buffers.state_id
      for leaves, indices, expected in [
          ([jnp.ones((10,))], [0], 'has 10 elements, state has 5120'),
          ([jnp.ones((5120,))], [3], 'out of range'),
      ]:
        try:
          out, _ = ffi.update_call('optax_paged_adamw', jnp.zeros(16), 0,
                                   leaves, leaves, state_id=state_id,
                                   leaf_indices=indices)
          out[0].block_until_ready()
        except Exception as error:
          assert expected in str(error), error
        else:
          raise SystemExit('bad operands were accepted')
      try:
        ffi.update_call('optax_paged_adamw', jnp.zeros(16), 0, [jnp.ones(5120)],
                        [jnp.ones(5120)], state_id=10**9,
                        leaf_indices=[0])[0][0].block_until_ready()
      except Exception as error:
        assert 'released' in str(error), error
      else:
        raise SystemExit('an unknown state id was accepted')
      try:
        ffi.update_call('optax_paged_adamw', jnp.zeros(16), 3, [jnp.ones(5120)],
                        [jnp.ones(5120)], state_id=state_id,
                        leaf_indices=[0])[0][0].block_until_ready()
      except Exception as error:
        assert 'mesh position 0' in str(error), error
      else:
        raise SystemExit('a call for another mesh position was accepted')
      print('ok')
''')


def test_kernel_validates_operands_it_is_given():
  result = background.result('errors-kernel-operands', _KERNEL_OPERANDS)
  assert result.returncode == 0, result.stderr
  assert 'ok' in result.stdout


@pytest.mark.parametrize('make_grads', [
    lambda g: (g['leaf0'], g['leaf1']),
    lambda g: {'other0': g['leaf0'], 'other1': g['leaf1']},
    lambda g: [g['leaf1'], g['leaf0']],
], ids=['tuple', 'other keys', 'list'])
def test_updates_of_another_tree_are_refused(setup, make_grads):
  # Same leaf count and shapes would pair them by position; optax refuses.
  tx, state, params, grads = setup
  with pytest.raises(ValueError, match='does not match the parameters tree'):
    tx.update(make_grads(grads), state, params)
  with pytest.raises(ValueError, match='does not match the parameters tree'):
    optax_paged.apply_gradients(tx, make_grads(grads), state, params)


_FLOAT64_AT_INIT = background.python_job('''
      import jax
      jax.config.update('jax_enable_x64', True)
      import jax.numpy as jnp, optax_paged
      try:
        optax_paged.adamw8bit(1e-3).init({'w': jnp.ones((64, 64), jnp.float64)})
      except TypeError as error:
        assert 'float32' in str(error), error
        print('refused')
''')


def test_float64_parameters_are_refused_at_init():
  result = background.result('errors-float64-at-init', _FLOAT64_AT_INIT)
  assert result.returncode == 0, result.stderr
  assert 'refused' in result.stdout


def test_reinitialising_inside_a_step_is_refused_clearly():
  # optax.lookahead(reset_state=True) calls the fast optimizer's init
  # inside its update; a state made there owns no buffers.
  import optax
  params = {'w': jnp.ones((64, 80))}
  tx = optax.lookahead(optax_paged.adamw8bit(1e-3), sync_period=2,
                       slow_step_size=0.5, reset_state=True)
  lookahead_params = optax.LookaheadParams.init_synced(params)
  state = tx.init(lookahead_params)
  with pytest.raises(TypeError, match='lookahead'):
    jax.jit(tx.update)(params, state, lookahead_params)
  # Without the reset it runs.
  tx = optax.lookahead(optax_paged.adamw8bit(1e-3), sync_period=2,
                       slow_step_size=0.5)
  state = tx.init(lookahead_params)
  jax.jit(tx.update)(params, state, lookahead_params)


@pytest.mark.parametrize('shape', [(2**40, 2**30), (2**23, 2**23)])
@pytest.mark.parametrize('how', ['init', 'eval_shape'])
def test_a_state_no_machine_holds_is_refused_at_init(shape, how):
  # (2**40, 2**30) has 2^70 elements: an int64 product wraps to 0 and gave
  # a 0-byte state; 2^46 elements take 2^49 bytes of fp32 moments.
  tx = optax_paged.adamw8bit(1e-3)
  params = {'w': jax.ShapeDtypeStruct(shape, jnp.float32)}
  before = registry.REGISTRY.total_bytes()
  init = tx.init if how == 'init' else lambda p: jax.eval_shape(tx.init, p)
  with pytest.raises(ValueError, match=r"\['w'\] of shape .* more memory"):
    init(params)
  assert registry.REGISTRY.total_bytes() == before


def _state_at(tx, params, count):
  """A state of ``tx`` whose count and moments are at ``count``."""
  from optax_paged._src import state_io
  saved = optax_paged.state_dict(tx.init(params))
  saved['count'] = np.int32(count)
  saved['checksum'] = np.uint32(state_io._checksum(saved['leaves'], count))
  return optax_paged.load_state_dict(tx.init(params), saved)


@pytest.mark.parametrize('how', ['eager', 'jit', 'fused'])
def test_a_count_at_the_int32_limit_is_refused_naming_the_overflow(how):
  tx = optax_paged.adamw8bit(1e-3)
  params = {'w': jnp.ones((64, 80))}
  state = _state_at(tx, params, 2**31 - 2)
  _, state = tx.update(params, state, params)  # the last step there is
  assert int(state.count) == 2**31 - 1
  step = {
      'eager': lambda s: tx.update(params, s, params),
      'jit': jax.jit(lambda s: tx.update(params, s, params)),
      'fused': lambda s: optax_paged.apply_gradients(tx, params, s, params),
  }[how]
  # The kernel saw the saturated count as a step behind its moments and
  # said "count is 2147483646", a count the state does not have.
  before = optax_paged.state_dict(state)
  # On the CPU the call raises; on a GPU an eager count is not read (that
  # would wait for the last step), so the kernel refuses and the next call
  # names the overflow.
  message = refusal_of(lambda: step(state),
                       lambda: optax_paged.state_dict(state))
  assert re.search(r'2147483647 \(2\^31 - 1\).*safe_increment.*'
                   r'tx\.init\(params\)', message, re.S), message
  after = optax_paged.state_dict(state)  # refused: nothing moved
  assert int(after['checksum']) == int(before['checksum'])


# The fresh interpreters above run beside the other tests (tests/background.py).
BACKGROUND_JOBS = {
    'errors-compiled-step-after-release': (
        _COMPILED_STEP_AFTER_RELEASE,
        ['test_compiled_step_after_release_fails_cleanly']),
    'errors-kernel-operands': (
        _KERNEL_OPERANDS, ['test_kernel_validates_operands_it_is_given']),
    'errors-float64-at-init': (
        _FLOAT64_AT_INIT, ['test_float64_parameters_are_refused_at_init']),
}
