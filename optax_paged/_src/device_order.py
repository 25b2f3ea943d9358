"""Refusing a step over the state's devices in another order than at init.

Each device's registry entry holds the state of the position the device had
in the mesh at ``init``. A ``shard_map`` over a mesh of the same shape whose
devices are ordered differently hands some devices another position's shard:
their handlers refuse it, while the devices whose position did not move
apply their step, and the state ends split between two steps. Tracing sees
only an abstract mesh, without devices; the concrete mesh of the user's
``shard_map`` is known when the step is lowered, before anything runs. This
primitive, an identity on the hyperparameter vector (which every update call
reads, so it is never dropped), compares the two meshes there.
"""

import jax
import jax.extend.core as jax_core
import numpy as np
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from optax_paged._src import ffi

MESH_ORDER_MSG = (
    '{name}: the step runs in a shard_map over a mesh with devices {got} '
    '(axes {got_axes}), but the state was initialised for parameters on '
    '{want}: each device holds the state of its mesh position at init, and a '
    'shard of another position would update the wrong state. Nothing was '
    'updated. Use the mesh the parameters had at init (or load a state_dict '
    'into a state initialised on the new mesh).'
)


def _ids_in_order(mesh: jax.sharding.Mesh,
                  axes: tuple[tuple[str, int], ...] | None) -> np.ndarray:
  """The mesh's device ids with its axes in the order of ``axes``, flat.

  Empty when the mesh does not have exactly these axes and sizes; all of
  them, flat, for ``axes=None`` (a state on one device: any axis names).
  """
  ids = np.asarray(mesh.device_ids)
  if axes is None:
    return ids.reshape(-1)
  if sorted(mesh.shape.items()) != sorted(axes):
    return np.zeros([0], ids.dtype)
  order = [mesh.axis_names.index(name) for name, _ in axes]
  return np.transpose(ids, order).reshape(-1)


def _lowering(ctx, hyperparams, *, name, device_ids, axes):
  mesh = getattr(ctx.module_context.axis_context, 'mesh', None)
  # An abstract mesh (a shard_map given one, with no concrete mesh set) has
  # no devices to compare; the handlers' position check still refuses.
  if isinstance(mesh, jax.sharding.Mesh):
    got = _ids_in_order(mesh, axes)
    if got.tolist() != list(device_ids):
      if axes is None:
        want = f'device {device_ids[0]}'
      else:
        ids = np.reshape(device_ids, [n for _, n in axes]).tolist()
        want = f'a mesh with devices {ids} (axes {dict(axes)})'
      raise ValueError(MESH_ORDER_MSG.format(
          name=name, got=np.asarray(mesh.device_ids).tolist(),
          got_axes=dict(mesh.shape), want=want))
  return [hyperparams]


on_devices_p = jax_core.Primitive('optax_paged_on_devices')
on_devices_p.def_impl(lambda hyperparams, **_: hyperparams)
on_devices_p.def_abstract_eval(lambda hyperparams, **_: hyperparams)
mlir.register_lowering(on_devices_p, _lowering)
# As the update it feeds: refused, with the update's messages.
batching.primitive_batchers[on_devices_p] = ffi.refuse_vmap
ad.primitive_jvps[on_devices_p] = ffi.refuse_jvp


def checked(hyperparams: jax.Array, name: str,
            mesh: jax.sharding.Mesh | None,
            device: jax.Device | None = None) -> jax.Array:
  """``hyperparams``, refused at lowering on devices in another order.

  Args:
    hyperparams: the update's hyperparameter vector.
    name: the optimizer, for the message.
    mesh: the mesh the state was initialised on, or None for a state on one
      device.
    device: that one device (with ``mesh=None``).
  """
  if mesh is None:
    return on_devices_p.bind(hyperparams, name=name,
                             device_ids=(int(device.id),), axes=None)
  return on_devices_p.bind(
      hyperparams, name=name,
      device_ids=tuple(int(i) for i in np.asarray(mesh.device_ids).flat),
      axes=tuple(mesh.shape.items()))
