"""Master weights on the TPU path, in Pallas' TPU interpreter, against the
CPU kernel (the registry's path).

The master-weight arithmetic (decode, round ties up, encode, fingerprints)
is exact, and the interpreted kernel runs ``master_weights``' functions.
The optimizer's update is not: XLA:CPU contracts the interpreter's
``a * g + b * m`` into fused multiply-adds, where the C++ kernel rounds
twice (tests/tpu_kernel_test.py). In this process the two paths therefore
agree but for the rare master an ulp apart (a correction unit for 24 bits)
and its code flips. In a process whose XLA:CPU has no FMA instructions
(``--xla_cpu_max_isa=AVX``) they agree bit for bit: parameters, corrections,
fingerprints, codes and absmax (a job beside the suite,
``EXACT_JOB``).
"""

import functools
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import tpu_transform
from optax_paged._src.tpu_state import TpuState
from tests import background
from tests import helpers

# On the CPU on any host: the comparisons hold as XLA:CPU rounds.
pytestmark = pytest.mark.usefixtures('on_cpu')

LR = 1e-2
# A native leaf with a partial second row tile, a flat leaf whose last
# fingerprint block is partial (5000 = 39 * 128 + 8), a float32-moment leaf.
SHAPES = [(200, 256), (5000,), (100,)]
# Without the flat leaf, whose 2048-lane tile takes the interpreter seconds
# to compile, for the tests that are not about layouts.
NATIVE = [SHAPES[0], SHAPES[2]]


def tpu_optimizer(factory, *args, **kwargs):
  with tpu_transform.force('interpret'):
    return factory(*args, **kwargs)


def adamw(path: str, bits: int | None = 24):
  """8-bit AdamW with master weights on the TPU path (in the interpreter)
  or the CPU kernel's; one per session, so that each step compiles once."""
  return _adamw(path, bits)


@functools.cache
def _adamw(path, bits):
  if path == 'tpu':
    return tpu_optimizer(optax_paged.adamw8bit, LR, master_weight_bits=bits)
  return optax_paged.adamw8bit(LR, master_weight_bits=bits)


@functools.cache
def fused_step(tx):
  return jax.jit(lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p))


@functools.cache
def update_and_apply(tx):
  return jax.jit(helpers.update_and_apply(tx))


def masters_of(state, params):
  return {k: np.asarray(v) for k, v in
          optax_paged.master_params(state, params).items()}


def assert_close_but_for_flips(ours, theirs):
  """The rule of tests/helpers.py for results that differ by FMA
  contraction: all but 1e-3 of the elements to rtol 1e-5, or one
  correction unit of a 24-bit master (2^-16 to 2^-15 relative)."""
  for name in theirs:
    a = np.asarray(ours[name], np.float32)
    b = np.asarray(theirs[name], np.float32)
    helpers.assert_equal_but_for_code_flips(
        np.where(np.abs(a - b) <= 2.0**-15 * np.abs(b), b, a), b,
        learning_rate=LR, flipped_fraction=1e-3)


# The fused step with the flat leaf, update + apply_updates without it (the
# two are equal bit for bit: test_fused_step_is_update_and_apply).
@pytest.mark.parametrize('bits, shapes, fused',
                         [(24, SHAPES, True), (32, NATIVE, False)])
