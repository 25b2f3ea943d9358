"""SGD with momentum, RMSprop and Adagrad with blockwise 8-bit state."""

from typing import Any

import optax

from optax_paged._src import base
from optax_paged._src import hyperparam_checks
from optax_paged._src import hyperparams
from optax_paged._src import transform


def sgd_spec(learning_rate, momentum, weight_decay,
             nesterov=False) -> transform.OptimizerSpec:
  def vector(count, count_inc):
    del count_inc
    return hyperparams.pack(
        'sgd', learning_rate=base.value_at(learning_rate, count),
        momentum=0.0 if momentum is None else momentum,
        weight_decay=base.value_at(weight_decay, count),
        nesterov=1.0 if nesterov else 0.0)

  return transform.OptimizerSpec(name='sgd', hyperparams=vector)


def rmsprop_spec(learning_rate, decay, eps) -> transform.OptimizerSpec:
  def vector(count, count_inc):
    del count_inc
    return hyperparams.pack(
        'rmsprop',
        learning_rate=base.value_at(learning_rate, count),
        decay=decay, one_minus_decay=hyperparams.one_minus(decay), eps=eps)

  return transform.OptimizerSpec(name='rmsprop', hyperparams=vector)


def adagrad_spec(learning_rate, initial_accumulator_value,
                 eps) -> transform.OptimizerSpec:
  def vector(count, count_inc):
    del count_inc
    return hyperparams.pack(
        'adagrad',
        learning_rate=base.value_at(learning_rate, count),
        eps=eps)

  return transform.OptimizerSpec(
      name='adagrad', hyperparams=vector,
      initial_values=(initial_accumulator_value,),
  )


def _make(spec, min_8bit_size, keep_32bit):
  return transform.make_transformation(
      spec, quantize=True, min_8bit_size=min_8bit_size,
      keep_32bit=keep_32bit,
      weight_decay_mask=None, paged=False,
  )


def sgd8bit(
    learning_rate: base.ScalarOrSchedule,
    momentum: float | None = None,
    weight_decay: base.ScalarOrSchedule = 0.0,
    *,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with heavy-ball momentum stored blockwise in 8 bits.

  :math:`m \leftarrow g + \lambda p + \mu m`, :math:`u = -\eta m` (with
  ``nesterov``, :math:`u = -\eta (g + \lambda p + \mu m)` after the moment's
  update): with ``weight_decay=0`` this is ``optax.sgd(learning_rate,
  momentum, nesterov)``; weight decay is added to the gradient, as PyTorch and
  bitsandbytes do for SGD. ``momentum=None`` (optax's default) is plain SGD;
  the state still holds its one moment (1 byte a parameter), which then
  carries nothing: without momentum ``optax.sgd`` needs no state at all.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    momentum: the momentum decay rate, or None for none (optax's default;
      bitsandbytes' ``SGD8bit`` requires one, e.g. 0.9).
    weight_decay: L2 weight decay added to the gradient, a scalar or a
      schedule of the step count.
    nesterov: Nesterov momentum, as ``optax.sgd``'s.
    accumulator_dtype: must be None: the momentum's storage is 8-bit
      blockwise (fp32 for small leaves); accepted for optax's spelling.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.sgd8bit(learning_rate=1e-2, momentum=0.9)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  hyperparam_checks.finite('learning_rate', learning_rate)
  hyperparam_checks.rate('momentum', momentum)
  hyperparam_checks.finite('weight_decay', weight_decay)
  if accumulator_dtype is not None:
    raise ValueError(
        f'accumulator_dtype={accumulator_dtype!r}: optax_paged stores the '
        'momentum blockwise in 8 bits and computes in fp32; leave it None.')
  return _make(sgd_spec(learning_rate, momentum, weight_decay, bool(nesterov)),
               min_8bit_size, keep_32bit)


def rmsprop8bit(
    learning_rate: base.ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    *,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSprop with its second moment stored blockwise in 8 bits.

  :math:`v \leftarrow (1-d) g^2 + d v`, :math:`u = -\eta g / \sqrt{v +
  \epsilon}`, as ``optax.rmsprop(learning_rate, decay, eps)``.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    decay: decay rate of the second moment.
    eps: added inside the square root.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.rmsprop8bit(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  hyperparam_checks.finite('learning_rate', learning_rate)
  hyperparam_checks.rate('decay', decay)
  hyperparam_checks.non_negative('eps', eps)
  return _make(rmsprop_spec(learning_rate, decay, eps), min_8bit_size,
               keep_32bit)


def adagrad8bit(
    learning_rate: base.ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    keep_32bit: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adagrad with its sum of squares stored blockwise in 8 bits.

  :math:`s \leftarrow s + g^2` from ``initial_accumulator_value``,
  :math:`u = -\eta g / \sqrt{s + \epsilon}`, as ``optax.adagrad``.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    initial_accumulator_value: the value the sum of squares starts from.
    eps: added inside the square root.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    keep_32bit: parameters whose state stays fp32 whatever their size (e.g.
      embeddings): a tree of booleans with the structure of the parameters
      (or a prefix of it), or a callable returning one given the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.adagrad8bit(learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  hyperparam_checks.finite('learning_rate', learning_rate)
  hyperparam_checks.non_negative('initial_accumulator_value',
                                 initial_accumulator_value)
  hyperparam_checks.non_negative('eps', eps)
  return _make(
      adagrad_spec(learning_rate, initial_accumulator_value, eps),
      min_8bit_size,
      keep_32bit,
  )
