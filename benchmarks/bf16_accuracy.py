"""How close bf16-parameter training stays to fp32: the master-weight table.

A noisy quadratic problem of 2.1M parameters in 8 leaves, 300 steps of
AdamW (lr 1e-3, steps about an eighth of a bf16 ulp at the parameters'
scale). Every run sees the same gradients as a function of its own
parameters. The error of a bf16 run is the distance of its parameters (its
float32 masters, where it keeps them) from the float32-parameter
``optax.adamw`` run's, as a fraction of the distance that run moved.

  .venv/bin/python benchmarks/bf16_accuracy.py [--steps 300]
      [--write benchmarks/RESULTS.md]

Where flashoptim-jax is installed and the backend is a GPU (its kernels are
Pallas GPU kernels), its fused ``flash_adamw`` with and without its 24-bit
master weights adds two rows (it is not a dependency: install it for the
benchmark alone).

Accuracy does not depend on the device: the CPU and GPU kernels compute the
same maths (the GPU contracts into FMA), so the table from a CPU run holds
for the GPU; step times belong to benchmarks/gpu_step.py.
"""

import argparse
import datetime
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged

SHAPES = [(512, 512)] * 8
LEARNING_RATE = 1e-3
NOISE = 0.5


def _problem(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(SHAPES))
  start = {f'w{i}': jax.random.normal(keys[i], s) for i, s in
           enumerate(SHAPES)}
  optimum = {f'w{i}': start[f'w{i}'] + 0.3 * jax.random.normal(
      keys[len(SHAPES) + i], s) for i, s in enumerate(SHAPES)}
  return start, optimum


@jax.jit
def _grads(params, optimum, step):
  """Curvature 1 toward the optimum plus fresh noise, in the params' dtype."""
  def leaf(p, target, index):
    key = jax.random.fold_in(jax.random.PRNGKey(1000 + index), step)
    g = (p.astype(jnp.float32) - target) + NOISE * jax.random.normal(
        key, p.shape)
    return g.astype(p.dtype)
  return {name: leaf(params[name], optimum[name], i)
          for i, name in enumerate(sorted(params))}


def _run(tx, params, optimum, steps, fused, stochastic=False):
  state = tx.init(params)
  if fused:
    step = jax.jit(lambda g, s, p: optax_paged.apply_gradients(
        tx, g, s, p, stochastic_rounding=stochastic))
  else:
    def plain(g, s, p):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s
    step = jax.jit(plain)
  start = time.perf_counter()
  for i in range(steps):
    params, state = step(_grads(params, optimum, i), state, params)
  jax.block_until_ready(params)
  return params, state, time.perf_counter() - start


def _distance(a, b):
  return float(np.sqrt(sum(
      np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))
             ** 2) for k in a)))


# (row, factory, fused, stochastic rounding, master_weight_bits); None as
# the factory is optax.adamw.
RUNS = [
    ('`optax.adamw` (bf16 moments)', None, False, False, None),
    ('`paged_adamw8bit`, fused', 'paged_adamw8bit', True, False, None),
    ('`paged_adamw8bit`, fused, stochastic rounding', 'paged_adamw8bit', True,
     True, None),
    ('`paged_adamw4bit`, fused', 'paged_adamw4bit', True, False, None),
    ('`paged_adamw8bit`, fused, `master_weight_bits=24`', 'paged_adamw8bit',
     True, False, 24),
    ('`paged_adamw8bit`, fused, `master_weight_bits=32`', 'paged_adamw8bit',
     True, False, 32),
    ('`paged_adamw8bit`, update + apply, `master_weight_bits=24`',
     'paged_adamw8bit', False, False, 24),
    ('`paged_adamw4bit`, fused, `master_weight_bits=24`', 'paged_adamw4bit',
     True, False, 24),
    ('`paged_adamw` (fp32 moments), fused, `master_weight_bits=32`',
     'paged_adamw', True, False, 32),
]


def _make(factory, bits=None):
  if factory is None:
    return optax.adamw(LEARNING_RATE)
  return getattr(optax_paged, factory)(LEARNING_RATE, master_weight_bits=bits)