def test_as_the_cpu_kernel(bits, shapes, fused):
  params = helpers.random_tree(shapes, jnp.bfloat16)
  tpu, cpu = adamw('tpu', bits), adamw('cpu', bits)
  tpu_state, cpu_state = tpu.init(params), cpu.init(params)
  assert isinstance(tpu_state, TpuState)
  master = tpu_state.leaves['leaf0'].master
  assert master.correction.dtype == (jnp.int8 if bits == 24 else jnp.int16)
  assert master.correction.shape == (200, 256)
  assert master.fingerprints.shape == (2, 200)
  tpu_step, cpu_step = (
      (lambda p, s, g, tx=tx: fused_step(tx)(g, s, p)) if fused
      else update_and_apply(tx) for tx in (tpu, cpu))
  tpu_params = cpu_params = params
  for i in range(3):
    grads = helpers.random_grads(params, seed=i, scale=0.1)
    tpu_params, tpu_state = tpu_step(tpu_params, tpu_state, grads)
    cpu_params, cpu_state = cpu_step(cpu_params, cpu_state, grads)
    assert all(p.dtype == jnp.bfloat16 for p in tpu_params.values())
    assert_close_but_for_flips(tpu_params, cpu_params)
    assert_close_but_for_flips(masters_of(tpu_state, tpu_params),
                               masters_of(cpu_state, cpu_params))
  saved = optax_paged.state_dict(tpu_state)
  for leaf in saved['leaves']:
    assert leaf['master']['correction'].dtype == (
        np.int8 if bits == 24 else np.int16)


