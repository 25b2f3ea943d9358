"""Lion with blockwise 8-bit or fp32 state."""

from typing import Any

import optax

from optax_paged._src import base
from optax_paged._src import hyperparam_checks
from optax_paged._src import hyperparams
from optax_paged._src import transform


def lion_spec(learning_rate, b1, b2, weight_decay) -> transform.OptimizerSpec:
  def vector(count, count_inc):
    del count_inc
    return hyperparams.pack(
        'lion', learning_rate=base.value_at(learning_rate, count),
        b1=b1, one_minus_b1=hyperparams.one_minus(b1),
        b2=b2, one_minus_b2=hyperparams.one_minus(b2),
        weight_decay=base.value_at(weight_decay, count))

  return transform.OptimizerSpec(name='lion', hyperparams=vector)


def _lion(learning_rate, b1, b2, weight_decay, mask, *, quantize, paged,
          min_8bit_size=base.MIN_8BIT_SIZE, device_budget=None,
          keep_32bit=None, code_bits=8):
  hyperparam_checks.finite('learning_rate', learning_rate)
  hyperparam_checks.rate('b1', b1, one_allowed=True)
  hyperparam_checks.rate('b2', b2, one_allowed=True)
  hyperparam_checks.finite('weight_decay', weight_decay)
  return transform.make_transformation(
      lion_spec(learning_rate, b1, b2, weight_decay),
      quantize=quantize, min_8bit_size=min_8bit_size,
      keep_32bit=keep_32bit,
      weight_decay_mask=mask, paged=paged, device_budget=device_budget,
      code_bits=code_bits,
  )


def lion8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: base.ScalarOrSchedule = 1e-3,
    mask: Any = None,
    *,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lion whose momentum is stored blockwise in 8 bits (1 byte a parameter).

  :math:`u = -\eta(\mathrm{sign}((1-b_1) g + b_1 m) + \lambda p)`,
  :math:`m \leftarrow (1-b_2) g + b_2 m`, as ``optax.lion``.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: rate combining the gradient and the momentum for the update.
    b2: decay rate of the momentum.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.lion``'s ``mask``.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.lion8bit(learning_rate=1e-4, weight_decay=0.1)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  return _lion(learning_rate, b1, b2, weight_decay, mask, quantize=True,
               paged=False, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit)


def paged_lion8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: base.ScalarOrSchedule = 1e-3,
    mask: Any = None,
    *,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`lion8bit` with its state in paged memory.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: rate combining the gradient and the momentum for the update.
    b2: decay rate of the momentum.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.lion``'s ``mask``.
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
    >>> tx = optax_paged.paged_lion8bit(learning_rate=1e-4)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _lion(learning_rate, b1, b2, weight_decay, mask, quantize=True,
               paged=True, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit,
               device_budget=device_budget)


def paged_lion(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: base.ScalarOrSchedule = 1e-3,
    mask: Any = None,
    *,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Lion with fp32 state in paged memory; equals ``optax.lion``.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: rate combining the gradient and the momentum for the update.
    b2: decay rate of the momentum.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.lion``'s ``mask``.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_lion(learning_rate=1e-4)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _lion(learning_rate, b1, b2, weight_decay, mask, quantize=False,
               paged=True, device_budget=device_budget)
