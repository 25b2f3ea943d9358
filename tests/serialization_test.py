"""Whole train states through flax.serialization and Orbax, resumed in a new
process bit-identically (Linen TrainState and NNX Optimizer)."""

import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests import background

COMMON = '''
import sys
import jax, jax.numpy as jnp, numpy as np, optax, optax_paged
import orbax.checkpoint as ocp
from flax import nnx, serialization
from flax.training import train_state

def tx():
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256))

def batch(i):
    key = jax.random.key(i)
    return jax.random.normal(key, (8, 64)), jax.random.normal(key, (8, 16))

def linen_state(seed):
    params = {'w': jax.random.normal(jax.random.key(seed), (64, 16)) * 0.1,
              'b': jnp.zeros((16,))}
    apply = lambda p, x: x @ p['w'] + p['b']
    return train_state.TrainState.create(apply_fn=apply, params=params, tx=tx())

@jax.jit
def linen_step(state, x, y):
    loss = lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2)
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

class Model(nnx.Module):
    def __init__(self, seed):
        self.linear = nnx.Linear(64, 16, rngs=nnx.Rngs(seed))
    def __call__(self, x):
        return self.linear(x)

def nnx_pair(seed):
    model = Model(seed)
    return model, nnx.Optimizer(model, tx(), wrt=nnx.Param)

@nnx.jit
def nnx_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

path, mode = sys.argv[1], sys.argv[2]
'''

LINEN_START = '''
def start():
    state = linen_state(0)
    for i in range(3):
        state = linen_step(state, *batch(i))
    return state
'''

LINEN_BYTES = LINEN_START + '''
def save(state):
    open(path + '/state.msgpack', 'wb').write(serialization.to_bytes(state))

def restore():
    return serialization.from_bytes(
        linen_state(1), open(path + '/state.msgpack', 'rb').read())
'''

LINEN_ORBAX = LINEN_START + '''
def save(state):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path + '/ckpt', serialization.to_state_dict(state))

def restore():
    fresh = linen_state(1)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path + '/ckpt',
                                serialization.to_state_dict(fresh))
    return serialization.from_state_dict(fresh, restored)
'''

LINEN_DRIVER = '''
state = restore() if mode == 'resumed' else start()
if mode == 'first':
    save(state)
else:
    for i in range(3, 6):
        state = linen_step(state, *batch(i))
    np.save(path + '/' + mode + '.npy', np.asarray(state.params['w']))
'''

NNX_ORBAX = '''
from flax.nnx.training.optimizer import to_opt_state

def start():
    model, optimizer = nnx_pair(0)
    for i in range(3):
        nnx_step(model, optimizer, *batch(i))
    return model, optimizer

def save(model, optimizer):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path + '/ckpt', {
            'model': nnx.to_pure_dict(nnx.state(model)),
            'opt_state': optax_paged.state_dict(optimizer.opt_state),
            'step': optimizer.step.get_value()})

def restore():
    model, optimizer = nnx_pair(1)
    target = {'model': nnx.to_pure_dict(nnx.state(model)),
              'opt_state': optax_paged.state_dict(optimizer.opt_state),
              'step': optimizer.step.get_value()}
    with ocp.StandardCheckpointer() as ckpt:
        saved = ckpt.restore(path + '/ckpt', target)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, saved['model'])
    nnx.update(model, state)
    restored = optax_paged.load_state_dict(optimizer.opt_state,
                                           saved['opt_state'])
    optimizer.opt_state = nnx.data(to_opt_state(restored))
    optimizer.step.set_value(saved['step'])
    return model, optimizer
'''

NNX_DRIVER = '''
model, optimizer = restore() if mode == 'resumed' else start()
if mode == 'first':
    save(model, optimizer)
else:
    for i in range(3, 6):
        nnx_step(model, optimizer, *batch(i))
    np.save(path + '/' + mode + '.npy',
            np.asarray(model.linear.kernel.get_value()))
'''


