"""AdamW with blockwise 8-bit state, paged or not."""

from typing import Any

import optax

from optax_paged._src import base
from optax_paged._src import hyperparam_checks
from optax_paged._src import hyperparams
from optax_paged._src import transform


def _adamw_spec(learning_rate, b1, b2, eps, weight_decay, eps_root=0.0,
                nesterov=False):
  def vector(count, count_inc):
    return hyperparams.adamw(
        base.value_at(learning_rate, count),
        b1,
        b2,
        eps,
        base.value_at(weight_decay, count),
        count_inc,
        eps_root=eps_root,
        nesterov=nesterov,
    )

  return transform.OptimizerSpec(name='adamw', hyperparams=vector)


def _check_hyperparams(b1, b2, eps, eps_root, mu_dtype, *,
                       learning_rate=None, weight_decay=None) -> None:
  hyperparam_checks.finite('learning_rate', learning_rate)
  hyperparam_checks.finite('weight_decay', weight_decay)
  hyperparam_checks.rate('b1', b1)
  hyperparam_checks.rate('b2', b2)
  hyperparam_checks.non_negative('eps', eps)
  hyperparam_checks.non_negative('eps_root', eps_root)
  if mu_dtype is not None:
    raise ValueError(
        f'mu_dtype={mu_dtype!r}: optax_paged stores the first moment blockwise '
        'in 8 bits (or fp32 for small leaves and the fp32 optimizers) and '
        'computes in fp32; a first-moment dtype does not apply. Leave it None.'
    )


def _adam(learning_rate, b1, b2, eps, weight_decay, mask, *, quantize, paged,
          min_8bit_size=base.MIN_8BIT_SIZE, device_budget=None,
          keep_32bit=None, eps_root=0.0, mu_dtype=None, nesterov=False,
          code_bits=8):
  _check_hyperparams(b1, b2, eps, eps_root, mu_dtype,
                     learning_rate=learning_rate, weight_decay=weight_decay)
  return transform.make_transformation(
      _adamw_spec(learning_rate, b1, b2, eps, weight_decay, eps_root,
                  bool(nesterov)),
      quantize=quantize,
      min_8bit_size=min_8bit_size,
      keep_32bit=keep_32bit,
      weight_decay_mask=mask,
      paged=paged,
      device_budget=device_budget,
      code_bits=code_bits,
  )


def adamw8bit(
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
  r"""AdamW whose moments are stored blockwise in 8 bits.

  The update is optax's AdamW,
  :math:`u = -\eta\,(\hat m / (\sqrt{\hat v} + \epsilon) + \lambda p)`,
  computed in fp32 from moments that are stored between steps as one uint8
  code per element (bitsandbytes' dynamic tree map, signed for :math:`m`,
  unsigned for :math:`v`) and one fp32 absmax per block of 256 elements: 2
  bytes of state per parameter instead of 8. Leaves with fewer than
  ``min_8bit_size`` elements keep fp32 moments. The moments are updated in
  place by one fused kernel per dtype group; they are owned by the state
  registry and are not leaves of the returned state.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay: a tree of booleans with the
      structure of the parameters (or a prefix of it), or a callable that
      returns one given the parameters; as ``optax.adamw``'s ``mask``.
    min_8bit_size: leaves with fewer elements keep fp32 state (4096, as
      bitsandbytes).
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.
    eps_root: added to the bias-corrected second moment inside the square
      root, as ``optax.adamw``'s ``eps_root``.
    mu_dtype: must be None: the first moment's storage is the optimizer's
      (8-bit blockwise or fp32), not a dtype; accepted for optax's spelling.
    nesterov: Nesterov momentum (NAdam's look-ahead), as ``optax.adamw``'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  optax_paged.adamw8bit(learning_rate=1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((64, 64))}, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  return _adam(learning_rate, b1, b2, eps, weight_decay, mask, quantize=True,
               paged=False, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit,
               eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov)


def paged_adamw8bit(
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
  r"""AdamW with blockwise 8-bit state in paged (managed) memory.

  The same algorithm and the same results as :func:`adamw8bit`. On a GPU the
  state lives in CUDA managed memory, each leaf in one of two tiers: on the
  device (HBM speed) while ``device_budget`` lasts, in host RAM beyond it,
  where the kernel streams it over the link in place. The budget is never
  allowed past the GPU's free memory; ``optax_paged.set_device_budget``
  changes it between steps and ``optax_paged.memory_report`` shows where
  every buffer is. On the CPU every tier is plain host memory.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.
    device_budget: GPU bytes the state may occupy (an int), a fraction of
      the GPU memory free at init (a float in [0, 1]), None for half of it,
      or ``'auto'`` (an ``AutoBudget``) for what fits next to XLA's next
      step (see ``set_device_budget``). 0 keeps every buffer in host RAM.
    eps_root: added to the bias-corrected second moment inside the square
      root, as ``optax.adamw``'s ``eps_root``.
    mu_dtype: must be None: the first moment's storage is the optimizer's
      (8-bit blockwise or fp32), not a dtype; accepted for optax's spelling.
    nesterov: Nesterov momentum (NAdam's look-ahead), as ``optax.adamw``'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_adamw8bit(learning_rate=2e-4,
    ...                                  weight_decay=0.01)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((64, 64))}, state, params)

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  return _adam(learning_rate, b1, b2, eps, weight_decay, mask, quantize=True,
               paged=True, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit,
               device_budget=device_budget,
               eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov)


