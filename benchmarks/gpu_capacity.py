"""Capacity: the largest model whose AdamW step runs on one GPU.

The step is what a training step holds: the parameters, the gradients made
in the step (``jax.grad`` of a loss), the optimizer state, with the
parameters and state donated. For each optimizer (``optax.adamw``,
``paged_adamw8bit`` on the device tier, ``paged_adamw8bit`` on the host
tier; with ``--optimizers``, the bf16 rows: ``optax.adamw`` on bf16
parameters, and ``paged_adamw8bit`` on bf16 parameters with 24-bit master
weights on the host tier) a bisection over model sizes runs each probe in a
fresh process (an out-of-memory step leaves nothing behind), at JAX's
default memory settings (preallocation off) or with
``XLA_PYTHON_CLIENT_MEM_FRACTION`` raised (one run each). A probe
initialises the state and runs three steps; it reports the median time of
the last two and the compiled step's temporary bytes (XLA's
``memory_analysis``: the gradients live at once), or the error that stopped
it. ``--max-call-bytes`` sets the bytes of gradients one update call takes
(``spmd.MAX_CALL_BYTES``), to compare with one call over every gradient.

  python benchmarks/gpu_capacity.py --setting default --write RESULTS.md
  python benchmarks/gpu_capacity.py --setting raised --write RESULTS.md
  python benchmarks/gpu_capacity.py --smoke   # the machinery, tiny, on CPU
  python benchmarks/gpu_capacity.py --probe \
      'paged_adamw8bit, bf16, 24-bit master, host tier' 12e9   # one probe

The host tier's state lives in managed memory preferring host RAM; the
registry never places more state on the device than is free, so no probe
oversubscribes the GPU.
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import cpu_step

# One RESULTS.md section per memory setting and parameter dtype (each run
# fits one device call): fp32 rows, or bf16 rows (issue 25).
MARKS = {name: (f'<!-- gpu_capacity_{name}:begin -->',
                f'<!-- gpu_capacity_{name}:end -->')
         for name in ('default', 'raised', 'default_bf16', 'raised_bf16')}
# One leaf holds at most this many parameters (1 GiB of fp32), as a matrix
# of COLS columns.
LEAF = 1 << 28
COLS = 4096
OPTIMIZERS = ('optax.adamw', 'paged_adamw8bit', 'paged_adamw8bit, host tier',
              'paged_adamw8bit, automatic budget, memory_guarded',
              'optax.adamw, bf16',
              'paged_adamw8bit, bf16, 24-bit master, host tier')
# The probe's spmd.MAX_CALL_BYTES, where --max-call-bytes sets it.
CALL_BYTES_ENV = 'OPTAX_PAGED_CAPACITY_MAX_CALL_BYTES'


def probe(optimizer: str, num_params: int) -> dict:
  """Runs the step at ``num_params`` in this process: ok, time or error."""
  import jax
  import jax.numpy as jnp
  import optax

  import optax_paged
  from optax_paged._src import spmd

  if CALL_BYTES_ENV in os.environ:
    spmd.MAX_CALL_BYTES = int(float(os.environ[CALL_BYTES_ENV]))
  dtype = jnp.bfloat16 if 'bf16' in optimizer else jnp.float32
  num_params -= num_params % COLS
  sizes = [LEAF] * (num_params // LEAF)
  if num_params % LEAF:
    sizes.append(num_params % LEAF)
  if optimizer == 'optax.adamw':
    tx = optax.adamw(1e-4)

    def update(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
  else:
    budget = 0 if 'host' in optimizer else 1.0
    if 'automatic' in optimizer:
      budget = 'auto'
    master = {'master_weight_bits': 24} if 'master' in optimizer else {}
    tx = optax_paged.paged_adamw8bit(1e-4, device_budget=budget, **master)

    def update(grads, state, params):
      return optax_paged.apply_gradients(tx, grads, state, params)

  def loss(params):
    # A layer's weight gradient comes out of a matmul, so XLA materializes
    # it for every optimizer (the gradient of an elementwise loss would be
    # fused into optax's update and cost no memory there).
    return sum(jnp.sum(jnp.square(jnp.ones((8, p.shape[0]), p.dtype) @ p))
               for p in params.values()) * 1e-6

  @jax.jit
  def make_params():
    return {f'w{i:03d}': jnp.full((n // COLS, COLS), 0.01, dtype)
            for i, n in enumerate(sizes)}

  jit = (optax_paged.memory_guarded if 'guarded' in optimizer
         else jax.jit)
  step = jit(lambda p, s: update(jax.grad(loss)(p), s, p),
             donate_argnums=(0, 1))
  facts = {'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
           'max_call_bytes': spmd.MAX_CALL_BYTES}
  try:
    params = make_params()
    state = tx.init(params)
    if jit is jax.jit:
      step = step.lower(params, state).compile()
      facts['temp_gib'] = round(
          step.memory_analysis().temp_size_in_bytes / 2**30, 2)
    times = []
    for _ in range(3):
      start = time.perf_counter()
      params, state = step(params, state)
      jax.block_until_ready(params)
      times.append(time.perf_counter() - start)
    return {'ok': True, 'step_ms': statistics.median(times[1:]) * 1e3,
            **facts}
  except Exception as error:  # noqa: BLE001 - the probe reports, not raises
    return {'ok': False, 'error': f'{type(error).__name__}: '
            f'{str(error).splitlines()[0][:160]}', **facts}


def run_probe(optimizer: str, num_params: int, env: dict) -> dict:
  """``probe`` in a fresh process (a failed step must not leak memory)."""
  command = [sys.executable, __file__, '--probe', optimizer,
             str(num_params)]
  done = subprocess.run(command, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
  if not lines:
    return {'ok': False, 'error': f'exit {done.returncode}: '
            f'{done.stderr.strip().splitlines()[-1:]}'}
  return json.loads(lines[-1])


def largest(optimizer: str, lo: int, hi: int, step: int, env: dict,
            log: list) -> tuple[int, dict, int, dict]:
  """Bisects on multiples of ``step``: the largest size that runs, the
  smallest that fails, and their probes (0 and {} where none did)."""
  good, good_result, bad, bad_result = 0, {}, 0, {}
  lo_k, hi_k = lo // step, hi // step
  while lo_k <= hi_k:
    mid = (lo_k + hi_k) // 2
    result = run_probe(optimizer, mid * step, env)
    log.append((optimizer, mid * step, result))
    print(f'  {optimizer:28s} {mid * step / 1e9:6.2f}B  {result}',
          flush=True)
    if result['ok']:
      good, good_result, lo_k = mid * step, result, mid + 1
    else:
      bad, bad_result, hi_k = mid * step, result, mid - 1
  return good, good_result, bad, bad_result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--probe', nargs=2, metavar=('OPTIMIZER', 'PARAMS'))
  parser.add_argument('--setting', choices=sorted(MARKS), default='default',
                      help="JAX's default memory settings (preallocation off) "
                      'or XLA_PYTHON_CLIENT_MEM_FRACTION raised')
  parser.add_argument('--mem-fraction', type=float, default=0.95,
                      help='XLA_PYTHON_CLIENT_MEM_FRACTION when raised')
  parser.add_argument('--optimizers', nargs='+', choices=OPTIMIZERS,
                      default=OPTIMIZERS[:3])
  parser.add_argument('--min', type=float, nargs='+', default=[0.25e9],
                      help='smallest size tried, in parameters (one value, '
                      'or one per optimizer)')
  parser.add_argument('--step', type=float, default=0.25e9,
                      help='size resolution in parameters')
  parser.add_argument('--max', type=float, nargs='+', default=[12e9],
                      help='largest size tried, in parameters (one value, '
                      'or one per optimizer)')
  parser.add_argument('--max-call-bytes', type=float, default=None,
                      help="the probes' spmd.MAX_CALL_BYTES (default: the "
                      "package's)")
  parser.add_argument('--smoke', action='store_true',
                      help='tiny sizes on the CPU, to check the machinery')
  parser.add_argument('--write', type=pathlib.Path, default=None,
                      help='a RESULTS.md to write this section into')
  args = parser.parse_args()
  if args.probe:
    print(json.dumps(probe(args.probe[0], int(args.probe[1]))), flush=True)
    return

  base_env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  base_env.pop('XLA_PYTHON_CLIENT_MEM_FRACTION', None)
  if args.max_call_bytes is not None:
    base_env[CALL_BYTES_ENV] = str(int(args.max_call_bytes))
  step = int(args.step)
  bottoms, tops = ([int(x) for x in bounds] for bounds in (args.min, args.max))
  for name, bounds in (('--min', bottoms), ('--max', tops)):
    if len(bounds) not in (1, len(args.optimizers)):
      parser.error(f'{name}: one value, or one per optimizer')
  bottoms *= len(args.optimizers) // len(bottoms)
  tops *= len(args.optimizers) // len(tops)
  if args.smoke:
    base_env['JAX_PLATFORMS'] = 'cpu'
    step = 1 << 20
    bottoms = [1 << 20] * len(args.optimizers)
    tops = [8 << 20] * len(args.optimizers)
  if args.setting == 'default':
    label, env = 'default (preallocation off)', base_env
  else:
    label = f'XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction}'
    env = dict(base_env, XLA_PYTHON_CLIENT_MEM_FRACTION=str(args.mem_fraction))
  # This process never touches the GPU: its CUDA context would take memory
  # from the probes. The probes say which device and JAX they ran.
  now = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M')
  rows, log = [], []
  for optimizer, bottom, top in zip(args.optimizers, bottoms, tops,
                                    strict=True):
    good, good_result, bad, bad_result = largest(optimizer, bottom, top,
                                                 step, env, log)
    fails = (f"{bad / 1e9:.2f}B: {bad_result.get('error', '')}" if bad
             else f'none up to {top / 1e9:.2f}B')
    rows.append(f'| {optimizer} | {good / 1e9:.2f}B | '
                f"{good_result.get('step_ms', float('nan')):.1f} | "
                f"{good_result.get('temp_gib', '-')} | {fails} |")
  lines = [
      f'## GPU capacity, {label}: the largest AdamW step that runs', '',
      f'- date (UTC): {now}',
      f"- device: {log[0][2].get('device', '?')}",
      f"- jax: {log[0][2].get('jax', '?')}",
      '- step: parameters, gradients made in the step (each leaf a matrix '
      'used in a matmul, so that the gradient is materialized), state; '
      'parameters '
      'and state donated; fp32 unless the row says bf16 (gradients in the '
      "parameters' dtype); leaves of 2^28 parameters; bisection in "
      f'steps of {step / 1e9:.3g}B, each probe a fresh process (init, 3 steps, '
      'median of the last 2); update calls over at most '
      f"{log[0][2].get('max_call_bytes', '?')} bytes of gradients; "
      "temporaries: XLA's memory_analysis of the compiled step", '',
      '| optimizer | largest that runs | its step (ms) | its temporaries '
      '(GiB) | smallest that fails |',
      '|---|---:|---:|---:|---|', *rows]
  section = '\n'.join(lines)
  print(section)
  if args.write:
    bf16 = any('bf16' in name for name in args.optimizers)
    mark = f"{args.setting}{'_bf16' if bf16 else ''}"
    cpu_step.write_results(section, args.write, MARKS[mark])


if __name__ == '__main__':
  main()
