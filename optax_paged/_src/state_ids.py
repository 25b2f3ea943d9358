"""State ids, reused by later states of the same structure.

A state's id names its buffers in the registry. It sits in the state's tree
structure, and JAX caches a compiled step by tree structure, so an id that is
never reused costs one compiled step per state (a sweep of 300 states kept
300 compiled copies). A compiled step reads from its state only what the
state's *signature* fixes (optimizer, platform, parameter tree, leaf layouts,
devices, mesh layout); the buffers it finds at run time through the id. So an
id can serve a later state of the same signature once nothing refers to the
earlier one any more, and then the compiled step serves the later state too:
a process keeps at most as many compiled copies of a step as it held states
of one structure at once.

An id is reused only when both hold:

- its state's buffers are released (by ``release`` or as an orphan), and
- no ``StateBuffers`` object with that id exists, live or released; a
  released state still in the user's hands must keep failing as released,
  never step a newer state.

A tree structure kept past its state's death (a treedef a user holds and
unflattens later) names whatever state holds the id then; the step stamps
refuse such a tree's step unless its count equals the newer state's step.
"""

import collections
import threading
from collections.abc import Hashable

from optax_paged._src import ffi


class StateIdPool:
  """Hands out state ids and takes back the ones nothing refers to."""

  def __init__(self):
    self._free: dict[Hashable, list[int]] = collections.defaultdict(list)
    self._signature: dict[int, Hashable] = {}
    self._holders: collections.Counter[int] = collections.Counter()
    self._released: set[int] = set()
    self._pooled: set[int] = set()
    # Reentrant: a collection inside one of these methods may run ``drop``
    # (a finalizer) on the same thread.
    self._lock = threading.RLock()

  def take(self, signature: Hashable) -> int:
    """An id for a new state: a free one of ``signature``, else a new one."""
    with self._lock:
      free = self._free[signature]
      if free:
        state_id = free.pop()
        self._pooled.discard(state_id)
      else:
        state_id = int(ffi.extension().new_state_id())
        self._signature[state_id] = signature
      return state_id

  def give_back(self, state_id: int) -> None:
    """Returns an id whose state was never made (its allocation failed)."""
    self.released(state_id)

  def hold(self, state_id: int) -> None:
    """A ``StateBuffers`` object with this id now exists."""
    with self._lock:
      self._holders[state_id] += 1
      if state_id in self._pooled:
        # A tree of a freed state rebuilt from its treedef: that object names
        # the id, so no new state may take it while the object lives.
        self._pooled.discard(state_id)
        self._free[self._signature[state_id]].remove(state_id)
        self._released.add(state_id)

  def drop(self, state_id: int) -> None:
    """A ``StateBuffers`` object with this id was collected."""
    with self._lock:
      self._holders[state_id] -= 1
      if self._holders[state_id] <= 0:
        del self._holders[state_id]
        self._recycle(state_id)

  def released(self, state_id: int) -> None:
    """The buffers of the state with this id were freed."""
    with self._lock:
      self._released.add(state_id)
      self._recycle(state_id)

  def _recycle(self, state_id: int) -> None:
    if (state_id in self._released and not self._holders[state_id]
        and state_id in self._signature):
      self._released.discard(state_id)
      self._pooled.add(state_id)
      self._free[self._signature[state_id]].append(state_id)


STATE_IDS = StateIdPool()
