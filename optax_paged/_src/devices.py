"""Which device ordinal the FFI handlers see for each JAX device.

A handler finds its registry entry by (state, device ordinal), so the
registry must know the ordinal of every device it allocates for. It is not
guessed: on the CPU a handler sees ``device.id`` (which under
``jax.distributed`` is a global id, not a local index), on a GPU the CUDA
ordinal. A tiny probe call on each device asks the handler itself, once per
device and process.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import ffi

PROBE_TARGET = ffi.extension().DEVICE_ORDINAL_TARGET


def platform_of(device: jax.Device) -> str:
  """``'cpu'`` or ``'cuda'`` (JAX says ``'gpu'``), as the registry names it."""
  return 'cuda' if device.platform == 'gpu' else device.platform


@functools.cache
def _probe(platform: str):
  del platform  # one jitted probe per platform, placed by its operand
  call = jax.ffi.ffi_call(
      PROBE_TARGET, jax.ShapeDtypeStruct((), jnp.int32), has_side_effect=True
  )
  return jax.jit(call)


@functools.cache
def ordinal_of(device: jax.Device) -> int:
  """The device ordinal an FFI handler running on ``device`` sees.

  Args:
    device: an addressable JAX device.

  Returns:
    The ordinal, as the handler's ``DeviceOrdinal`` context gives it.
  """
  if device.process_index != jax.process_index():
    raise ValueError(
        f'{device} belongs to process {device.process_index}; only this '
        f'process\'s devices ({jax.process_index()}) hold its state.'
    )
  ffi.register_targets()
  pin = jax.device_put(np.zeros((), np.int32), device)
  return int(_probe(platform_of(device))(pin))