def test_fused_step_is_update_and_apply():
  params = helpers.random_tree(NATIVE, jnp.bfloat16)
  tx = adamw('tpu')
  state = tx.init(params)
  for i in range(2):
    grads = helpers.random_grads(params, seed=i, scale=0.1)
    fused, fused_state = fused_step(tx)(grads, state, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    helpers.assert_trees_equal(fused, params)
    helpers.assert_trees_equal(fused_state, state)


def test_a_parameter_changed_outside_drops_its_correction():
  params = helpers.random_tree(SHAPES, jnp.bfloat16)
  tpu, cpu = adamw('tpu'), adamw('cpu')
  tpu_state, cpu_state = tpu.init(params), cpu.init(params)
  grads = helpers.random_grads(params, seed=5, scale=0.1)
  tpu_params, tpu_state = fused_step(tpu)(grads, tpu_state, params)
  cpu_params, cpu_state = fused_step(cpu)(grads, cpu_state, params)
  masters = masters_of(tpu_state, tpu_params)
  # Block (row 3, lanes 128-255) of the native leaf and the flat leaf's
  # partial last block (elements 4992-4999) change outside the optimizer.
  changed = {'leaf0': (np.s_[3, 130], np.s_[3, 128:256]),
             'leaf1': (np.s_[4995], np.s_[4992:5000])}
  for name, (element, block) in changed.items():
    assert np.any(masters[name][block]
                  != helpers.as_f32(tpu_params[name])[block])
    tpu_params[name] = tpu_params[name].at[element].add(1.0)
    cpu_params[name] = cpu_params[name].at[element].add(1.0)
  masters = masters_of(tpu_state, tpu_params)
  for name, (_, block) in changed.items():
    np.testing.assert_array_equal(masters[name][block],
                                  helpers.as_f32(tpu_params[name])[block])
    # Only that block: its neighbours keep their masters.
    row = np.s_[3, 0:128] if name == 'leaf0' else np.s_[4864:4992]
    assert np.any(masters[name][row] != helpers.as_f32(tpu_params[name])[row])
  # The next step starts those blocks' masters from the parameters, as the
  # CPU kernel does.
  grads = helpers.random_grads(params, seed=6, scale=0.1)
  tpu_params, tpu_state = fused_step(tpu)(grads, tpu_state, tpu_params)
  cpu_params, cpu_state = fused_step(cpu)(grads, cpu_state, cpu_params)
  assert_close_but_for_flips(tpu_params, cpu_params)
  assert_close_but_for_flips(masters_of(tpu_state, tpu_params),
                             masters_of(cpu_state, cpu_params))


@pytest.mark.parametrize('direction, shapes',
                         [('cpu_to_tpu', SHAPES), ('tpu_to_cpu', NATIVE)])
def test_checkpoint_moves_between_paths(direction, shapes):
  params = helpers.random_tree(shapes, jnp.bfloat16)
  tpu, cpu = adamw('tpu'), adamw('cpu')
  source, target = (cpu, tpu) if direction == 'cpu_to_tpu' else (tpu, cpu)
  state = source.init(params)
  for i in range(2):
    params, state = fused_step(source)(
        helpers.random_grads(params, seed=i, scale=0.1), state, params)
  saved = optax_paged.state_dict(state)
  assert all('master' in leaf for leaf in saved['leaves'])
  restored = optax_paged.load_state_dict(target.init(params), saved)
  again = optax_paged.state_dict(restored)
  # All but where each path says its leaves lived ('tier').
  helpers.assert_trees_equal(
      {k: v for k, v in again.items() if k != 'leaves'},
      {k: v for k, v in saved.items() if k != 'leaves'})
  for ours, theirs in zip(again['leaves'], saved['leaves'], strict=True):
    helpers.assert_trees_equal((ours['moments'], ours['master']),
                               (theirs['moments'], theirs['master']))
  # The same masters from either path's state.
  helpers.assert_trees_equal(masters_of(restored, params),
                             masters_of(state, params))
  # And the restored state steps on as the source does.
  grads = helpers.random_grads(params, seed=7, scale=0.1)
  ours, _ = fused_step(target)(grads, restored, params)
  theirs, _ = fused_step(source)(grads, state, params)
  assert_close_but_for_flips(ours, theirs)


def test_checkpoint_refusals():
  params = helpers.random_tree(SHAPES[:1], jnp.bfloat16)
  tpu24, tpu32, plain = adamw('tpu'), adamw('tpu', 32), adamw('tpu', None)
  saved = optax_paged.state_dict(tpu24.init(params))
  with pytest.raises(ValueError, match='master_weight_bits differs'):
    optax_paged.load_state_dict(tpu32.init(params), saved)
  with pytest.raises(ValueError, match='this state has none'):
    optax_paged.load_state_dict(plain.init(params), saved)
  saved['leaves'][0]['master']['correction'] = (
      saved['leaves'][0]['master']['correction'] + 1)
  with pytest.raises(ValueError, match='checksum'):
    optax_paged.load_state_dict(tpu24.init(params), saved)
  # A checkpoint without master weights restores zero corrections.
  restored = optax_paged.load_state_dict(
      tpu24.init(params), optax_paged.state_dict(plain.init(params)))
  assert not np.any(np.asarray(restored.leaves['leaf0'].master.correction))


def test_refusals_and_float32_leaves():
  tx = adamw('tpu')
  with pytest.raises(ValueError, match='their own masters'):
    tx.init({'w': jnp.ones((64, 256))})
  with pytest.raises(ValueError, match='must be None, 24'):
    tpu_optimizer(optax_paged.adamw8bit, LR, master_weight_bits=16)
  # A float32 leaf beside a bf16 one keeps no correction; its master is
  # itself.
  params = {'w': jnp.ones((64, 256), jnp.bfloat16), 'b': jnp.ones(100)}
  state = tx.init(params)
  assert state.leaves['b'].master is None
  assert state.leaves['w'].master is not None
  masters = optax_paged.master_params(state, params)
  assert masters['b'].dtype == jnp.float32
  with pytest.raises(ValueError, match='made for a 16-bit one'):
    tx.update(params, state, {'w': params['w'].astype(jnp.float32),
                              'b': params['b']})


def test_host_tier_holds_the_master_too():
  # Each leaf's state: two moments (32768 codes, 512 absmax bytes), its
  # correction (32768) and fingerprints (1024): the budget keeps one.
  params = {'a': jnp.ones((64, 512), jnp.bfloat16),
            'b': jnp.ones((64, 512), jnp.bfloat16)}
  tx = tpu_optimizer(optax_paged.paged_adamw8bit, LR, device_budget=110_000,
                     master_weight_bits=24)
  state = tx.init(params)
  kinds = {k: {x.sharding.memory_kind
               for x in jax.tree.leaves(state.leaves[k].master)}
           for k in params}
  assert kinds == {'a': {'device'}, 'b': {'pinned_host'}}


def exact_mismatches() -> dict[str, int]:
  """Bytes that differ between the two paths (``EXACT_JOB``'s process)."""
  mismatches = {}
  for dtype, bits, shapes in [(jnp.bfloat16, 24, SHAPES),
                              (jnp.bfloat16, 32, NATIVE),
                              (jnp.float16, 24, NATIVE)]:
    params = helpers.random_tree(shapes, dtype)
    tpu, cpu = adamw('tpu', bits), adamw('cpu', bits)
    steps = [update_and_apply(tx) for tx in (tpu, cpu)]
    runs = [(params, tpu.init(params)), (params, cpu.init(params))]
    count = 0
    for i in range(3):
      grads = helpers.random_grads(params, seed=i, scale=0.1)
      runs = [step(p, s, grads) for step, (p, s) in zip(steps, runs,
                                                        strict=True)]
      # Parameters, codes, absmax, float32 moments, corrections,
      # fingerprints and the checksums over them (not where each path says
      # its leaves lived).
      ours, theirs = ((p, [(leaf['moments'], leaf['master']) for leaf in
                           optax_paged.state_dict(s)['leaves']])
                      for p, s in runs)
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs),
                      strict=True):
        a, b = np.atleast_1d(a), np.atleast_1d(b)
        count += int(np.sum(a.view(np.uint8) != b.view(np.uint8)))
    mismatches[f'{jnp.dtype(dtype).name}-{bits}'] = count
  mismatches['32-bit master - float32 run'] = _float32_run_mismatches()
  return mismatches


