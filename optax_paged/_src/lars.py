"""LARS (bitsandbytes' maths) with blockwise 8-bit or fp32 state."""

from typing import Any

import optax

from optax_paged._src import base
from optax_paged._src import hyperparam_checks
from optax_paged._src import single_moment
from optax_paged._src import transform
from optax_paged._src import trust_ratio


def lars_spec(learning_rate, momentum, weight_decay,
              max_unorm) -> transform.OptimizerSpec:
  """SGD-momentum's kernel at learning rate 1, the trust ratio after it."""
  return single_moment.sgd_spec(1.0, momentum, weight_decay)._replace(
      name='lars', kernel='sgd',
      trust_ratio=trust_ratio.TrustRatio(learning_rate, 0.0, max_unorm))


def _lars(learning_rate, momentum, weight_decay, mask, max_unorm, *,
          quantize, paged, min_8bit_size=base.MIN_8BIT_SIZE,
          device_budget=None, keep_32bit=None):
  hyperparam_checks.finite('learning_rate', learning_rate)
  hyperparam_checks.rate('momentum', momentum)
  hyperparam_checks.finite('weight_decay', weight_decay)
  trust_ratio.check_max_unorm(max_unorm)
  return transform.make_transformation(
      lars_spec(learning_rate, momentum, weight_decay, max_unorm),
      quantize=quantize, min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
      weight_decay_mask=mask, paged=paged, device_budget=device_budget,
  )


def lars8bit(
    learning_rate: base.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    max_unorm: float = 0.02,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LARS as bitsandbytes computes it, momentum stored blockwise in 8 bits.

  SGD with heavy-ball momentum, :math:`m \leftarrow g + \lambda p + \mu m`
  (weight decay added to the gradient), whose step is scaled per tensor so
  that its norm is at most ``max_unorm`` times the parameter's:
  :math:`u = -\eta s m` with :math:`s = \min(1, \mathrm{max\_unorm} \|p\| /
  \|m\|)` (bitsandbytes' ``LARS8bit``; ``optax.lars`` scales the gradient
  by an unclipped trust ratio before its momentum instead). A tensor whose
  norm is 0 is not scaled (bitsandbytes would never move it).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    momentum: the momentum decay rate (bitsandbytes requires one).
    weight_decay: L2 weight decay added to the gradient, a scalar or a
      schedule of the step count.
    mask: which parameters get weight decay (e.g. not biases and norms), a
      tree of booleans or a callable, as ``optax.adamw``'s ``mask``.
    max_unorm: the largest update norm, relative to the parameter norm
      (bitsandbytes' default, 0.02; 0 turns the clipping off: SGD).
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.lars8bit(learning_rate=0.1, weight_decay=1e-4)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    You, Gitman & Ginsburg, `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_, 2017.
  """
  return _lars(learning_rate, momentum, weight_decay, mask, max_unorm,
               quantize=True, paged=False, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit)


def paged_lars8bit(
    learning_rate: base.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    max_unorm: float = 0.02,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`lars8bit` with its state in paged memory (see ``paged_adamw8bit``).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    momentum: the momentum decay rate.
    weight_decay: L2 weight decay added to the gradient, a scalar or a
      schedule of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    max_unorm: the largest update norm, relative to the parameter norm.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_lars8bit(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
  """
  return _lars(learning_rate, momentum, weight_decay, mask, max_unorm,
               quantize=True, paged=True, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit, device_budget=device_budget)


def paged_lars(
    learning_rate: base.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    max_unorm: float = 0.02,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`lars8bit` with fp32 state in paged memory (bitsandbytes' ``LARS``).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    momentum: the momentum decay rate.
    weight_decay: L2 weight decay added to the gradient, a scalar or a
      schedule of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    max_unorm: the largest update norm, relative to the parameter norm.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_lars(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
  """
  return _lars(learning_rate, momentum, weight_decay, mask, max_unorm,
               quantize=False, paged=True, device_budget=device_budget)