RECIPES = {
    'linen-flax-bytes': COMMON + LINEN_BYTES + LINEN_DRIVER,
    'linen-orbax': COMMON + LINEN_ORBAX + LINEN_DRIVER,
    'nnx-orbax': COMMON + NNX_ORBAX + NNX_DRIVER,
}

# Runs each recipe's script in its own namespace, with sys.argv set as for a
# script of its own; a recipe that raises writes its traceback and the next
# runs.
RUNNER = '''
import os, sys, traceback
root, modes, recipes = sys.argv[1], sys.argv[2].split(','), RECIPES
for mode in modes:
    for name, script in recipes.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        sys.argv = ['x', os.path.join(root, name), mode]
        try:
            exec(compile(script, name, 'exec'), {'__name__': '__main__'})
        except BaseException:
            with open(os.path.join(root, name, mode + '.err'), 'w') as f:
                f.write(traceback.format_exc())
'''


def _resume_runs():
  """Each recipe's errors and parameters; two processes run all three.

  The first trains 6 steps without stopping ('straight'), then trains 3 and
  saves ('first'); a new process restores and trains 3 more ('resumed').
  """
  outputs, recipes = [], {}
  with tempfile.TemporaryDirectory(prefix='optax_paged_resume_') as root:
    for modes in ('straight,first', 'resumed'):
      outputs.append(background.run_python(
          f'import sys; sys.argv = ["x", {root!r}, {modes!r}]\n'
          f'RECIPES = {RECIPES!r}\n' + RUNNER, timeout=600))
    for name in RECIPES:
      folder = Path(root) / name
      recipes[name] = {
          'errors': {p.stem: p.read_text() for p in folder.glob('*.err')},
          'arrays': {p.stem: np.load(p) for p in folder.glob('*.npy')},
      }
  return outputs, recipes


BACKGROUND_JOBS = {
    'serialization-resume': (_resume_runs,
                             ['test_resume_in_a_new_process_is_bit_identical']),
}


@pytest.mark.parametrize('name', list(RECIPES))
def test_resume_in_a_new_process_is_bit_identical(name):
  outputs, recipes = background.result('serialization-resume', _resume_runs)
  for result in outputs:
    assert result.returncode == 0, result.stderr[-3000:]
  errors = recipes[name]['errors']
  assert not errors, {mode: text[-3000:] for mode, text in errors.items()}
  arrays = recipes[name]['arrays']
  np.testing.assert_array_equal(arrays['resumed'], arrays['straight'])


def _linen_state():
  import jax.numpy as jnp
  from flax.training import train_state

  import optax_paged
  return train_state.TrainState.create(
      apply_fn=None, params={'w': jnp.ones((64, 80))},
      tx=optax_paged.adamw8bit(1e-3, min_8bit_size=256))


def _stepped(state, steps=2):
  import jax
  import jax.numpy as jnp
  grads = jax.tree.map(jnp.ones_like, state.params)
  step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  for _ in range(steps):
    state = step(state, grads)
  return state


def _orbax_saves():
  import orbax.checkpoint as ocp

  def standard(path, tree):
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path, tree)

  def pytree(path, tree):
    with ocp.PyTreeCheckpointer() as ckpt:
      ckpt.save(path, tree)

  def manager(path, tree):
    # Directories made synchronously: after a refused save, Orbax's thread
    # that signals their asynchronous creation waits out its 300 s barrier
    # timeout at interpreter exit.
    options = ocp.CheckpointManagerOptions(async_options=ocp.AsyncOptions(
        create_directories_asynchronously=False))
    with ocp.CheckpointManager(path, options=options) as mngr:
      mngr.save(1, args=ocp.args.StandardSave(tree))
      mngr.wait_until_finished()

  return {'standard': standard, 'pytree': pytree, 'manager': manager}


