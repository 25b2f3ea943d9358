"""Per-tensor trust ratios of LAMB and LARS: optax's, or bitsandbytes' clip.

Two kinds, named by the library whose maths they follow:

- ``'optax'`` (``optax.scale_by_trust_ratio``): an update ``u`` is scaled
  by ``trust_coefficient |p| / (|u| + eps)``, up or down (by 1 where either
  norm is 0). LAMB scales Adam's direction plus the decoupled decay, after
  the kernel. LARS scales the gradient plus its L2 decay *before* its
  momentum, as ``optax.lars`` chains them: the gradient is scaled here and
  the kernel, which keeps the momentum, runs on the scaled gradient.
- ``'bitsandbytes'``: the kernel's output is scaled down, never up, so that
  its norm is at most ``max_unorm`` times the parameter's; LAMB's decoupled
  decay is added unscaled afterwards.

Either way the kernel runs the base optimizer (Adam, SGD with momentum)
with learning rate 1 and no decoupled decay, and the learning rate is
applied here. On a mesh the norms are of whole leaves: inside a
``shard_map`` they are summed over the manual axes a leaf is split over.
"""

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_paged._src import base
from optax_paged._src import hyperparam_checks

OPTAX = 'optax'
BITSANDBYTES = 'bitsandbytes'
KINDS = (OPTAX, BITSANDBYTES)


class TrustRatio(NamedTuple):
  """The scaling applied around the base optimizer's kernel.

  Attributes:
    learning_rate: a scalar or schedule of the step count.
    weight_decay: a scalar or schedule of the step count, for leaves whose
      decay mask is set: LAMB's decoupled decay (added after the kernel),
      or optax LARS's L2 decay (added to the gradient before the ratio).
    max_unorm: bitsandbytes' bound on an update's norm, relative to its
      parameter's (None with optax's ratio).
    kind: ``'optax'`` or ``'bitsandbytes'``.
    trust_coefficient: optax's multiplier of the ratio.
    eps: optax's constant added to the update norm.
    before_kernel: whether the gradient is scaled before the kernel (optax's
      LARS, whose momentum accumulates scaled gradients).
    mask: which leaves are scaled (optax's ``trust_ratio_mask``): a tree of
      booleans or a callable of the parameters; None for all.
  """

  learning_rate: base.ScalarOrSchedule
  weight_decay: base.ScalarOrSchedule
  max_unorm: Any = None
  kind: str = BITSANDBYTES
  trust_coefficient: Any = 1.0
  eps: Any = 0.0
  before_kernel: bool = False
  mask: Any = None


def check_max_unorm(max_unorm: Any) -> None:
  """Refuses a ``max_unorm`` that is negative, NaN or infinite."""
  hyperparam_checks.non_negative('max_unorm', max_unorm)


def check_kind(name: str, kind: Any, max_unorm: Any,
               optax_only: dict[str, Any]) -> None:
  """Refuses an unknown kind, or an option the chosen kind does not have.

  Args:
    name: the optimizer, for messages.
    kind: the ``trust_ratio`` argument.
    max_unorm: the ``max_unorm`` argument (None when not given).
    optax_only: options of optax's ratio, by name (None when not given).
  """
  if kind not in KINDS:
    raise ValueError(
        f"{name}: trust_ratio must be 'optax' or 'bitsandbytes', got "
        f'{kind!r}.')
  if kind == OPTAX and max_unorm is not None:
    raise ValueError(
        f"{name}: max_unorm is bitsandbytes' clipping of the update norm; "
        "optax's trust ratio (the default) has none. Pass "
        "trust_ratio='bitsandbytes' with it for bitsandbytes' maths.")
  if kind == BITSANDBYTES:
    given = sorted(k for k, v in optax_only.items() if v is not None)
    if given:
      raise ValueError(
          f"{name}: {', '.join(given)} belong to optax's trust ratio, not "
          "bitsandbytes' (max_unorm); drop them or pass "
          "trust_ratio='optax'.")
  check_max_unorm(max_unorm)
  for key, value in optax_only.items():
    hyperparam_checks.non_negative(f'{name}: {key}', value)


