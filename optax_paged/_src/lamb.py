"""LAMB (optax's or bitsandbytes' trust ratio), 8-bit or fp32 state."""

from typing import Any

import optax

from optax_paged._src import adamw
from optax_paged._src import base
from optax_paged._src import transform
from optax_paged._src import trust_ratio as trust_ratio_lib

# bitsandbytes' LAMB: updates at most as long as their parameters.
BITSANDBYTES_MAX_UNORM = 1.0


def lamb_spec(learning_rate, b1, b2, eps, weight_decay, *,
              trust_ratio=trust_ratio_lib.OPTAX, max_unorm=None,
              eps_root=0.0) -> transform.OptimizerSpec:
  """Adam's kernel at learning rate 1, the trust ratio applied after it.

  Both ratios leave Adam's moments alone, so the state (and a checkpoint)
  is the same whichever is chosen.
  """
  if trust_ratio == trust_ratio_lib.OPTAX:
    trust = trust_ratio_lib.TrustRatio(learning_rate, weight_decay,
                                       kind=trust_ratio_lib.OPTAX)
  else:
    trust = trust_ratio_lib.TrustRatio(
        learning_rate, weight_decay,
        BITSANDBYTES_MAX_UNORM if max_unorm is None else max_unorm,
        kind=trust_ratio_lib.BITSANDBYTES)
  return adamw._adamw_spec(1.0, b1, b2, eps, 0.0, eps_root)._replace(
      name='lamb', kernel='adamw', trust_ratio=trust)


def _lamb(learning_rate, b1, b2, eps, weight_decay, mask, trust_ratio,
          max_unorm, eps_root, *, quantize, paged,
          min_8bit_size=base.MIN_8BIT_SIZE, device_budget=None,
          keep_32bit=None):
  adamw._check_hyperparams(b1, b2, eps, eps_root, None,
                           learning_rate=learning_rate,
                           weight_decay=weight_decay)
  trust_ratio_lib.check_kind('lamb', trust_ratio, max_unorm, {})
  return transform.make_transformation(
      lamb_spec(learning_rate, b1, b2, eps, weight_decay,
                trust_ratio=trust_ratio, max_unorm=max_unorm,
                eps_root=eps_root),
      quantize=quantize, min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
      weight_decay_mask=mask, paged=paged, device_budget=device_budget,
  )


def lamb8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    trust_ratio: str = 'optax',
    max_unorm: float | None = None,
    eps_root: float = 0.0,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LAMB with its moments stored blockwise in 8 bits.

  Adam's direction :math:`d = \hat m / (\sqrt{\hat v} + \epsilon)`, with
  decoupled weight decay, scaled per tensor by a trust ratio. Two ratios:

  - ``trust_ratio='optax'`` (the default): ``optax.lamb``'s,
    :math:`u = -\eta\, r \|p\| / \|r\|` with :math:`r = d + \lambda p` (no
    scaling where either norm is 0): every tensor moves by :math:`\eta`
    times its own norm.
  - ``trust_ratio='bitsandbytes'``: bitsandbytes' ``LAMB8bit``, which clips
    but never enlarges: :math:`u = -\eta (s d + \lambda p)`, :math:`s =
    \min(1, \mathrm{max\_unorm} \|p\| / \|d\|)`; a tensor whose norm is 0 is
    not scaled (bitsandbytes would never move it). bitsandbytes multiplies
    the parameter by :math:`1 - \eta\lambda` after the step; the decay here
    is added to the update, which differs by :math:`\eta^2 \lambda s d`.

  optax's is the default because this is an optax library whose factories
  mean their optax namesakes: code moving from ``optax.lamb`` changes only
  the name (``eps`` is optax's 1e-6 too). bitsandbytes' ratio stops short
  of the optimum where Adam's direction is shorter than the parameter
  (optax's parabola test ends at (1.00, 1.28, 1.00) instead of (1, -1, 1)).
  Code moving from bitsandbytes passes ``trust_ratio='bitsandbytes'`` (and
  ``eps=1e-8``, its default). The moments are Adam's under either ratio, so
  a checkpoint restores under either. Its 8-bit LAMB quantizes whole
  tensors; these moments are blockwise, as its other 8-bit optimizers'.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability (optax's 1e-6;
      bitsandbytes' is 1e-8).
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.lamb``'s ``mask``.
    trust_ratio: ``'optax'`` or ``'bitsandbytes'`` (see above).
    max_unorm: with ``trust_ratio='bitsandbytes'`` only: the largest update
      norm, relative to the parameter norm (bitsandbytes' default, 1.0; 0
      turns the clipping off: Adam).
    eps_root: added inside the square root, as ``optax.lamb``'s.
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
  return _lamb(learning_rate, b1, b2, eps, weight_decay, mask, trust_ratio,
               max_unorm, eps_root, quantize=True, paged=False,
               min_8bit_size=min_8bit_size, keep_32bit=keep_32bit)


def paged_lamb8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    trust_ratio: str = 'optax',
    max_unorm: float | None = None,
    eps_root: float = 0.0,
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
    mask: which parameters get weight decay, as ``optax.lamb``'s ``mask``.
    trust_ratio: ``'optax'`` or ``'bitsandbytes'`` (see :func:`lamb8bit`).
    max_unorm: with ``trust_ratio='bitsandbytes'`` only: the largest update
      norm, relative to the parameter norm (default 1.0).
    eps_root: added inside the square root, as ``optax.lamb``'s.
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
  return _lamb(learning_rate, b1, b2, eps, weight_decay, mask, trust_ratio,
               max_unorm, eps_root, quantize=True, paged=True,
               min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
               device_budget=device_budget)


def paged_lamb(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    trust_ratio: str = 'optax',
    max_unorm: float | None = None,
    eps_root: float = 0.0,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`lamb8bit` with fp32 state in paged memory.

  ``optax.lamb`` by default; bitsandbytes' ``LAMB`` with
  ``trust_ratio='bitsandbytes'``.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.lamb``'s ``mask``.
    trust_ratio: ``'optax'`` or ``'bitsandbytes'`` (see :func:`lamb8bit`).
    max_unorm: with ``trust_ratio='bitsandbytes'`` only: the largest update
      norm, relative to the parameter norm (default 1.0).
    eps_root: added inside the square root, as ``optax.lamb``'s.
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
  return _lamb(learning_rate, b1, b2, eps, weight_decay, mask, trust_ratio,
               max_unorm, eps_root, quantize=False, paged=True,
               device_budget=device_budget)
