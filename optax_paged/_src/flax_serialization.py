"""Flax serialization of optax_paged states: the moments included.

``flax.serialization.to_state_dict`` (behind ``to_bytes``, ``msgpack_serialize``
and Flax's checkpoint helpers) walks a train state and asks each node for its
state dictionary. Flax handles the ``OptimizerState`` named tuple
itself, field by field (``count`` is an array like any other); registering
``StateBuffers`` makes the ``buffers`` field the moments' export (codes,
absmax, format, maps, checksum). Restoring checks that export completely and
puts it in *new* buffers laid out as the target's: the target is never
written, so a refused restore changes nothing and ``from_state_dict`` stays
functional. Without the registration Flax fails with "can not serialize
'StateBuffers'".

Registration happens when optax_paged is imported and Flax is installed.
"""

from typing import Any

from optax_paged._src import registry
from optax_paged._src import state_io


def _to_state_dict(buffers: registry.StateBuffers) -> dict[str, Any]:
  return state_io.export_buffers(buffers)


def _from_state_dict(target: registry.StateBuffers, saved: Any,
                     name: str = '.') -> registry.StateBuffers:
  del name  # Flax's path, for its own messages
  return state_io.restore_buffers(target, _lists_restored(saved))


def _lists_restored(saved: Any) -> Any:
  """The export's lists, which msgpack may return as {'0': ..} dicts."""
  if isinstance(saved, dict):
    keys = list(saved)
    if keys and all(isinstance(k, str) and k.isdigit() for k in keys):
      return [_lists_restored(saved[str(i)]) for i in range(len(keys))]
    return {k: _lists_restored(v) for k, v in saved.items()}
  if isinstance(saved, (list, tuple)):
    return [_lists_restored(v) for v in saved]
  return saved


def register() -> bool:
  """Registers the state with flax.serialization; False without Flax."""
  try:
    from flax import serialization  # noqa: PLC0415 - Flax is optional
  except ImportError:
    return False
  serialization.register_serialization_state(
      registry.StateBuffers, _to_state_dict, _from_state_dict, override=True)
  return True
