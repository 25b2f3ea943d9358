"""LARS (optax's or bitsandbytes' trust ratio), 8-bit or fp32 state."""

from typing import Any

import optax

from optax_paged._src import base
from optax_paged._src import hyperparam_checks
from optax_paged._src import single_moment
from optax_paged._src import transform
from optax_paged._src import trust_ratio as trust_ratio_lib

# optax.lars's defaults.
TRUST_COEFFICIENT = 0.001
EPS = 0.0
# bitsandbytes' LARS: updates at most 2% of their parameters' norm.
BITSANDBYTES_MAX_UNORM = 0.02


def lars_spec(learning_rate, momentum, weight_decay, *,
              trust_ratio=trust_ratio_lib.OPTAX, max_unorm=None,
              trust_coefficient=None, eps=None, trust_ratio_mask=None,
              nesterov=False) -> transform.OptimizerSpec:
  """SGD-momentum's kernel at learning rate 1, the trust ratio around it.

  optax's ratio scales the gradient before the kernel's momentum, whose
  state then holds scaled gradients: it has its own name ('lars_optax'),
  so that a checkpoint of one never restores into the other.
  """
  if trust_ratio == trust_ratio_lib.OPTAX:
    return single_moment.sgd_spec(1.0, momentum, 0.0, nesterov)._replace(
        name='lars_optax', kernel='sgd',
        trust_ratio=trust_ratio_lib.TrustRatio(
            learning_rate, weight_decay, kind=trust_ratio_lib.OPTAX,
            trust_coefficient=(TRUST_COEFFICIENT if trust_coefficient is None
                               else trust_coefficient),
            eps=EPS if eps is None else eps, before_kernel=True,
            mask=trust_ratio_mask))
  return single_moment.sgd_spec(1.0, momentum, weight_decay,
                                nesterov)._replace(
      name='lars', kernel='sgd',
      trust_ratio=trust_ratio_lib.TrustRatio(
          learning_rate, 0.0,
          BITSANDBYTES_MAX_UNORM if max_unorm is None else max_unorm,
          kind=trust_ratio_lib.BITSANDBYTES, mask=trust_ratio_mask))


def _lars(learning_rate, momentum, weight_decay, mask, trust_ratio,
          max_unorm, trust_coefficient, eps, trust_ratio_mask, nesterov, *,
          quantize, paged, min_8bit_size=base.MIN_8BIT_SIZE,
          device_budget=None, keep_32bit=None):
  hyperparam_checks.finite('learning_rate', learning_rate)
  hyperparam_checks.rate('momentum', momentum)
  hyperparam_checks.finite('weight_decay', weight_decay)
  trust_ratio_lib.check_kind(
      'lars', trust_ratio, max_unorm,
      {'trust_coefficient': trust_coefficient, 'eps': eps})
  return transform.make_transformation(
      lars_spec(learning_rate, momentum, weight_decay,
                trust_ratio=trust_ratio, max_unorm=max_unorm,
                trust_coefficient=trust_coefficient, eps=eps,
                trust_ratio_mask=trust_ratio_mask, nesterov=bool(nesterov)),
      quantize=quantize, min_8bit_size=min_8bit_size, keep_32bit=keep_32bit,
      weight_decay_mask=mask, paged=paged, device_budget=device_budget,
  )


