"""Registry keys, reused by later states of the same structure.

A state's key sits in its tree structure, and JAX caches a compiled step by
tree structure, so a key that is never reused costs one compiled step per
state (a sweep of 300 states kept 300 compiled copies). A compiled step reads
from its state only what the state's *signature* fixes (optimizer, platform,
parameter tree, leaf layouts, devices, mesh layout); the buffers it finds at
run time through the key. So a key can serve a later state of the same
signature once nothing refers to the earlier one any more, and then the
compiled step serves the later state too: a process keeps at most as many
compiled copies of a step as it held states of one structure at once.

A key is reused only when both hold:

- its state's buffers are released (by ``release`` or as an orphan), and
- no ``StateBuffers`` object with that key exists, live or released; a
  released state still in the user's hands must keep failing as released,
  never step a newer state.

A tree structure kept past its state's death (a treedef a user holds and
unflattens later) names whatever state holds the key then; the step stamps
refuse such a tree's step unless its count equals the newer state's step.
"""

import collections
import threading
from collections.abc import Hashable

from optax_paged._src import ffi


class KeyPool:
  """Hands out registry keys and takes back the ones nothing refers to."""

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
    """A key for a new state: a free one of ``signature``, else a new one."""
    with self._lock:
      free = self._free[signature]
      if free:
        key = free.pop()
        self._pooled.discard(key)
      else:
        key = int(ffi.extension().new_group_id())
        self._signature[key] = signature
      return key

  def give_back(self, key: int) -> None:
    """Returns a key whose state was never made (its allocation failed)."""
    self.released(key)

  def hold(self, key: int) -> None:
    """A ``StateBuffers`` object with this key now exists."""
    with self._lock:
      self._holders[key] += 1
      if key in self._pooled:
        # A tree of a freed state rebuilt from its treedef: that object names
        # the key, so no new state may take it while the object lives.
        self._pooled.discard(key)
        self._free[self._signature[key]].remove(key)
        self._released.add(key)

  def drop(self, key: int) -> None:
    """A ``StateBuffers`` object with this key was collected."""
    with self._lock:
      self._holders[key] -= 1
      if self._holders[key] <= 0:
        del self._holders[key]
        self._recycle(key)

  def released(self, key: int) -> None:
    """The buffers of the state with this key were freed."""
    with self._lock:
      self._released.add(key)
      self._recycle(key)

  def free_keys(self, signature: Hashable) -> int:
    """How many keys of ``signature`` a new state could take now."""
    with self._lock:
      return len(self._free.get(signature, ()))

  def _recycle(self, key: int) -> None:
    if (key in self._released and not self._holders[key]
        and key in self._signature):
      self._released.discard(key)
      self._pooled.add(key)
      self._free[self._signature[key]].append(key)


KEYS = KeyPool()
