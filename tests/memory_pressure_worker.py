"""One run of tests/memory_pressure_test.py, in a process of its own.

A model of PRESSURE_LEAVES leaves of 4096 x 4096 (fp32) trains with the
gradients made in the step. After two steps large arrays stay alive (an
evaluation pass's outputs) for three steps, then are dropped; two more steps
follow. Prints one JSON line: whether every step ran, the moves of the
paged state, a digest of the final parameters and the memory it saw.

  python tests/memory_pressure_worker.py MODE PIECES_BYTES:BLOCK_BYTES

The spike is PIECES_BYTES in 256 MiB pieces (XLA's pool places them as it
places a step's buffers, in whatever regions it holds or grows), then one
array of BLOCK_BYTES if that is not 0.

MODE: ``measure`` (no spike; the memory the spike is sized from),
``fixed`` (paged_adamw8bit, all state on the device), ``guarded`` (an
automatic budget and ``memory_guarded``), ``retry`` (``memory_guarded``
with ``retry=True`` and its check before the step switched off, so that the
step itself runs out of memory; run by hand, it reproduces the finding in
benchmarks/NOTES.md that no spike made a step fail that the retry saves) or
``optax`` (``optax.adamw``).
"""

import hashlib
import json
import os
import sys
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_paged  # noqa: E402
from optax_paged._src import paging  # noqa: E402

LEAVES = int(os.environ.get('PRESSURE_LEAVES', '48'))
PIECE = 256 << 20
SHAPE = (4096, 4096)
STEPS = (2, 3, 2)  # before the spike, with it, after it


TRACE = []


def _trace_rooms() -> None:
  """Records each room the guard computes, with what it saw."""
  from optax_paged._src import auto_budget  # noqa: PLC0415
  room = auto_budget.room

  def traced(observation, policy):
    stats = observation.xla_stats or {}
    value = room(observation, policy)
    TRACE.append({'free': observation.free >> 20,
                  'on_device': observation.state_on_device >> 20,
                  'need': (observation.step_need or 0) >> 20,
                  'largest': observation.step_largest >> 20,
                  'in_use': stats.get('bytes_in_use', 0) >> 20,
                  'pool': stats.get('pool_bytes', 0) >> 20,
                  'largest_free': stats.get('largest_free_block_bytes', -1)
                  >> 20, 'room': value >> 20})
    return value
  auto_budget.room = traced


def make_step(tx):
  def loss(params, c):
    return sum(0.5 * jnp.sum(jnp.square(p * c)) for p in params.values())

  def step(params, state, c):
    grads = jax.grad(loss)(params, c)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def main() -> None:
  mode = sys.argv[1]
  pieces_bytes, block_bytes = (int(x) for x in sys.argv[2].split(':'))
  device = jax.devices()[0]
  keys = jax.random.split(jax.random.key(0), LEAVES)
  params = {f'w{i:02d}': jax.random.normal(k, SHAPE, jnp.float32) * 0.02
            for i, k in enumerate(keys)}
  if mode == 'optax':
    tx = optax.adamw(1e-3, weight_decay=1e-4)
  else:
    tx = optax_paged.paged_adamw8bit(
        1e-3, weight_decay=1e-4,
        device_budget='auto' if mode in ('guarded', 'retry') else 1.0)
  state = tx.init(params)
  if mode == 'retry':
    step = optax_paged.memory_guarded(make_step(tx), retry=True)
    step._make_room = lambda *args: None  # noqa: SLF001 - let the step fail
  elif mode == 'guarded':
    step = optax_paged.memory_guarded(make_step(tx), donate_argnums=(0, 1))
    if os.environ.get('PRESSURE_TRACE'):
      _trace_rooms()
  else:
    step = jax.jit(make_step(tx), donate_argnums=(0, 1))

  result = {'mode': mode, 'status': 'ok', 'gpu': device.device_kind}
  spike = None
  count = 0
  times, free_seen = [], []
  failed_in = 'step'
  try:
    for phase, steps in enumerate(STEPS):
      if phase == 1 and (pieces_bytes or block_bytes):
        sizes = [PIECE] * (pieces_bytes // PIECE) + (
            [block_bytes] if block_bytes else [])
        spike = []
        failed_in = 'spike'
        for n in sizes:
          spike.append(jnp.full((n // 4,), 1.0, jnp.float32))
          spike[-1].block_until_ready()
        failed_in = 'step'
      if phase == 2:
        del spike
      for _ in range(steps):
        start = time.perf_counter()
        params, state = step(params, state, jnp.float32(1.0 + 0.1 * count))
        jax.block_until_ready(params)
        times.append(round((time.perf_counter() - start) * 1e3, 1))
        free_seen.append(paging.gpu_memory(0)[0] >> 20)
        count += 1
      if phase == 0 and mode == 'measure':
        stats = device.memory_stats()
        held = int(stats['pool_bytes'])
        idle = held - int(stats['bytes_in_use'])
        free = paging.gpu_memory(0)[0]
        guarded = optax_paged.memory_guarded(
            make_step(tx), donate_argnums=(0, 1))
        c = jnp.float32(1.0)
        result.update(
            idle=idle, free=free, limit=int(stats['bytes_limit']),
            in_use=int(stats['bytes_in_use']),
            total=paging.gpu_memory(0)[1],
            temporaries=guarded.allocation(params, state, c).temporaries,
            state_bytes=optax_paged.memory_report(state).total_bytes)
  except Exception as error:  # noqa: BLE001 - the run reports what stopped it
    result['trace'] = TRACE
    result.update(status='oom' if 'RESOURCE_EXHAUSTED' in str(error)
                  else 'error', error=str(error)[:300], steps_done=count,
                  failed_in=failed_in, step_ms=times)
    print(json.dumps(result), flush=True)
    return
  digest = hashlib.sha256()
  for name in sorted(params):
    digest.update(np.asarray(params[name]).tobytes())
  result['digest'] = digest.hexdigest()
  result.update(step_ms=times, free_mib=free_seen)
  if mode != 'optax':
    report = optax_paged.memory_report(state)
    result.update(moves=report.moves.count, moved_bytes=report.moves.bytes,
                  tiers=report.totals, evicted=report.evicted)
  if mode == 'retry':
    result['retries'] = step.retries
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
