"""Every instruction-set path of the CPU kernel gives the same bits.

The CPU codec and update loop choose at run time between AVX-512 (with
gathers, on Intel), AVX2 (without gathers: AMD, and every CPU with AVX2 but
no AVX-512) and x86-64's baseline (ffi/cpu_codec.cc); the 4-bit codec between
AVX-512, AVX2 and the scalar loops. ``OPTAX_PAGED_CPU_ISA`` caps the choice,
so one machine runs the paths other CPUs take: a worker makes the same codes
and steps in a fresh process under each cap, and every result must equal the
default path's bit for bit, and so the baseline (scalar) path's. CI thereby
covers the AVX2 path on an AVX-512 runner, and the baseline path anywhere.
"""

import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from optax_paged._src import ffi

WORKER = textwrap.dedent('''
    import sys

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import optax_paged
    from optax_paged._src import dynamic_map
    from optax_paged._src import ffi

    ext = ffi.extension()
    out = {'avx2': np.asarray(ext.has_avx2()),
           'avx512': np.asarray(ext.testing.has_avx512())}

    # The kernel's codec: codes, absmax and decoded values of blocks with
    # every kind of value, and a partial last block.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(70001) *
         np.exp(rng.uniform(-40, 5, 70001))).astype(np.float32)
    x[rng.integers(0, x.size, 20)] = [np.inf, -np.inf, np.nan, -0.0, 1e-45] * 4
    for signed in (True, False):
      codes, absmax = ext.quantize_blockwise(x, signed)
      out[f'codes_{signed}'] = np.asarray(codes)
      out[f'absmax_{signed}'] = np.asarray(absmax)
      out[f'values_{signed}'] = np.asarray(
          ext.dequantize_blockwise(codes, absmax, signed))

    # The 4-bit codec (blocks of 128). Each block of `sweep` holds 1.0, so
    # that its scale is exactly 1 and the sweep's values are the scaled
    # values the codec compares: every entry of both 4-bit maps, every
    # midpoint between neighbours (float32, as the tables compute them) and
    # the floats on either side of each, with both signs (each twice, side
    # by side: in both nibbles of a byte); then blocks with
    # a NaN, an infinity, only zeros, only subnormals (a zero scale), and a
    # short odd last block. Stochastic rounding takes the signed ones from
    # element 2^32 - 300 of a leaf, so that the index's high half changes
    # inside the sweep.
    def around(points):
      points = np.asarray(points, np.float32)
      return np.concatenate([points, np.nextafter(points, np.float32(-2)),
                             np.nextafter(points, np.float32(2))])

    points = []
    for entries in (dynamic_map.four_bit_signed_map(),
                    dynamic_map.four_bit_unsigned_map()):
      entries = np.asarray(entries, np.float32)
      middle = np.float32(0.5) * (entries[:-1] + entries[1:])
      points.append(around(np.concatenate([entries, middle])))
    points = np.concatenate(points + [np.float32([0.0, 1e-45, 1e-38])])
    points = np.repeat(np.concatenate([points, -points]), 2)
    blocks = [np.concatenate([[np.float32(1.0)], np.resize(chunk, 127)])
              for chunk in np.array_split(points, -(-points.size // 127))]
    blocks += [np.resize(np.float32(b), 128) for b in
               ([0.5, np.nan, -0.25], [np.inf, 0.1], [-np.inf, 0.1], [0.0],
                [1e-40, -3e-39, 0.0])]
    sweep = np.concatenate(blocks + [
        rng.standard_normal(77).astype(np.float32)])
    for signed, stochastic in ((True, False), (False, False), (True, True)):
      codes, absmax = ext.testing.quantize_four_bit(
          sweep, signed, stochastic, 0x9e3779b9, 2**32 - 300)
      kind = f'four_bit_{signed}_{stochastic}'
      out[f'{kind}_codes'] = np.asarray(codes)
      out[f'{kind}_absmax'] = np.asarray(absmax)
      out[f'{kind}_values'] = np.asarray(ext.testing.dequantize_four_bit(
          codes, absmax, signed, sweep.size))
    # Every byte (both nibbles of every code pair) against scales of every
    # kind, decoded; the odd size leaves the last high nibble unread.
    every_byte = np.tile(np.arange(256, dtype=np.uint8), 8)
    scales = np.resize(np.float32([1.0, 0.37, 0.0, np.nan, np.inf, 1e-40,
                                   3e38, -0.0, 2.5e-5, 7.0, -1.5]), 32)
    for signed in (True, False):
      out[f'four_bit_every_byte_{signed}'] = np.asarray(
          ext.testing.dequantize_four_bit(every_byte, scales, signed,
                                          2 * every_byte.size - 1))

    # Steps of optimizers over leaves whose sizes cut blocks and vectors
    # (the largest is split among threads), fused and strict.
    shapes = [(1,), (7,), (129,), (255,), (257,), (4099,), (600, 1001)]
    cases = {
        'adamw8bit': (optax_paged.paged_adamw8bit(1e-3, weight_decay=0.1),
                      jnp.float32),
        'adamw4bit': (optax_paged.adamw4bit(1e-3), jnp.float32),
        'lion4bit': (optax_paged.lion4bit(1e-4), jnp.float32),
        'ademamix8bit': (optax_paged.ademamix8bit(1e-3), jnp.float32),
        'adamw8bit_bf16_master': (
            optax_paged.adamw8bit(1e-3, master_weight_bits=24), jnp.bfloat16),
    }
    keys = jax.random.split(jax.random.key(1), len(shapes))
    for name, (tx, dtype) in cases.items():
      params = {f'p{i}': (0.1 * jax.random.normal(k, s)).astype(dtype)
                for i, (k, s) in enumerate(zip(keys, shapes))}

      def grads_at(step, params=params):
        return jax.tree.map(
            lambda p: (1e-2 * jax.random.normal(jax.random.key(step), p.shape)
                       ).astype(p.dtype), params)

      def strict(params, state, grads, tx=tx):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      def fused(params, state, grads, tx=tx):
        return optax_paged.apply_gradients(tx, grads, state, params)

      for kind, step in (('strict', strict), ('fused', fused)):
        step = jax.jit(step)
        p, state = params, tx.init(params)
        for t in range(3):
          p, state = step(p, state, grads_at(t))
        for leaf, value in p.items():
          out[f'{name}_{kind}_{leaf}'] = np.asarray(
              jax.lax.bitcast_convert_type(value, jnp.uint16)
              if value.dtype == jnp.bfloat16 else value)
        saved = optax_paged.state_dict(state)
        for i, leaf in enumerate(saved['leaves']):
          for m, moment in enumerate(leaf['moments']):
            for field, array in moment.items():
              out[f'{name}_{kind}_state_{i}_{m}_{field}'] = np.asarray(array)
    np.savez(sys.argv[1], **out)
''')