def _float32_run_mismatches() -> int:
  """Masters of a 32-bit master run whose bits are not a float32 run's.

  As tests/master_weights_test.py's: the same bf16-valued gradients, and
  parameters that no step takes across zero or below half their size.
  """
  w = jax.random.normal(jax.random.PRNGKey(0), (64, 256)) * 0.3
  p32 = {'w': (w + jnp.sign(w)).astype(jnp.bfloat16).astype(jnp.float32)}
  p16 = {'w': p32['w'].astype(jnp.bfloat16)}
  ours_tx = tpu_optimizer(optax_paged.adamw8bit, 1e-3, master_weight_bits=32)
  theirs_tx = tpu_optimizer(optax_paged.adamw8bit, 1e-3)
  ours, theirs = p16, p32
  ours_state, theirs_state = ours_tx.init(ours), theirs_tx.init(theirs)
  for i in range(3):
    g = jax.random.normal(jax.random.PRNGKey(100 + i), (64, 256)) * 0.01
    g = g.astype(jnp.bfloat16)
    ours, ours_state = fused_step(ours_tx)({'w': g}, ours_state, ours)
    theirs, theirs_state = fused_step(theirs_tx)(
        {'w': g.astype(jnp.float32)}, theirs_state, theirs)
  masters = np.asarray(optax_paged.master_params(ours_state, ours)['w'])
  return int(np.sum(masters.view(np.uint32)
                    != np.asarray(theirs['w']).view(np.uint32)))


# A process whose XLA:CPU emits no FMA instructions.
EXACT_SCRIPT = """
import json, os
os.environ['XLA_FLAGS'] = '--xla_cpu_max_isa=AVX'
from tests import tpu_master_weights_test
print('RESULT', json.dumps(tpu_master_weights_test.exact_mismatches()))
"""


def _exact_job():
  return background.run_python(EXACT_SCRIPT, timeout=400)


BACKGROUND_JOBS = {
    'tpu-master-weights-exact': (_exact_job,
                                 ['test_bit_for_bit_without_fma']),
}


@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64'),
                    reason='--xla_cpu_max_isa=AVX is an x86 setting')
def test_bit_for_bit_without_fma():
  done = background.result('tpu-master-weights-exact', _exact_job)
  lines = [line for line in done.stdout.splitlines()
           if line.startswith('RESULT ')]
  assert done.returncode == 0 and lines, done.stderr[-3000:]
  mismatches = json.loads(lines[0][len('RESULT '):])
  # Every byte of the state and the parameters, after each of 3 steps; and
  # a 32-bit master is a float32 run's parameter, bit for bit.
  assert mismatches == {'bfloat16-24': 0, 'bfloat16-32': 0, 'float16-24': 0,
                        '32-bit master - float32 run': 0}, mismatches
