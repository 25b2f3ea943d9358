"""Per-tensor update-norm clipping (bitsandbytes' ``max_unorm``): LAMB, LARS.

bitsandbytes' LAMB is Adam and its LARS is SGD with momentum, each with the
update of every tensor scaled so that its norm is at most ``max_unorm``
times the parameter's norm. The moments never depend on that scale, so the
kernel runs the base optimizer with learning rate 1 and no decoupled weight
decay, and its output (the unscaled direction) is scaled here, per leaf,
before the learning rate and the decoupled decay are applied. On a mesh the
norms are of whole leaves: inside a ``shard_map`` they are summed over the
manual axes a leaf is split over.
"""

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_paged._src import base
from optax_paged._src import hyperparam_checks


class TrustRatio(NamedTuple):
  """The scaling applied after the base optimizer's kernel.

  Attributes:
    learning_rate: a scalar or schedule of the step count.
    weight_decay: decoupled weight decay (a scalar or schedule), applied
      unscaled after the update, to leaves whose decay mask is set.
    max_unorm: an update's norm may be at most this times its parameter's.
  """

  learning_rate: base.ScalarOrSchedule
  weight_decay: base.ScalarOrSchedule
  max_unorm: Any


def check_max_unorm(max_unorm: Any) -> None:
  """Refuses a ``max_unorm`` that is negative, NaN or infinite."""
  hyperparam_checks.non_negative('max_unorm', max_unorm)


def _norm(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  squares = jnp.sum(jnp.square(x.astype(jnp.float32)))
  if axes:
    squares = jax.lax.psum(squares, axes)
  return jnp.sqrt(squares)


def apply(
    trust: TrustRatio,
    directions: Sequence[jax.Array],
    params: Sequence[jax.Array],
    decay: Sequence[bool],
    count: jax.Array,
    sum_axes: Sequence[tuple[str, ...]] | None = None,
) -> list[jax.Array]:
  """The updates from the kernel's unscaled directions, one per leaf.

  Args:
    trust: the learning rate, decoupled weight decay and ``max_unorm``.
    directions: the kernel's output with learning rate 1 (already negated:
      a step along it descends).
    params: the parameters, leaf by leaf.
    decay: whether each leaf gets the decoupled weight decay.
    count: the step count before this step (schedules are evaluated at it).
    sum_axes: per leaf, the manual mesh axes its shards are spread over
      (their norms are summed there); None on one device.

  Returns:
    ``-lr (s d + wd p)`` per leaf, in the parameter's dtype, with
    ``s = min(1, max_unorm |p| / |d|)``; a leaf whose parameter norm is 0 is
    not scaled (bitsandbytes would never move it: ``s`` would be 0).
  """
  learning_rate = jnp.asarray(base.value_at(trust.learning_rate, count),
                              jnp.float32)
  weight_decay = jnp.asarray(base.value_at(trust.weight_decay, count),
                             jnp.float32)
  max_unorm = jnp.asarray(trust.max_unorm, jnp.float32)
  updates = []
  for i, (d, p, decayed) in enumerate(
      zip(directions, params, decay, strict=True)):
    axes = tuple(sum_axes[i]) if sum_axes else ()
    d32, p32 = d.astype(jnp.float32), p.astype(jnp.float32)
    d_norm, p_norm = _norm(d32, axes), _norm(p32, axes)
    limit = max_unorm * p_norm
    scale = jnp.where((max_unorm > 0) & (p_norm > 0) & (d_norm > limit),
                      limit / d_norm, 1.0)
    update = learning_rate * (scale * d32)
    if decayed:
      update = update - learning_rate * (weight_decay * p32)
    updates.append(update.astype(p.dtype))
  return updates
