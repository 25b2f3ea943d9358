"""Saving and restoring a whole training state with orbax-checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_paged
from tests.helpers import random_tree

SHAPES = [(64, 80), (300,), (3,)]


def _make_tx(factory=optax_paged.paged_lion8bit):
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      factory(1e-3, min_8bit_size=256),
  )


def _grads(params, seed):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape) * 0.1,
      params,
  )


def _train(tx, params, state, first, count):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for i in range(first, first + count):
    params, state = step(params, state, _grads(params, i))
  return params, state


def _save(path, params, opt_state):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {
        'params': params,
        'opt_state': optax_paged.state_dict(opt_state),
    })


def _restore(path, tx, params_like):
  fresh = tx.init(params_like)
  target = {'params': params_like, 'opt_state': optax_paged.state_dict(fresh)}
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, target)
  return restored['params'], optax_paged.load_state_dict(
      fresh, restored['opt_state'])


# 4-bit Lion's codes are rounded with random bits of the step: a resumed
# run must draw what the uninterrupted one drew.
@pytest.mark.parametrize('factory', [optax_paged.paged_lion8bit,
                                     optax_paged.paged_lion4bit,
                                     optax_paged.adamw4bit])
def test_orbax_round_trip_resumes_bit_identically(tmp_path, factory):
  tx = _make_tx(factory)
  params = random_tree(SHAPES, seed=0)
  p_full, s_full = _train(tx, params, tx.init(params), 0, 6)

  p_half, s_half = _train(tx, params, tx.init(params), 0, 3)
  _save(tmp_path / 'step3', p_half, s_half)
  optax_paged.release(s_half)
  p_restored, s_restored = _restore(tmp_path / 'step3', tx, params)
  p_resumed, s_resumed = _train(tx, jax.tree.map(jnp.asarray, p_restored),
                                s_restored, 3, 3)
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      (p_resumed, optax_paged.state_dict(s_resumed)),
      (p_full, optax_paged.state_dict(s_full)),
  )


def test_orbax_checkpoint_of_another_version_is_refused(tmp_path):
  tx = _make_tx()
  params = random_tree(SHAPES, seed=1)
  _, state = _train(tx, params, tx.init(params), 0, 2)
  saved = optax_paged.state_dict(state)
  saved[1]['format_version'] = np.int32(99)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'old', {'params': params, 'opt_state': saved})
  with pytest.raises(ValueError, match='format version 99'):
    _restore(tmp_path / 'old', tx, params)


def test_orbax_checkpoint_of_another_tree_is_refused(tmp_path):
  tx = _make_tx()
  params = random_tree(SHAPES, seed=2)
  _, state = _train(tx, params, tx.init(params), 0, 1)
  _save(tmp_path / 'ckpt', params, state)
  other = random_tree([(64, 80), (301,), (3,)], seed=2)
  with pytest.raises(ValueError):
    _restore(tmp_path / 'ckpt', tx, other)


def _nnx_optimizer(steps=0):
  from flax import nnx

  model = nnx.Linear(64, 80, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax_paged.adamw8bit(1e-3, min_8bit_size=256), wrt=nnx.Param)
  x = jnp.ones((4, 64))
  for _ in range(steps):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
  return optimizer


def _save_standard(path, tree):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)


def _save_managed(path, tree):
  # Directories made synchronously: after a refused save, Orbax's thread
  # that signals their asynchronous creation waits 300 s at exit.
  options = ocp.CheckpointManagerOptions(async_options=ocp.AsyncOptions(
      create_directories_asynchronously=False))
  with ocp.CheckpointManager(path, options=options) as manager:
    manager.save(1, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()


@pytest.mark.parametrize('save', [_save_standard, _save_managed],
                         ids=['standard', 'manager'])
@pytest.mark.parametrize('pure', [False, True], ids=['state', 'pure_dict'])
def test_orbax_save_of_nnx_state_is_refused_at_the_call(tmp_path, save, pure):
  # nnx.state(optimizer) held the count and not the moments, so Orbax saved
  # it; the loss showed only when a resumed step's output was read.
  from flax import nnx

  tree = nnx.state(_nnx_optimizer(steps=2))
  with pytest.raises(TypeError, match='cannot checkpoint an optax_paged'):
    save(tmp_path / 'ckpt', nnx.to_pure_dict(tree) if pure else tree)
  # Refused before Orbax makes its temporary directory; CheckpointManager
  # makes its root directory when it is constructed.
  left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*'))
  assert left == (['ckpt'] if save is _save_managed else []), left


def _unguarded_checkpoint(path, pure):
  """What Orbax wrote for nnx.state(optimizer) before the refusal: the count.

  A handler with its own type registry skips the registry node, as Orbax's
  global one did, given save arguments made without optax_paged's check.
  """
  from flax import nnx
  from orbax.checkpoint import type_handlers

  unguarded = ocp.PyTreeCheckpointHandler(
      type_handler_registry=type_handlers.create_type_handler_registry(
          (jax.Array, type_handlers.ArrayHandler()),
          (np.ndarray, type_handlers.NumpyHandler())))
  tree = nnx.state(_nnx_optimizer(steps=3))
  # Save arguments as Orbax makes them without optax_paged's check.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(ocp.args.PyTreeSave, '__post_init__', lambda self: None)
    args = ocp.args.PyTreeSave(nnx.to_pure_dict(tree) if pure else tree)
  with ocp.Checkpointer(unguarded) as checkpointer:
    checkpointer.save(path, args=args)


def _restore_standard(path, tree):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, tree)


def _restore_pytree(path, tree):
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(tree))


@pytest.mark.parametrize('target', ['state', 'pure_dict', 'abstract'])
@pytest.mark.parametrize('restore', [_restore_standard, _restore_pytree],
                         ids=['standard', 'pytree'])
def test_orbax_restore_into_nnx_state_is_refused_at_the_call(
    tmp_path, target, restore):
  # Restored, the count alone made the next step fail only once its output
  # was read; a script that never read one exited 0.
  from flax import nnx

  _unguarded_checkpoint(tmp_path / 'ckpt', pure=target == 'pure_dict')
  fresh = _nnx_optimizer()
  before = optax_paged.state_dict(fresh.opt_state)
  if target == 'abstract':
    tree = nnx.state(nnx.eval_shape(_nnx_optimizer))
  else:
    tree = nnx.state(fresh)
  if target == 'pure_dict':
    tree = nnx.to_pure_dict(tree)
  with pytest.raises(TypeError, match='cannot checkpoint an optax_paged'):
    restore(tmp_path / 'ckpt', tree)
  after = optax_paged.state_dict(fresh.opt_state)
  assert int(after['count']) == 0
  assert int(after['checksum']) == int(before['checksum'])
