"""One of two processes of tests/multi_process_test.py (not a test itself).

Usage: python -m tests.multi_process_worker PROCESS_ID PORT CHECKPOINT_DIR

Two CPU devices per process (or, with OPTAX_PAGED_WORKER_GPU=1, the one GPU
CUDA_VISIBLE_DEVICES gives it), a 'data' axis over all of them. Checks that each
process updates only its own shards, equal to one device, and that an Orbax
checkpoint saved and restored from both processes resumes bit-identically.
Prints OK on success.
"""

import os
import sys

import jax
import numpy as np

ON_GPU = os.environ.get('OPTAX_PAGED_WORKER_GPU') == '1'
if not ON_GPU:
  jax.config.update('jax_num_cpu_devices', 2)

import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_paged  # noqa: E402

SPECS = {'rows': P('data', None), 'replicated': P()}
SHAPES = {'rows': (1024, 48), 'replicated': (3000,)}


def _host_tree(seed: int, scale: float) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) * scale).astype(np.float32)
          for k, s in SHAPES.items()}


def _global(tree, mesh):
  return {
      k: jax.make_array_from_callback(
          v.shape, NamedSharding(mesh, SPECS[k]), lambda i, v=v: v[i])
      for k, v in tree.items()
  }


def _step(tx):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _assert_local_equal(global_tree, host_tree):
  for name, array in global_tree.items():
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data),
                                    np.asarray(host_tree[name])[shard.index])


def main(process_id: int, port: int, directory: str) -> None:
  jax.distributed.initialize(f'localhost:{port}', num_processes=2,
                             process_id=process_id)
  local = 1 if ON_GPU else 2
  assert jax.local_device_count() == local
  assert jax.device_count() == 2 * local
  mesh = jax.make_mesh((2 * local,), ('data',), axis_types=(AxisType.Auto,))
  make = lambda: optax_paged.adamw8bit(1e-2, min_8bit_size=256)  # noqa
  params0 = _host_tree(0, 1.0)
  grads = [_host_tree(1 + i, 0.1) for i in range(4)]

  tx = make()
  params = _global(params0, mesh)
  state = tx.init(params)
  # One entry for each of this process's devices.
  assert len(state.buffers.record().entries) == local
  step = _step(tx)
  for g in grads[:2]:
    params, state = step(params, state, _global(g, mesh))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(f'{directory}/ckpt', {
        'params': params, 'opt_state': optax_paged.state_dict(state)})
  for g in grads[2:]:
    params, state = step(params, state, _global(g, mesh))

  # The same run on one local device.
  one_tx = make()
  device = jax.local_devices()[0]
  one_params = jax.device_put(params0, device)
  one_state = one_tx.init(one_params)
  one_step = _step(one_tx)
  for g in grads:
    one_params, one_state = one_step(one_params, one_state,
                                     jax.device_put(g, device))
  _assert_local_equal(params, jax.device_get(one_params))

  # Resume from the checkpoint in fresh state buffers.
  resumed_tx = make()
  like = _global(params0, mesh)
  fresh = resumed_tx.init(like)
  target = {'params': like, 'opt_state': optax_paged.state_dict(fresh)}
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(f'{directory}/ckpt', target)
  resumed = optax_paged.load_state_dict(fresh, restored['opt_state'])
  assert int(jax.device_get(resumed.count)) == 2
  resumed_params = restored['params']
  resumed_step = _step(resumed_tx)
  for g in grads[2:]:
    resumed_params, resumed = resumed_step(resumed_params, resumed,
                                           _global(g, mesh))
  _assert_local_equal(resumed_params, jax.device_get(one_params))
  for name in SHAPES:
    for a, b in zip(params[name].addressable_shards,
                    resumed_params[name].addressable_shards, strict=True):
      np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
  print('OK', flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
