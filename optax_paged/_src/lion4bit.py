"""Lion with blockwise 4-bit state, paged or not."""

from typing import Any

import optax

from optax_paged._src import base
from optax_paged._src import lion


def lion4bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: base.ScalarOrSchedule = 1e-3,
    mask: Any = None,
    *,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lion whose momentum is stored blockwise in 4 bits (0.53 B a parameter).

  :math:`u = -\eta(\mathrm{sign}((1-b_1) g + b_1 m) + \lambda p)`,
  :math:`m \leftarrow (1-b_2) g + b_2 m`, as ``optax.lion``, with the
  momentum stored between steps as one 4-bit code per element, two a byte,
  and one fp32 absmax per block of 128 elements, on the signed map of
  :func:`adamw4bit`'s first moment. The codes are rounded stochastically,
  up with probability equal to the value's fraction of the gap between its
  two neighbouring entries: rounded to nearest, a momentum that moves by 1%
  of a gradient a step (``b2=0.99``) would never leave its code. The random
  bits are a hash of the step, the leaf and the element's index, so a step
  is reproducible and a mesh draws what one device draws. The README's 4-bit
  section gives the measured quality. Leaves with fewer than
  ``min_8bit_size`` elements keep an fp32 momentum.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: rate combining the gradient and the momentum for the update.
    b2: decay rate of the momentum.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.lion``'s ``mask``.
    min_8bit_size: leaves with fewer elements keep fp32 state (4096).
    keep_32bit: parameters whose state stays fp32 whatever their size, as
      for :func:`lion8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.lion4bit(learning_rate=1e-4, weight_decay=0.1)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023; Li, Chen & Zhu, `Memory
    Efficient Optimizers with 4-bit States
    <https://arxiv.org/abs/2309.01507>`_, 2023.
  """
  return lion._lion(  # pylint: disable=protected-access
      learning_rate, b1, b2, weight_decay, mask, quantize=True, paged=False,
      min_8bit_size=min_8bit_size, keep_32bit=keep_32bit, code_bits=4)


def paged_lion4bit(
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
  """:func:`lion4bit` with its state in paged memory.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: rate combining the gradient and the momentum for the update.
    b2: decay rate of the momentum.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.lion``'s ``mask``.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size, as
      for :func:`lion8bit`.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_lion4bit(learning_rate=1e-4)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return lion._lion(  # pylint: disable=protected-access
      learning_rate, b1, b2, weight_decay, mask, quantize=True, paged=True,
      min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
      device_budget=device_budget, code_bits=4)
