"""AdamW and Adam with blockwise 4-bit state, paged or not."""

from typing import Any

import optax

from optax_paged._src import adamw
from optax_paged._src import base


def adamw4bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW whose moments are stored blockwise in 4 bits.

  The update is optax's AdamW, computed in fp32 from moments stored between
  steps as one 4-bit code per element, two a byte, and one fp32 absmax per
  block of 128 elements: 1.0625 bytes of state per parameter instead of 8
  (2.03 for :func:`adamw8bit`). The maps are those of Li et al. (2023) as
  torchao's ``AdamW4bit`` ships them: the first moment uses a signed dynamic
  map (bitsandbytes' ``create_dynamic_map(True, 3, 4)``), the second a
  linear map without zero (``1/16, 2/16, ..., 1``), so that a small second
  moment is never decoded as zero (the paper's zero-point problem). Leaves
  with fewer than ``min_8bit_size`` elements keep fp32 moments.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    eps_root: added to the bias-corrected second moment inside the square
      root, as ``optax.adamw``'s ``eps_root``.
    mu_dtype: must be None, as for :func:`adamw8bit`.
    nesterov: Nesterov momentum (NAdam's look-ahead), as ``optax.adamw``'s.
    min_8bit_size: leaves with fewer elements keep fp32 state (4096).
    keep_32bit: parameters whose state stays fp32 whatever their size, as
      for :func:`adamw8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.adamw4bit(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((64, 64))}, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Li, Chen & Zhu, `Memory Efficient Optimizers with 4-bit States
    <https://arxiv.org/abs/2309.01507>`_, 2023.
  """
  return adamw._adam(  # pylint: disable=protected-access
      learning_rate, b1, b2, eps, weight_decay, mask, quantize=True,
      paged=False, min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
      eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov, code_bits=4)


def paged_adamw4bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`adamw4bit` with its state in paged memory.

  The same results as :func:`adamw4bit`, with the tiers of
  :func:`paged_adamw8bit`. On the host tier each 4-bit block's absmax
  crosses the link on its own (8-bit states move 32 at a time).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    eps_root: as ``optax.adamw``'s ``eps_root``.
    mu_dtype: must be None.
    nesterov: Nesterov momentum, as ``optax.adamw``'s.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size.
    device_budget: as :func:`paged_adamw8bit`'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.paged_adamw4bit(learning_rate=2e-4)
    >>> state = tx.init({'w': jnp.ones((64, 64))})
  """
  return adamw._adam(  # pylint: disable=protected-access
      learning_rate, b1, b2, eps, weight_decay, mask, quantize=True,
      paged=True, min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
      device_budget=device_budget, eps_root=eps_root, mu_dtype=mu_dtype,
      nesterov=nesterov, code_bits=4)


def adam4bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam with blockwise 4-bit state (:func:`adamw4bit` without decay).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    eps_root: as ``optax.adam``'s ``eps_root``.
    mu_dtype: must be None.
    nesterov: Nesterov momentum, as ``optax.adam``'s.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; matches ``optax.adam``.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.adam4bit(learning_rate=1e-3)
    >>> state = tx.init({'w': jnp.ones((64, 64))})
  """
  return adamw._adam(  # pylint: disable=protected-access
      learning_rate, b1, b2, eps, 0.0, None, quantize=True, paged=False,
      min_8bit_size=min_8bit_size, keep_32bit=keep_32bit, eps_root=eps_root,
      mu_dtype=mu_dtype, nesterov=nesterov, code_bits=4)


def paged_adam4bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`adam4bit` with its state in paged memory.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    eps_root: as ``optax.adam``'s ``eps_root``.
    mu_dtype: must be None.
    nesterov: Nesterov momentum, as ``optax.adam``'s.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size.
    device_budget: as :func:`paged_adamw8bit`'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; matches ``optax.adam``.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.paged_adam4bit(learning_rate=1e-3)
    >>> state = tx.init({'w': jnp.ones((64, 64))})
  """
  return adamw._adam(  # pylint: disable=protected-access
      learning_rate, b1, b2, eps, 0.0, None, quantize=True, paged=True,
      min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
      device_budget=device_budget, eps_root=eps_root, mu_dtype=mu_dtype,
      nesterov=nesterov, code_bits=4)