def _flash_rows(bf16, optimum, reference, moved, steps):
  """flashoptim-jax's rows, where it is installed and runs (GPU)."""
  try:
    import flashoptim_jax  # noqa: PLC0415
  except ImportError:
    return []
  if jax.default_backend() != 'gpu':
    return []
  out = []
  for bits in (24, None):
    tx = flashoptim_jax.flash_adamw(LEARNING_RATE, weight_decay=1e-4,
                                    master_weight_bits=bits)
    params, state = bf16, tx.init(bf16)
    step = jax.jit(lambda p, s, g, tx=tx: tx.step(p, s, g))
    start = time.perf_counter()
    for i in range(steps):
      params, state = step(params, state, _grads(params, optimum, i))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    weights = (flashoptim_jax.reconstruct_weights(params, state.ecc) if bits
               else params)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    name = (f'flashoptim-jax `flash_adamw`, '
            f'{"24-bit master" if bits else "master weights off"}')
    out.append((name, nbytes / 2**20, _distance(weights, reference) / moved,
                float('nan'), 1e3 * seconds / steps))
  return out


def rows(steps):
  """Per run: (row, state MiB, error against optax.adamw in fp32, error
  against the same optimizer with fp32 parameters, CPU ms a step)."""
  start, optimum = _problem()
  fp32 = {}
  for factory in (None, 'paged_adamw8bit', 'paged_adamw4bit', 'paged_adamw'):
    fp32[factory], _, _ = _run(_make(factory), start, optimum, steps,
                               fused=factory is not None)
  reference = fp32[None]
  moved = _distance(reference, start)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), start)
  out = [('same optimizer, fp32 parameters: ' + (f or 'optax.adamw'),
          float('nan'), _distance(fp32[f], reference) / moved, 0.0, 0.0)
         for f in ('paged_adamw8bit', 'paged_adamw4bit', 'paged_adamw')]
  for name, factory, fused, stochastic, bits in RUNS:
    params, state, seconds = _run(_make(factory, bits), bf16, optimum, steps,
                                  fused, stochastic)
    weights = (optax_paged.master_params(state, params) if bits else params)
    out.append((name, optax_paged.state_nbytes(state) / 2**20,
                _distance(weights, reference) / moved,
                _distance(weights, fp32[factory]) / moved,
                1e3 * seconds / steps))
    print(f'{name:64s} {out[-1][1]:6.1f} MiB  error {out[-1][2]:.4f} '
          f'/ {out[-1][3]:.4f}', flush=True)
  return out + _flash_rows(bf16, optimum, reference, moved, steps)


def _machine() -> str:
  """The GPU's name on a GPU backend, else the CPU's architecture."""
  if jax.default_backend() == 'gpu':
    return jax.devices()[0].device_kind
  return platform.processor() or platform.machine()


def table(results, steps):
  n = sum(int(np.prod(s)) for s in SHAPES)
  lines = [
      f'bf16 accuracy ({n / 1e6:.1f}M bf16 parameters in {len(SHAPES)} '
      f'leaves, {steps} noisy AdamW steps at lr {LEARNING_RATE}, steps about '
      'an eighth of a bf16 ulp; '
      f'{_machine()}, '
      f'{datetime.date.today()}, jax {jax.__version__}). Error: distance of '
      "the parameters (a run's float32 masters where it keeps them) from an "
      'fp32-parameter run, as a fraction of the distance `optax.adamw` moved '
      'in fp32: against `optax.adamw` in fp32, and against the same '
      'optimizer with fp32 parameters (what the bf16 parameters alone cost). '
      f'{jax.default_backend().upper()} step times of this loop, for '
      'orientation only (gpu_step.py times steps properly).',
      '',
      '| run | state | error vs `optax.adamw` fp32 | vs same optimizer fp32 '
      '| ms/step |',
      '|---|---:|---:|---:|---:|',
  ]
  for name, mib, error, own, ms in results:
    if mib != mib:  # an fp32-parameter baseline
      lines.append(f'| {name} | | {error:.4f} | | |')
    else:
      own = '' if own != own else f'{own:.4f}'  # nan: no fp32 twin run
      lines.append(f'| bf16: {name} | {mib:.1f} MiB | {error:.4f} | '
                   f'{own} | {ms:.1f} |')
  return '\n'.join(lines) + '\n'


def write(path, text):
  marker_begin = '<!-- bf16_accuracy:begin -->'
  marker_end = '<!-- bf16_accuracy:end -->'
  block = f'{marker_begin}\n### bf16 training accuracy\n\n{text}{marker_end}'
  with open(path) as f:
    content = f.read()
  pattern = re.compile(re.escape(marker_begin) + '.*?' + re.escape(marker_end),
                       re.S)
  content = (pattern.sub(block, content) if pattern.search(content)
             else content.rstrip('\n') + '\n\n' + block + '\n')
  with open(path, 'w') as f:
    f.write(content)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--write', help='RESULTS.md to update')
  args = parser.parse_args()
  text = table(rows(args.steps), args.steps)
  print(text)
  if args.write:
    write(args.write, text)


if __name__ == '__main__':
  main()