def lars8bit(
    learning_rate: base.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    trust_ratio: str = 'optax',
    trust_coefficient: float | None = None,
    eps: float | None = None,
    trust_ratio_mask: Any = None,
    nesterov: bool = False,
    max_unorm: float | None = None,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LARS with its momentum stored blockwise in 8 bits.

  SGD with heavy-ball momentum and L2 weight decay, scaled per tensor by a
  trust ratio. Two ratios:

  - ``trust_ratio='optax'`` (the default): ``optax.lars``'s. The gradient
    plus decay, :math:`r = g + \lambda p`, is scaled by :math:`c \|p\| /
    (\|r\| + \epsilon)` (not where either norm is 0) and by the learning
    rate *before* the momentum: :math:`m \leftarrow \eta\, c \|p\| r /
    (\|r\| + \epsilon) + \mu m`, :math:`u = -m`.
  - ``trust_ratio='bitsandbytes'``: bitsandbytes' ``LARS8bit``. The
    momentum is of the raw gradient plus decay, :math:`m \leftarrow r +
    \mu m`, and the step is clipped after it: :math:`u = -\eta s m`,
    :math:`s = \min(1, \mathrm{max\_unorm} \|p\| / \|m\|)`; a tensor whose
    norm is 0 is not scaled (bitsandbytes would never move it).

  optax's is the default because this is an optax library whose factories
  mean their optax namesakes (its trust coefficient, 0.001, and ``eps``, 0,
  are optax's too); bitsandbytes' clip stops short of the optimum where the
  momentum is shorter than the limit (optax's Rosenbrock test ends at
  (0.90, 0.81) instead of (1, 1)). Code moving from bitsandbytes passes
  ``trust_ratio='bitsandbytes'``. The two momenta differ (optax's holds
  scaled gradients), so a checkpoint restores only under the ratio that
  wrote it. The positional order is bitsandbytes' (``momentum`` second);
  pass optax's other arguments by keyword.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    momentum: the momentum decay rate.
    weight_decay: L2 weight decay added to the gradient, a scalar or a
      schedule of the step count.
    mask: which parameters get weight decay (e.g. not biases and norms), a
      tree of booleans or a callable, as ``optax.lars``'s
      ``weight_decay_mask``.
    trust_ratio: ``'optax'`` or ``'bitsandbytes'`` (see above).
    trust_coefficient: with ``trust_ratio='optax'`` only: the ratio's
      multiplier (None for optax's 0.001).
    eps: with ``trust_ratio='optax'`` only: added to the norm the ratio
      divides by (None for optax's 0).
    trust_ratio_mask: which parameters are scaled by the ratio, as
      ``optax.lars``'s (None for all); the others take the plain SGD step.
    nesterov: Nesterov momentum, as ``optax.lars``'s.
    max_unorm: with ``trust_ratio='bitsandbytes'`` only: the largest update
      norm, relative to the parameter norm (None for bitsandbytes' 0.02; 0
      turns the clipping off: SGD).
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
  return _lars(learning_rate, momentum, weight_decay, mask, trust_ratio,
               max_unorm, trust_coefficient, eps, trust_ratio_mask, nesterov,
               quantize=True, paged=False, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit)


def paged_lars8bit(
    learning_rate: base.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    trust_ratio: str = 'optax',
    trust_coefficient: float | None = None,
    eps: float | None = None,
    trust_ratio_mask: Any = None,
    nesterov: bool = False,
    max_unorm: float | None = None,
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
    mask: which parameters get weight decay, as ``optax.lars``'s
      ``weight_decay_mask``.
    trust_ratio: ``'optax'`` or ``'bitsandbytes'`` (see :func:`lars8bit`).
    trust_coefficient: optax's ratio multiplier (None for 0.001).
    eps: optax's constant added to the norm the ratio divides by (None
      for 0).
    trust_ratio_mask: which parameters are scaled by the ratio.
    nesterov: Nesterov momentum.
    max_unorm: bitsandbytes' largest update norm, relative to the
      parameter norm (None for 0.02).
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
  return _lars(learning_rate, momentum, weight_decay, mask, trust_ratio,
               max_unorm, trust_coefficient, eps, trust_ratio_mask, nesterov,
               quantize=True, paged=True, min_8bit_size=min_8bit_size,
               keep_32bit=keep_32bit, device_budget=device_budget)


def paged_lars(
    learning_rate: base.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    trust_ratio: str = 'optax',
    trust_coefficient: float | None = None,
    eps: float | None = None,
    trust_ratio_mask: Any = None,
    nesterov: bool = False,
    max_unorm: float | None = None,
    device_budget: int | float | str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """:func:`lars8bit` with fp32 state in paged memory.

  ``optax.lars`` by default; bitsandbytes' ``LARS`` with
  ``trust_ratio='bitsandbytes'``.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    momentum: the momentum decay rate.
    weight_decay: L2 weight decay added to the gradient, a scalar or a
      schedule of the step count.
    mask: which parameters get weight decay, as ``optax.lars``'s
      ``weight_decay_mask``.
    trust_ratio: ``'optax'`` or ``'bitsandbytes'`` (see :func:`lars8bit`).
    trust_coefficient: optax's ratio multiplier (None for 0.001).
    eps: optax's constant added to the norm the ratio divides by (None
      for 0).
    trust_ratio_mask: which parameters are scaled by the ratio.
    nesterov: Nesterov momentum.
    max_unorm: bitsandbytes' largest update norm, relative to the
      parameter norm (None for 0.02).
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
  return _lars(learning_rate, momentum, weight_decay, mask, trust_ratio,
               max_unorm, trust_coefficient, eps, trust_ratio_mask, nesterov,
               quantize=False, paged=True, device_budget=device_budget)