def _norm(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  squares = jnp.sum(jnp.square(x.astype(jnp.float32)))
  if axes:
    squares = jax.lax.psum(squares, axes)
  return jnp.sqrt(squares)


def _optax_ratio(trust: TrustRatio, u: jax.Array, p: jax.Array,
                 axes: tuple[str, ...]) -> jax.Array:
  """``optax.scale_by_trust_ratio``'s factor (min_norm 0)."""
  u_norm, p_norm = _norm(u, axes), _norm(p, axes)
  ratio = (jnp.asarray(trust.trust_coefficient, jnp.float32) * p_norm
           / (u_norm + jnp.asarray(trust.eps, jnp.float32)))
  return jnp.where((p_norm == 0) | (u_norm == 0), 1.0, ratio)


def scale_gradients(
    trust: TrustRatio,
    grads: Sequence[jax.Array],
    params: Sequence[jax.Array],
    decay: Sequence[bool],
    scaled: Sequence[bool],
    count: jax.Array,
    sum_axes: Sequence[tuple[str, ...]] | None = None,
) -> list[jax.Array]:
  """optax LARS's scaled gradients, in float32, for the momentum kernel.

  Args:
    trust: the learning rate, L2 weight decay and optax's ratio options.
    grads: the gradients, leaf by leaf.
    params: the parameters, leaf by leaf.
    decay: whether each leaf gets the weight decay.
    scaled: whether each leaf gets the ratio (``trust.mask`` resolved).
    count: the step count before this step (schedules are evaluated at it).
    sum_axes: per leaf, the manual mesh axes its shards are spread over
      (their norms are summed there); None on one device.

  Returns:
    ``lr r |p| c / (|r| + eps)`` per leaf with ``r = g + wd p`` (``lr r``
    where the mask is unset, or either norm is 0): the kernel's momentum
    accumulates these, as ``optax.trace`` does after
    ``optax.scale_by_learning_rate``.
  """
  learning_rate = jnp.asarray(base.value_at(trust.learning_rate, count),
                              jnp.float32)
  weight_decay = jnp.asarray(base.value_at(trust.weight_decay, count),
                             jnp.float32)
  out = []
  for i, (g, p) in enumerate(zip(grads, params, strict=True)):
    r = g.astype(jnp.float32)
    p32 = p.astype(jnp.float32)
    if decay[i]:
      r = r + weight_decay * p32
    if scaled[i]:
      axes = tuple(sum_axes[i]) if sum_axes else ()
      r = _optax_ratio(trust, r, p32, axes) * r
    out.append(learning_rate * r)
  return out


def apply(
    trust: TrustRatio,
    directions: Sequence[jax.Array],
    params: Sequence[jax.Array],
    decay: Sequence[bool],
    scaled: Sequence[bool],
    count: jax.Array,
    sum_axes: Sequence[tuple[str, ...]] | None = None,
) -> list[jax.Array]:
  """The updates from the kernel's unscaled directions, one per leaf.

  Args:
    trust: the learning rate, decoupled weight decay and the ratio's kind
      and options.
    directions: the kernel's output with learning rate 1 (already negated:
      a step along it descends).
    params: the parameters, leaf by leaf.
    decay: whether each leaf gets the decoupled weight decay.
    scaled: whether each leaf gets the ratio (``trust.mask`` resolved).
    count: the step count before this step (schedules are evaluated at it).
    sum_axes: per leaf, the manual mesh axes its shards are spread over
      (their norms are summed there); None on one device.

  Returns:
    Per leaf, in the parameter's dtype: with optax's ratio, ``lr s r`` with
    ``r = d - wd p`` and ``s`` optax's ratio of ``r``; with bitsandbytes',
    ``lr (s d - wd p)`` with ``s = min(1, max_unorm |p| / |d|)``, where a
    leaf whose parameter norm is 0 is not scaled (bitsandbytes would never
    move it: ``s`` would be 0). Leaves outside the mask are not scaled.
  """
  learning_rate = jnp.asarray(base.value_at(trust.learning_rate, count),
                              jnp.float32)
  weight_decay = jnp.asarray(base.value_at(trust.weight_decay, count),
                             jnp.float32)
  updates = []
  for i, (d, p) in enumerate(zip(directions, params, strict=True)):
    axes = tuple(sum_axes[i]) if sum_axes else ()
    d32, p32 = d.astype(jnp.float32), p.astype(jnp.float32)
    if trust.kind == OPTAX:
      r = d32 - weight_decay * p32 if decay[i] else d32
      update = learning_rate * (
          _optax_ratio(trust, r, p32, axes) * r if scaled[i] else r)
    else:
      update = learning_rate * (
          _bitsandbytes_clip(trust, d32, p32, axes) * d32 if scaled[i]
          else d32)
      if decay[i]:
        update = update - learning_rate * (weight_decay * p32)
    updates.append(update.astype(p.dtype))
  return updates


def finish(
    trust: TrustRatio,
    directions: Sequence[jax.Array],
    params: Sequence[jax.Array],
    decay: Sequence[bool],
    scaled: Sequence[bool],
    count: jax.Array,
    output_params: bool,
    sum_axes: Sequence[tuple[str, ...]] | None = None,
) -> list[jax.Array]:
  """The step's outputs from the kernel's float32 directions, one per leaf.

  Args:
    trust, directions, params, decay, scaled, count, sum_axes: as ``apply``.
    output_params: the new parameters (as ``optax.apply_updates`` makes
      them) rather than the updates.

  Returns:
    Per leaf, in the parameter's dtype: where the ratio scaled the gradients
    before the kernel (``trust.before_kernel``), the directions themselves;
    else ``apply``'s updates; or the parameters plus those.
  """
  if trust.before_kernel:
    updates = [d.astype(p.dtype)
               for d, p in zip(directions, params, strict=True)]
  else:
    updates = apply(trust, directions, params, decay, scaled, count, sum_axes)
  if not output_params:
    return updates
  # As optax.apply_updates.
  return [jnp.asarray(p + u).astype(jnp.asarray(p).dtype)
          for p, u in zip(params, updates, strict=True)]


def _bitsandbytes_clip(trust: TrustRatio, d: jax.Array, p: jax.Array,
                       axes: tuple[str, ...]) -> jax.Array:
  """``min(1, max_unorm |p| / |d|)``; 1 where ``|p|`` or max_unorm is 0."""
  max_unorm = jnp.asarray(trust.max_unorm, jnp.float32)
  d_norm, p_norm = _norm(d, axes), _norm(p, axes)
  limit = max_unorm * p_norm
  return jnp.where((max_unorm > 0) & (p_norm > 0) & (d_norm > limit),
                   limit / d_norm, 1.0)