_X86 = platform.machine() in ('x86_64', 'AMD64')


def _start_worker(path, isa):
  """The worker under ``isa``'s cap (None: the default path), started."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('OPTAX_PAGED_CPU_ISA', None)
  if isa is not None:
    env['OPTAX_PAGED_CPU_ISA'] = isa
  stderr = open(path.with_suffix('.stderr'), 'w+')  # noqa: SIM115
  process = subprocess.Popen([sys.executable, '-c', WORKER, str(path)],
                             stdout=subprocess.DEVNULL, stderr=stderr,
                             text=True, env=env)
  return process, path, stderr


@pytest.fixture(scope='module')
def workers(tmp_path_factory):
  """The default path's worker and (on x86-64) the capped ones, started at
  once: each is its own process, and the tests wait for theirs."""
  root = tmp_path_factory.mktemp('cpu_paths')
  started = {isa: _start_worker(root / f'{isa or "default"}.npz', isa)
             for isa in ((None, 'avx2', 'sse2') if _X86 else (None,))}
  yield started
  for process, _, stderr in started.values():
    if process.poll() is None:
      process.kill()
    process.wait()
    stderr.close()


def _result(workers, isa):
  process, path, stderr = workers[isa]
  process.wait(timeout=600)
  stderr.seek(0)
  assert process.returncode == 0, stderr.read()[-3000:]
  with np.load(path) as results:
    return dict(results)


@pytest.fixture(scope='module')
def default_path(workers):
  return _result(workers, None)


@pytest.mark.skipif(not _X86, reason='the instruction-set paths are x86-64 '
                    'paths')
@pytest.mark.parametrize('isa', ['avx2', 'sse2'])
def test_capped_path_gives_the_default_paths_bits(isa, default_path,
                                                  workers):
  if isa == 'avx2' and not ffi.extension().has_avx2():
    pytest.skip('this CPU has no AVX2')
  capped = _result(workers, isa)
  # The cap took effect: no AVX-512 under it, and no AVX2 under sse2.
  assert not capped['avx512']
  assert bool(capped['avx2']) == (isa == 'avx2')
  assert capped.keys() == default_path.keys()
  for name, expected in default_path.items():
    if name in ('avx2', 'avx512'):
      continue
    np.testing.assert_array_equal(capped[name], expected, err_msg=name)


def test_default_path_fused_step_equals_update_and_apply(default_path):
  # The worker's fused and strict steps agree bitwise (and so, by the test
  # above, do those of every path).
  strict = {k: v for k, v in default_path.items() if '_strict_' in k}
  assert strict
  for name, expected in strict.items():
    np.testing.assert_array_equal(
        default_path[name.replace('_strict_', '_fused_')], expected,
        err_msg=name)


@pytest.mark.parametrize('kind', ['True_False', 'False_False', 'True_True'])
def test_four_bit_sweep_meets_every_code(kind, default_path):
  # The sweep that the capped paths must reproduce reaches all sixteen
  # codes of each rounding, in both nibbles.
  codes = default_path[f'four_bit_{kind}_codes']
  for nibble in (codes & 0xF, codes >> 4):
    assert set(np.unique(nibble)) == set(range(16)), kind
