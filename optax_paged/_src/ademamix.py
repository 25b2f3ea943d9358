"""AdEMAMix with blockwise 8-bit or fp32 state."""

from typing import Any

import optax

from optax_paged._src import base
from optax_paged._src import hyperparam_checks
from optax_paged._src import hyperparams
from optax_paged._src import transform


def ademamix_spec(learning_rate, b1, b2, b3, alpha, eps,
                  weight_decay) -> transform.OptimizerSpec:
  def vector(count, count_inc):
    # optax evaluates the b3 and alpha schedules at the count before the step.
    b3_now = b3(count) if callable(b3) else b3
    return hyperparams.pack(
        'ademamix',
        learning_rate=base.value_at(learning_rate, count),
        b1=b1, one_minus_b1=hyperparams.one_minus(b1),
        b2=b2, one_minus_b2=hyperparams.one_minus(b2), eps=eps,
        weight_decay=base.value_at(weight_decay, count),
        bias_correction1=hyperparams.bias_correction(b1, count_inc),
        bias_correction2=hyperparams.bias_correction(b2, count_inc),
        b3=b3_now, one_minus_b3=hyperparams.one_minus(b3_now),
        alpha=alpha(count) if callable(alpha) else alpha)

  return transform.OptimizerSpec(name='ademamix', hyperparams=vector)


def _ademamix(learning_rate, b1, b2, b3, alpha, eps, weight_decay, mask, *,
              quantize, paged, min_8bit_size=base.MIN_8BIT_SIZE,
              device_budget=None, keep_32bit=None):
  hyperparam_checks.finite('learning_rate', learning_rate)
  for name, value in (('b1', b1), ('b2', b2), ('b3', b3)):
    hyperparam_checks.rate(name, value)
  hyperparam_checks.finite('alpha', alpha)
  hyperparam_checks.non_negative('eps', eps)
  hyperparam_checks.finite('weight_decay', weight_decay)
  return transform.make_transformation(
      ademamix_spec(learning_rate, b1, b2, b3, alpha, eps, weight_decay),
      quantize=quantize, min_8bit_size=min_8bit_size,
      keep_32bit=keep_32bit,
      weight_decay_mask=mask, paged=paged, device_budget=device_budget,
  )


def ademamix8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: base.ScalarOrSchedule = 0.9999,
    alpha: base.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdEMAMix with its three moments stored blockwise in 8 bits.

  As ``optax.contrib.ademamix``: a fast EMA :math:`m_1` (rate ``b1``,
  bias-corrected), a slow EMA :math:`m_2` (rate ``b3``) and the second moment
  :math:`v` (rate ``b2``, bias-corrected);
  :math:`u = -\eta((\hat m_1 + \alpha m_2) / (\sqrt{\hat v} + \epsilon) +
  \lambda p)`. ``b3`` and ``alpha`` may be schedules of the step count (the
  warm-ups of the paper), evaluated each step without recompiling.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: decay rate of the fast EMA.
    b2: decay rate of the second moment.
    b3: decay rate of the slow EMA, or a schedule of it.
    alpha: weight of the slow EMA, or a schedule of it.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.ademamix8bit(
    ...     learning_rate=1e-3, alpha=optax.linear_schedule(0.0, 5.0, 1000))
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024.
  """
  return _ademamix(learning_rate, b1, b2, b3, alpha, eps, weight_decay, mask,
                   quantize=True, paged=False, min_8bit_size=min_8bit_size,
                   keep_32bit=keep_32bit)


def paged_ademamix8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: base.ScalarOrSchedule = 0.9999,
    alpha: base.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`ademamix8bit` with its state in paged memory.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: decay rate of the fast EMA.
    b2: decay rate of the second moment.
    b3: decay rate of the slow EMA, or a schedule of it.
    alpha: weight of the slow EMA, or a schedule of it.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_ademamix8bit(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _ademamix(learning_rate, b1, b2, b3, alpha, eps, weight_decay, mask,
                   quantize=True, paged=True, min_8bit_size=min_8bit_size,
                   keep_32bit=keep_32bit,
                   device_budget=device_budget)


def paged_ademamix(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: base.ScalarOrSchedule = 0.9999,
    alpha: base.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdEMAMix with fp32 state in paged memory; equals
  ``optax.contrib.ademamix``.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: decay rate of the fast EMA.
    b2: decay rate of the second moment.
    b3: decay rate of the slow EMA, or a schedule of it.
    alpha: weight of the slow EMA, or a schedule of it.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_ademamix(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _ademamix(learning_rate, b1, b2, b3, alpha, eps, weight_decay, mask,
                   quantize=False, paged=True, device_budget=device_budget)
