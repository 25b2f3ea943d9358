"""Makes Orbax refuse to save an optimizer state it would save without moments.

The moments live in the state registry, so ``StateBuffers`` is a pytree node
with no leaves, and Orbax's ``StandardCheckpointer``, ``PyTreeCheckpointer``
and ``CheckpointManager`` take such an "empty node" for an unserializable
object and skip it: a raw train state would be saved with its step count and
without its moments, and the loss would show up only at restore.

Two refusals turn that silent loss into one ``TypeError``:

- at save, when the save's arguments are made (``ocp.args.StandardSave`` and
  ``ocp.args.PyTreeSave``, which ``StandardCheckpointer.save``,
  ``PyTreeCheckpointer.save`` and ``CheckpointManager.save`` callers build):
  before Orbax creates a directory or starts a thread, so a refused save
  leaves nothing behind. Orbax's argument classes are dataclasses whose
  ``__init__`` calls ``__post_init__``; the check wraps theirs.
- at every lookup of ``StateBuffers`` in Orbax's global
  ``TypeHandlerRegistry``, which Orbax makes for every empty node before it
  writes or reads any array: a restore whose target holds a raw state, and
  saves through arguments the first refusal does not see (a handler called
  with its own arguments class), are refused there.

Flax NNX would hide the node: ``nnx.state(optimizer)`` flattens the state
with NNX's own registry, which keeps a leafless node in the graph
definition, so the state held the count alone and Orbax saved it. NNX is
therefore told to show the node as a variable of the optimizer state
(``RegistryNode``, whose value is the leafless ``StateBuffers``): it passes
through ``nnx.jit`` as before, and Orbax meets it in ``nnx.state(optimizer)``
and in ``nnx.to_pure_dict`` of it, at save and at restore.

Registration happens when a state is first made, so importing optax_paged
imports neither Orbax nor Flax; NNX's at the first one made after Flax NNX
was imported (``nnx.Optimizer`` makes its state itself).
"""

import sys
from typing import Any

import jax

ORBAX_SAVE_MSG = (
    'optax_paged: Orbax cannot checkpoint an optax_paged optimizer state '
    'inside a pytree: the moments live in the state registry, so it would '
    'write the step count and silently drop them. Save and restore what '
    'carries them instead: flax.serialization.to_state_dict(train_state) for '
    'a Flax TrainState, or optax_paged.state_dict(opt_state) for an optimizer '
    'state (for an NNX optimizer, optimizer.opt_state: nnx.state(optimizer) '
    'does not hold the moments; the guide docs/checkpoints.md has recipes '
    'for Linen, NNX and plain optax). Nothing was written.'
)
# Orbax's save arguments that carry the pytree to save as ``item``.
_SAVE_ARGS = ('StandardSave', 'PyTreeSave')

_registered = False
_nnx_registered = False


def register(buffers_type: type) -> None:
  """Registers the refusal for ``buffers_type`` with Orbax and NNX, once."""
  _register_nnx(buffers_type)
  global _registered
  if _registered:
    return
  _registered = True
  try:
    from orbax.checkpoint import args  # noqa: PLC0415 - lazy import
    from orbax.checkpoint import type_handlers  # noqa: PLC0415
  except ImportError:
    return
  for name in _SAVE_ARGS:
    _refuse_in_save_args(getattr(args, name), buffers_type)

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


def holds_state(tree: Any, buffers_type: type) -> bool:
  """Whether ``tree`` holds an optimizer state's ``buffers_type`` node."""
  is_buffers = lambda x: isinstance(x, buffers_type)  # noqa: E731
  return any(map(is_buffers, jax.tree.leaves(tree, is_leaf=is_buffers)))


def _refuse_in_save_args(args_type: type, buffers_type: type) -> None:
  """Makes ``args_type(item, ...)`` raise when ``item`` holds a state."""
  check = args_type.__post_init__

  def __post_init__(self: Any) -> None:
    if holds_state(self.item, buffers_type):
      raise TypeError(ORBAX_SAVE_MSG)
    check(self)

  args_type.__post_init__ = __post_init__


def _register_nnx(buffers_type: type) -> None:
  """Shows ``buffers_type`` in NNX states; waits for Flax NNX's import."""
  global _nnx_registered
  if _nnx_registered or 'flax.nnx' not in sys.modules:
    return
  _nnx_registered = True
  from flax.nnx import graphlib  # noqa: PLC0415 - imported already
  from flax.nnx.training import optimizer  # noqa: PLC0415

  class RegistryNode(optimizer.OptState):
    """An optax_paged state's registry node, where NNX states show it.

    Its value is the leafless ``StateBuffers``: nothing to save, and Orbax
    refuses it rather than save the count without the moments.
    """

  def flatten(buffers: Any) -> tuple[list[tuple[str, Any]], Any]:
    return [('registry', RegistryNode(buffers))], buffers.tree_flatten()[1]

  def unflatten(children: Any, aux: Any) -> Any:
    del children  # the node, rebuilt from its state id as JAX rebuilds it
    return buffers_type.tree_unflatten(aux, ())

  graphlib.register_pytree_node_type(buffers_type, flatten, unflatten)