@pytest.mark.parametrize('saver', ['standard', 'pytree', 'manager'])
@pytest.mark.parametrize('tree', ['linen-train-state', 'plain-pytree'])
def test_orbax_refuses_to_save_a_raw_state_and_leaves_nothing(
    tmp_path, saver, tree):
  # Orbax walks the pytree, which holds the count but not the moments; it
  # would save the count alone. The refusal comes when the save's arguments
  # are made, before Orbax creates its temporary directory (it left a
  # *.orbax-checkpoint-tmp folder behind).
  state = _stepped(_linen_state())
  item = state if tree == 'linen-train-state' else {
      'params': state.params, 'opt_state': state.opt_state}
  with pytest.raises(TypeError, match='cannot checkpoint an optax_paged'):
    _orbax_saves()[saver](tmp_path / 'ckpt', item)
  left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*'))
  # CheckpointManager makes its root directory when it is constructed.
  assert left == (['ckpt'] if saver == 'manager' else []), left


# A refused save of a raw TrainState, in a process of its own: the error is
# the only output (Orbax's directory thread logged about 35 lines of absl
# errors after it, at exit).
_RAW_SAVE_IN_A_FRESH_PROCESS = background.python_job('''
import pathlib, tempfile
import jax, jax.numpy as jnp, optax_paged
import orbax.checkpoint as ocp
from flax.training import train_state

state = train_state.TrainState.create(
    apply_fn=None, params={'w': jnp.ones((64, 80))},
    tx=optax_paged.adamw8bit(1e-3, min_8bit_size=256))
state = jax.jit(lambda s: s.apply_gradients(grads=s.params))(state)
root = pathlib.Path(tempfile.mkdtemp())
try:
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / 'ckpt', state)
except TypeError as error:
    print('REFUSED', str(error).split(':')[0])
print('LEFT', sorted(p.name for p in root.rglob('*')))
''')

BACKGROUND_JOBS['orbax-raw-save'] = (
    _RAW_SAVE_IN_A_FRESH_PROCESS,
    ['test_a_refused_orbax_save_is_one_error_in_a_fresh_process'])


def test_a_refused_orbax_save_is_one_error_in_a_fresh_process():
  result = background.result('orbax-raw-save', _RAW_SAVE_IN_A_FRESH_PROCESS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == ['REFUSED optax_paged', 'LEFT []'], (
      result.stdout)
  logged = [line for line in result.stderr.splitlines()
            if 'absl' in line or 'Traceback' in line or 'Error' in line]
  assert logged == [], result.stderr[-3000:]


def test_orbax_restore_of_a_count_without_moments_fails_loudly(tmp_path):
  # A checkpoint holding a raw train state can still exist (written before
  # the save-time refusal, or through a handler with its own type registry):
  # restoring it into a fresh state must not train on from zeroed moments.
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers

  state = _stepped(_linen_state())
  import jax
  import numpy as np
  unguarded = ocp.PyTreeCheckpointHandler(
      type_handler_registry=type_handlers.create_type_handler_registry(
          (jax.Array, type_handlers.ArrayHandler()),
          (np.ndarray, type_handlers.NumpyHandler()),
          (int, type_handlers.ScalarHandler())))
  # Save arguments as Orbax makes them without optax_paged's check.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(ocp.args.PyTreeSave, '__post_init__', lambda self: None)
    args = ocp.args.PyTreeSave(state)
  with ocp.Checkpointer(unguarded) as ckpt:
    ckpt.save(tmp_path / 'raw', args=args)
  with ocp.Checkpointer(unguarded) as ckpt:
    with pytest.raises(ValueError, match='restored its count without its'):
      ckpt.restore(tmp_path / 'raw', args=ocp.args.PyTreeRestore(
          _linen_state()))
  with ocp.StandardCheckpointer() as ckpt:
    with pytest.raises(TypeError, match='cannot checkpoint an optax_paged'):
      ckpt.restore(tmp_path / 'raw', _linen_state())
