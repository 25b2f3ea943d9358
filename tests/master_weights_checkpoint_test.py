"""Master weights in checkpoints, copies and pickles (format 5)."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from tests.helpers import random_grads
from tests.helpers import random_tree

SHAPES = [(300,), (64, 65)]


def _trained(bits=32, steps=3, dtype=jnp.bfloat16):
  params = random_tree(SHAPES, dtype, seed=3)
  tx = optax_paged.adamw8bit(1e-2, master_weight_bits=bits, min_8bit_size=1)
  state = tx.init(params)
  for i in range(steps):
    updates, state = tx.update(random_grads(params, seed=i, scale=0.1),
                               state, params)
    params = optax.apply_updates(params, updates)
  return tx, params, state


def _next_updates(tx, state, params):
  updates, _ = tx.update(random_grads(params, seed=99, scale=0.1), state,
                         params)
  return {k: np.asarray(v).view(np.uint16) for k, v in updates.items()}


def _assert_same(a, b):
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_state_dict_round_trip_keeps_the_masters():
  tx, params, state = _trained()
  saved = optax_paged.state_dict(state)
  assert 'master' in saved['leaves'][0]
  assert int(saved['format_version']) == 5
  masters = optax_paged.master_params(state, params)
  fresh = optax_paged.load_state_dict(tx.init(params), saved)
  _assert_same({k: np.asarray(v) for k, v in masters.items()},
               {k: np.asarray(v) for k, v in
                optax_paged.master_params(fresh, params).items()})
  expected = _next_updates(tx, copy.deepcopy(state), params)
  _assert_same(expected, _next_updates(tx, fresh, params))


def test_a_corrupted_correction_is_refused_and_changes_nothing():
  tx, params, state = _trained()
  saved = optax_paged.state_dict(state)
  saved['leaves'][1]['master']['correction'] = (
      saved['leaves'][1]['master']['correction'].copy())
  saved['leaves'][1]['master']['correction'][5] += 1
  target = tx.init(params)
  with pytest.raises(ValueError, match='checksum'):
    optax_paged.load_state_dict(target, saved)
  assert int(target.count) == 0


def test_a_checkpoint_without_masters_starts_them_from_the_parameters():
  # An earlier checkpoint, or one saved without master weights: the
  # corrections restore as zero even over a state already stepped.
  params = random_tree(SHAPES, jnp.bfloat16, seed=3)
  plain = optax_paged.adamw8bit(1e-2, min_8bit_size=1)
  plain_state = plain.init(params)
  plain_state = plain.update(random_grads(params, seed=0), plain_state,
                             params)[1]
  saved = optax_paged.state_dict(plain_state)
  saved['format_version'] = np.asarray(4, np.int32)  # as format 4 wrote it
  tx, stepped_params, stepped = _trained()
  restored = optax_paged.load_state_dict(stepped, saved)
  masters = optax_paged.master_params(restored, stepped_params)
  for name in masters:
    np.testing.assert_array_equal(
        np.asarray(masters[name]),
        np.asarray(stepped_params[name], np.float32))


def test_masters_cannot_be_dropped_or_resized_by_a_load():
  _, params, state = _trained(bits=32)
  saved = optax_paged.state_dict(state)
  plain = optax_paged.adamw8bit(1e-2, min_8bit_size=1).init(params)
  with pytest.raises(ValueError, match='keeps master weights'):
    optax_paged.load_state_dict(plain, saved)
  narrower = optax_paged.adamw8bit(1e-2, master_weight_bits=24,
                                   min_8bit_size=1).init(params)
  with pytest.raises(ValueError, match='master_weight_bits differs'):
    optax_paged.load_state_dict(narrower, saved)


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_copies_keep_the_masters(how):
  tx, params, state = _trained(bits=24)
  if how == 'deepcopy':
    copied = copy.deepcopy(state)
  else:
    copied = pickle.loads(pickle.dumps(state))
  expected = _next_updates(tx, state, params)
  _assert_same(expected, _next_updates(tx, copied, params))


def test_flax_serialization_keeps_the_masters():
  from flax import serialization
  tx, params, state = _trained(bits=32)
  saved = serialization.to_state_dict({'opt': state})
  restored = serialization.from_state_dict({'opt': tx.init(params)}, saved)
  expected = _next_updates(tx, state, params)
  _assert_same(expected, _next_updates(tx, restored['opt'], params))


def test_memory_report_counts_the_correction_bytes():
  params = {'w': jnp.ones((4096,), jnp.bfloat16)}
  sizes = {}
  for bits in (None, 24, 32):
    tx = optax_paged.adamw8bit(1e-3, master_weight_bits=bits)
    sizes[bits] = optax_paged.memory_report(tx.init(params)).total_bytes
  # 1 or 2 bytes a parameter, and a fingerprint a 128 (aligned to 256 B).
  assert sizes[24] - sizes[None] == 4096 + 256
  assert sizes[32] - sizes[None] == 2 * 4096 + 256
  jax.block_until_ready(params)
