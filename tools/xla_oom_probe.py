"""What XLA does on a GPU when memory runs short (facts for the paging code).

Prints, on one GPU with preallocation off:

1. the device's free memory and XLA's allocator statistics before and after
   a large array is made and dropped (does XLA's pool give memory back?);
2. for a jitted function with a donated argument that fails for memory, in
   an output too large and in a temporary too large: the exception, where it
   is raised (at the call or at ``block_until_ready``), whether the donated
   array is deleted, and whether its values survive;
3. the same for an optax_paged training step (parameters and state
   donated): the state's count, its moments and a retry's result against a
   run that never failed.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python tools/xla_oom_probe.py
"""

import functools
import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_paged  # noqa: E402
from optax_paged._src import paging  # noqa: E402

GIB = 2**30
DEVICE = jax.devices()[0]


def show(tag: str) -> dict:
  free, _ = paging.gpu_memory(0)
  stats = DEVICE.memory_stats() or {}
  keys = ('bytes_in_use', 'peak_bytes_in_use', 'pool_bytes',
          'bytes_reserved', 'bytes_limit', 'largest_free_block_bytes')
  print(f'{tag:<34} free {free / GIB:7.2f} GiB  ' + '  '.join(
      f'{k} {stats[k] / GIB:.2f}' for k in keys if k in stats), flush=True)
  return stats


def limit_left() -> int:
  stats = DEVICE.memory_stats()
  return int(stats['bytes_limit']) - int(stats['bytes_in_use'])


def try_call(tag, fn, *args):
  """Calls fn; returns (outputs or None, where it failed, message)."""
  try:
    out = fn(*args)
  except Exception as e:  # noqa: BLE001 - printing what XLA raises
    return None, 'call', f'{type(e).__name__}: {str(e)[:160]}'
  try:
    jax.block_until_ready(out)
  except Exception as e:  # noqa: BLE001
    return None, 'block_until_ready', f'{type(e).__name__}: {str(e)[:160]}'
  return out, None, 'ok'


def donation_probe(kind: str) -> None:
  size = 1 << 28  # 1 GiB of fp32
  p = jnp.arange(size, dtype=jnp.float32)
  expected = float(jnp.sum(p))
  n = (limit_left() + 2 * GIB) // 4

  if kind == 'output':
    @functools.partial(jax.jit, donate_argnums=0)
    def fn(p):
      return p * 2.0, jnp.full((n,), p[0])
  else:
    @functools.partial(jax.jit, donate_argnums=0)
    def fn(p):
      big = jnp.sort(jnp.full((n,), p[1]) * p[2])
      return p * 2.0 + big[:size]

  out, where, message = try_call(kind, fn, p)
  deleted = p.is_deleted()
  intact = None if deleted else float(jnp.sum(p)) == expected
  print(f'donated arg, {kind} too large: failed at {where}; {message}')
  print(f'  donated array deleted: {deleted}; values intact: {intact}')
  show(f'  after the failed {kind} call')
  del out


def paged_step_probe() -> None:
  """A donated optax_paged step that fails for memory, then a retry."""
  rng = np.random.default_rng(0)
  shape = (4096, 4096)
  params0 = {'w': jnp.asarray(rng.standard_normal(shape), jnp.float32)}
  grads = [{'w': jnp.asarray(rng.standard_normal(shape), jnp.float32)}
           for _ in range(3)]
  tx = optax_paged.paged_adamw8bit(1e-3, device_budget=1.0)

  def step(params, state, g, extra):
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    if extra:
      big = jnp.sort(jnp.full((extra,), params['w'][0, 0]))
      params = {'w': params['w'] + big[0] * 0.0}
    return params, state

  jitted = jax.jit(step, donate_argnums=(0, 1), static_argnums=3)

  # Reference: three steps, none failing.
  ref_p, ref_s = jax.tree.map(jnp.copy, params0), tx.init(params0)
  for g in grads:
    ref_p, ref_s = jitted(ref_p, ref_s, g, 0)
  ref = np.asarray(ref_p['w'])

  p, s = jax.tree.map(jnp.copy, params0), tx.init(params0)
  p, s = jitted(p, s, grads[0], 0)
  n = (limit_left() + 2 * GIB) // 4
  out, where, message = try_call('paged', jitted, p, s, grads[1], n)
  print(f'paged step, temporary too large: failed at {where}; {message}')
  leaves = jax.tree.leaves(s)
  print(f'  params deleted: {p["w"].is_deleted()}; state arrays deleted: '
        f'{sum(x.is_deleted() for x in leaves if hasattr(x, "is_deleted"))} '
        f'of {len(leaves)}')
  try:
    p, s = jitted(p, s, grads[1], 0)
    p, s = jitted(p, s, grads[2], 0)
    got = np.asarray(p['w'])
    print(f'  retry without the temporary: bit-identical to the run that '
          f'never failed: {np.array_equal(got, ref)}')
  except Exception as e:  # noqa: BLE001
    print(f'  retry failed: {type(e).__name__}: {str(e)[:200]}')


def main() -> None:
  print(DEVICE.device_kind, jax.__version__)
  show('start')
  x = jnp.ones((8 * GIB // 4,), jnp.float32).block_until_ready()
  show('8 GiB array live')
  del x
  show('8 GiB array dropped')
  for kind in ('output', 'temporary'):
    donation_probe(kind)
  paged_step_probe()
  show('end')


if __name__ == '__main__':
  main()
