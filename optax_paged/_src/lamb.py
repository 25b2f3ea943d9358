"""LAMB (bitsandbytes' maths) with blockwise 8-bit or fp32 state."""

from typing import Any

import optax

from optax_paged._src import adamw
from optax_paged._src import base
from optax_paged._src import transform
from optax_paged._src import trust_ratio


def lamb_spec(learning_rate, b1, b2, eps, weight_decay,
              max_unorm) -> transform.OptimizerSpec:
  """Adam's kernel at learning rate 1, the trust ratio applied after it."""
  return adamw._adamw_spec(1.0, b1, b2, eps, 0.0)._replace(
      name='lamb', kernel='adamw',
      trust_ratio=trust_ratio.TrustRatio(learning_rate, weight_decay,
                                         max_unorm))


def _lamb(learning_rate, b1, b2, eps, weight_decay, mask, max_unorm, *,
          quantize, paged, min_8bit_size=base.MIN_8BIT_SIZE,
          device_budget=None, keep_32bit=None):
  adamw._check_hyperparams(b1, b2, eps, 0.0, None,
                           learning_rate=learning_rate,
                           weight_decay=weight_decay)
  trust_ratio.check_max_unorm(max_unorm)
  return transform.make_transformation(
      lamb_spec(learning_rate, b1, b2, eps, weight_decay, max_unorm),
      quantize=quantize, min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
      weight_decay_mask=mask, paged=paged, device_budget=device_budget,
  )


def lamb8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    max_unorm: float = 1.0,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LAMB as bitsandbytes computes it, moments stored blockwise in 8 bits.

  Adam's direction :math:`d = \hat m / (\sqrt{\hat v} + \epsilon)`, scaled
  per tensor so that its norm is at most ``max_unorm`` times the
  parameter's: :math:`u = -\eta (s d + \lambda p)` with
  :math:`s = \min(1, \mathrm{max\_unorm} \|p\| / \|d\|)` (bitsandbytes'
  ``LAMB8bit``, whose trust ratio clips but never enlarges; ``optax.lamb``'s
  is :math:`\|p\| / \|d + \lambda p\|` unclipped). A tensor whose norm is 0
  is not scaled (bitsandbytes would never move it). bitsandbytes multiplies
  the parameter by :math:`1 - \eta\lambda` after the step; the decay here
  is added to the update, as AdamW's, which differs by
  :math:`\eta^2 \lambda s d`. Its 8-bit LAMB quantizes whole tensors; these
  moments are blockwise, as its other 8-bit optimizers'.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count (bitsandbytes' default, 0).
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    max_unorm: the largest update norm, relative to the parameter norm (0
      turns the clipping off: Adam).
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.lamb8bit(learning_rate=1e-3, weight_decay=0.01)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT
    in 76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020.
  """
  return _lamb(learning_rate, b1, b2, eps, weight_decay, mask, max_unorm,
               quantize=True, paged=False, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit)


def paged_lamb8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    max_unorm: float = 1.0,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`lamb8bit` with its state in paged memory (see ``paged_adamw8bit``).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
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
    >>> tx = optax_paged.paged_lamb8bit(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
  """
  return _lamb(learning_rate, b1, b2, eps, weight_decay, mask, max_unorm,
               quantize=True, paged=True, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit, device_budget=device_budget)


def paged_lamb(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    max_unorm: float = 1.0,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`lamb8bit` with fp32 state in paged memory (bitsandbytes' ``LAMB``).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
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
    >>> tx = optax_paged.paged_lamb(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
  """
  return _lamb(learning_rate, b1, b2, eps, weight_decay, mask, max_unorm,
               quantize=False, paged=True, device_budget=device_budget)