def adam8bit(
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
  """Adam with blockwise 8-bit state (``adamw8bit`` without weight decay).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.
    eps_root: added to the bias-corrected second moment inside the square
      root, as ``optax.adamw``'s ``eps_root``.
    mu_dtype: must be None: the first moment's storage is the optimizer's
      (8-bit blockwise or fp32), not a dtype; accepted for optax's spelling.
    nesterov: Nesterov momentum (NAdam's look-ahead), as ``optax.adamw``'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; matches ``optax.adam``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.adam8bit(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _adam(learning_rate, b1, b2, eps, 0.0, None, quantize=True,
               paged=False, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit,
               eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov)


def paged_adam8bit(
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
  """Adam with blockwise 8-bit state in paged memory (see ``paged_adamw8bit``).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).
    eps_root: added to the bias-corrected second moment inside the square
      root, as ``optax.adamw``'s ``eps_root``.
    mu_dtype: must be None: the first moment's storage is the optimizer's
      (8-bit blockwise or fp32), not a dtype; accepted for optax's spelling.
    nesterov: Nesterov momentum (NAdam's look-ahead), as ``optax.adamw``'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; matches ``optax.adam``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_adam8bit(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _adam(learning_rate, b1, b2, eps, 0.0, None, quantize=True,
               paged=True, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit,
               device_budget=device_budget,
               eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov)


def paged_adam(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam with fp32 state in paged memory (bitsandbytes' ``PagedAdam``).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).
    eps_root: added to the bias-corrected second moment inside the square
      root, as ``optax.adamw``'s ``eps_root``.
    mu_dtype: must be None: the first moment's storage is the optimizer's
      (8-bit blockwise or fp32), not a dtype; accepted for optax's spelling.
    nesterov: Nesterov momentum (NAdam's look-ahead), as ``optax.adamw``'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; equals ``optax.adam`` to
    float rounding.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_adam(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _adam(learning_rate, b1, b2, eps, 0.0, None, quantize=False,
               paged=True, device_budget=device_budget,
               eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov)


def paged_adamw(
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
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with fp32 state in paged memory (bitsandbytes' ``PagedAdamW``).

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    device_budget: GPU bytes (int) or fraction of free memory (float) the
      state may occupy; None for half of the free memory; ``'auto'`` for
      what fits next to XLA (see ``set_device_budget``).
    eps_root: added to the bias-corrected second moment inside the square
      root, as ``optax.adamw``'s ``eps_root``.
    mu_dtype: must be None: the first moment's storage is the optimizer's
      (8-bit blockwise or fp32), not a dtype; accepted for optax's spelling.
    nesterov: Nesterov momentum (NAdam's look-ahead), as ``optax.adamw``'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; equals ``optax.adamw`` to
    float rounding.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.paged_adamw(learning_rate=1e-3, nesterov=True)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _adam(learning_rate, b1, b2, eps, weight_decay, mask,
               quantize=False, paged=True, device_budget=device_budget,
               eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov)
