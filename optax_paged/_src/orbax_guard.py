"""Makes Orbax refuse to save an optimizer state it would save without moments.

The moments live in the state registry, so ``StateBuffers`` is a pytree node
with no leaves, and Orbax's ``StandardCheckpointer``, ``PyTreeCheckpointer``
and ``CheckpointManager`` take such an "empty node" for an unserializable
object and skip it: a raw train state would be saved with its step count and
without its moments, and the loss would show up only at restore. Orbax does
look every empty node's type up in its global ``TypeHandlerRegistry`` before
it writes any array, so a registry entry for ``StateBuffers`` turns that
silent loss into an error at save time (Orbax then leaves only its
uncommitted ``*.orbax-checkpoint-tmp`` directory, which it never reads as a
checkpoint). A restore whose target holds a raw state is refused the same way.

Registration happens when the first state is allocated, so importing
optax_paged does not import Orbax.
"""

from typing import Any

ORBAX_SAVE_MSG = (
    'optax_paged: Orbax cannot checkpoint an optax_paged optimizer state '
    'inside a pytree: the moments live in the state registry, so it would '
    'write the step count and silently drop them. Save and restore what '
    'carries them instead: flax.serialization.to_state_dict(train_state) for '
    'a Flax TrainState, or optax_paged.state_dict(opt_state) for an optimizer '
    'state (README, "Checkpoints", has recipes for Linen, NNX and plain '
    'optax). A save refused here commits no checkpoint.'
)

_registered = False


def register(buffers_type: type) -> None:
  """Registers the refusal for ``buffers_type`` once; a no-op without Orbax."""
  global _registered
  if _registered:
    return
  _registered = True
  try:
    from orbax.checkpoint import type_handlers  # noqa: PLC0415 - lazy import
  except ImportError:
    return

  class _RefusingHandler(type_handlers.TypeHandler):
    """Never reached: the lookup itself raises (see ``_matches``)."""

    def typestr(self) -> str:
      return 'optax_paged.StateBuffers'

    async def metadata(self, infos: Any) -> Any:
      raise TypeError(ORBAX_SAVE_MSG)

    async def serialize(self, values: Any, infos: Any, args: Any = None):
      raise TypeError(ORBAX_SAVE_MSG)

    async def deserialize(self, infos: Any, args: Any = None) -> Any:
      raise TypeError(ORBAX_SAVE_MSG)

  def _matches(ty: Any) -> bool:
    # Orbax catches ValueError from a lookup (and then skips the node), so the
    # refusal is a TypeError, raised by the lookup that save makes.
    if isinstance(ty, type) and issubclass(ty, buffers_type):
      raise TypeError(ORBAX_SAVE_MSG)
    return False

  type_handlers.register_type_handler(
      buffers_type, _RefusingHandler(), func=_matches, override=True)
