"""state_dict / load_state_dict: bit-identical resume, refused mismatches."""

import copy
import pickle
import zlib

import jax
import numpy as np
import optax
import pytest

import optax_paged
from tests.helpers import random_tree

SHAPES = [(64, 80), (300,), (2, 3)]


def _grads(params, seed):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape) * 0.1,
      params,
  )


def _make_tx():
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax_paged.paged_adamw8bit(1e-2, weight_decay=0.1, min_8bit_size=256),
  )


def _steps(tx, params, state, first, count):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for i in range(first, first + count):
    params, state = step(params, state, _grads(params, i))
  return params, state


def _assert_equal(a, b):
  jax.tree.map(
      lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
      a, b,
  )


def test_resume_is_bit_identical_to_an_uninterrupted_run():
  params = random_tree(SHAPES, seed=0)
  tx = _make_tx()
  p_full, s_full = _steps(tx, params, tx.init(params), 0, 8)

  p_half, s_half = _steps(tx, params, tx.init(params), 0, 3)
  saved = optax_paged.state_dict(s_half)
  optax_paged.release(s_half)
  restored = optax_paged.load_state_dict(tx.init(p_half), saved)
  p_resumed, s_resumed = _steps(tx, p_half, restored, 3, 5)

  _assert_equal(p_resumed, p_full)
  _assert_equal(optax_paged.state_dict(s_resumed),
                optax_paged.state_dict(s_full))


def test_state_dict_is_numpy_with_the_format_recorded():
  params = random_tree(SHAPES, seed=1)
  tx = _make_tx()
  _, state = _steps(tx, params, tx.init(params), 0, 2)
  saved = optax_paged.state_dict(state)[1]
  assert all(isinstance(x, np.ndarray) or np.isscalar(x)
             for x in jax.tree.leaves(saved))
  assert int(saved['format_version']) == 5
  assert int(saved['code_bits']) == 8
  assert int(saved['block_size']) == 256
  np.testing.assert_array_equal(
      saved['signed_map'], optax_paged.quantization.dynamic_map(True)
  )
  assert int(saved['count']) == 2
  leaf = saved['leaves'][0]
  assert leaf['moments'][0]['codes'].shape == (64 * 80,)
  assert leaf['moments'][0]['absmax'].shape == (20,)


@pytest.fixture(scope='module')
def _saved():
  # Stepped and exported once for the module (each test gets its own copy).
  params = random_tree(SHAPES, seed=2)
  tx = _make_tx()
  _, state = _steps(tx, params, tx.init(params), 0, 2)
  return optax_paged.state_dict(state), tx, params


@pytest.fixture
def saved_and_fresh(_saved):
  saved, tx, params = _saved
  return copy.deepcopy(saved), tx.init(params)


def _corrupt(saved, edit):
  bad = copy.deepcopy(saved)
  edit(bad[1])
  return bad


@pytest.mark.parametrize('edit, message', [
    (lambda s: s.__setitem__('format_version', np.asarray(99, np.int32)),
     'format version'),
    (lambda s: s.pop('count'), "no 'count'"),
    (lambda s: s.__setitem__('count', s['count'] ^ np.int32(4)), 'checksum'),
    (lambda s: s.__setitem__('count', np.asarray(-5, np.int32)), 'outside'),
    (lambda s: s.__setitem__('count', np.asarray([2, 2], np.int32)),
     'integer scalar'),
    (lambda s: s.__setitem__('count', np.asarray(2.0, np.float32)),
     'integer scalar'),
    (lambda s: s.__setitem__('checksum', 2**40), 'outside'),
    (lambda s: s.__setitem__('checksum', -1), 'outside'),
    (lambda s: s.__setitem__('block_size', np.int32(128)), 'block size'),
    (lambda s: s['signed_map'].__setitem__(3, 0.5), 'signed_map'),
    (lambda s: s.__setitem__('optimizer', np.frombuffer(b'lion', np.uint8)),
     'checkpoint is for lion'),
    (lambda s: s['leaves'].pop(), 'leaves'),
    (lambda s: s['leaves'][0]['moments'][1]['codes'].__setitem__(7, 3),
     'checksum'),
    (lambda s: s['leaves'][1].__setitem__('shape', np.asarray([301])),
     'shape'),
])
def test_mismatched_or_corrupted_checkpoint_is_refused(
    saved_and_fresh, edit, message
):
  saved, fresh = saved_and_fresh
  before = optax_paged.state_dict(fresh)
  with pytest.raises(ValueError, match=message):
    optax_paged.load_state_dict(fresh, _corrupt(saved, edit))
  # A refused checkpoint writes nothing.
  _assert_equal(optax_paged.state_dict(fresh), before)


def test_checkpoint_for_another_tree_is_refused(saved_and_fresh):
  saved, _ = saved_and_fresh
  other = random_tree([(64, 80), (300,)], seed=3)
  with pytest.raises(ValueError, match='load_state_dict'):
    optax_paged.load_state_dict(_make_tx().init(other), saved)


def test_wrong_dtype_in_checkpoint_is_refused(saved_and_fresh):
  saved, fresh = saved_and_fresh
  bad = copy.deepcopy(saved)
  moment = bad[1]['leaves'][0]['moments'][0]
  moment['absmax'] = moment['absmax'].astype(np.float64)
  with pytest.raises(ValueError, match='float32'):
    optax_paged.load_state_dict(fresh, bad)


def test_checkpoint_survives_a_generic_serialiser(tmp_path, saved_and_fresh):
  saved, fresh = saved_and_fresh
  leaves, treedef = jax.tree.flatten(saved)
  np.savez(tmp_path / 'ckpt.npz', *leaves)
  with np.load(tmp_path / 'ckpt.npz') as data:
    arrays = [data[f'arr_{i}'] for i in range(len(leaves))]
  loaded = jax.tree.unflatten(treedef, arrays)
  restored = optax_paged.load_state_dict(fresh, loaded)
  _assert_equal(optax_paged.state_dict(restored), saved)


def test_format_1_checkpoints_still_load(saved_and_fresh):
  # Format 1: the same arrays, a checksum of the moments without the count.
  saved, fresh = saved_and_fresh
  old = copy.deepcopy(saved)
  old[1]['format_version'] = np.asarray(1, np.int32)
  crc = 0
  for leaf in old[1]['leaves']:
    for moment in leaf['moments']:
      for name in sorted(moment):
        crc = zlib.crc32(np.ascontiguousarray(moment[name]).tobytes(), crc)
  old[1]['checksum'] = np.asarray(crc, np.uint32)
  restored = optax_paged.load_state_dict(fresh, old)
  _assert_equal(optax_paged.state_dict(restored), saved)


def test_format_3_checkpoints_without_code_bits_still_load(saved_and_fresh):
  # Format 3 had no 'code_bits': every quantized state was 8-bit.
  saved, fresh = saved_and_fresh
  old = copy.deepcopy(saved)
  old[1]['format_version'] = np.asarray(3, np.int32)
  del old[1]['code_bits']
  restored = optax_paged.load_state_dict(fresh, old)
  _assert_equal(optax_paged.state_dict(restored), saved)


def test_a_refused_second_state_leaves_the_first_untouched():
  params = {'a': random_tree([(64, 80)], seed=4)['leaf0'],
            'b': random_tree([(300, 20)], seed=5)['leaf0']}
  def make():
    return optax.multi_transform(
        {'x': optax_paged.adamw8bit(1e-2, min_8bit_size=256),
         'y': optax_paged.lion8bit(1e-3, min_8bit_size=256)},
        {'a': 'x', 'b': 'y'})
  tx = make()
  _, trained = _steps(tx, params, tx.init(params), 0, 3)
  saved = optax_paged.state_dict(trained)
  fresh = tx.init(params)
  _, fresh = _steps(tx, params, fresh, 10, 1)  # something to overwrite
  before = optax_paged.state_dict(fresh)
  bad = copy.deepcopy(saved)
  parts = bad.inner_states
  parts['y'].inner_state['leaves'][0]['moments'][0]['codes'][5] ^= 1
  with pytest.raises(ValueError, match='checksum'):
    optax_paged.load_state_dict(fresh, bad)
  _assert_equal(optax_paged.state_dict(fresh), before)
  restored = optax_paged.load_state_dict(fresh, saved)
  _assert_equal(optax_paged.state_dict(restored), saved)


def _over_no_leaves(name):
  """An optax_paged optimizer that a wrapper gives no parameter to."""
  if name == 'masked':
    return optax.masked(optax_paged.adamw8bit(1e-2),
                        lambda params: jax.tree.map(lambda _: False, params))
  return optax.multi_transform(
      {'used': optax.sgd(1e-2), 'unused': optax_paged.lion8bit(1e-3)},
      lambda params: jax.tree.map(lambda _: 'used', params))


@pytest.mark.parametrize('name', ['masked', 'multi_transform'])
def test_an_optimizer_over_no_leaves_checkpoints_copies_and_restores(name):
  import flax.serialization  # noqa: PLC0415 - only this test needs Flax

  params = random_tree(SHAPES, seed=6)
  tx = _over_no_leaves(name)
  p_full, s_full = _steps(tx, params, tx.init(params), 0, 4)
  p_half, state = _steps(tx, params, tx.init(params), 0, 2)
  saved = optax_paged.state_dict(state)
  copies = [copy.deepcopy(state), pickle.loads(pickle.dumps(state)),
            optax_paged.load_state_dict(
      tx.init(params), saved), flax.serialization.from_state_dict(
          tx.init(params), flax.serialization.to_state_dict(state))]
  for restored in copies:
    _assert_equal(optax_paged.state_dict(restored), saved)
    p_resumed, s_resumed = _steps(tx, p_half, restored, 2, 2)
    _assert_equal(p_resumed, p_full)
    _assert_equal(optax_paged.state_dict(s_resumed),
                  optax_paged.state_dict(s_full))
