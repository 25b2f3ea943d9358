"""Checks of the constant hyperparameters every factory is given.

One place, so that a value is judged the same whatever its numeric type: a
Python number, a NumPy scalar or a concrete 0-d array (what
``optax.inject_hyperparams`` passes when its init runs outside ``jax.jit``).
Schedules and traced values are not checked here: they are only known
step by step, inside the compiled update. Every check refuses NaN and the
infinities, which would otherwise turn every update into NaN or nothing
without an error (``max_unorm=nan`` clips nothing, ``eps=-1`` takes the
square root of a negative number).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base


def concrete(name: str, value: Any) -> float | None:
  """``value`` as a Python float; None for a schedule or a traced value.

  Args:
    name: the argument, for messages.
    value: what the factory was given.

  Returns:
    The number, or None where it is known only inside a step (or where an
    optional argument was left None).

  Raises:
    TypeError: ``value`` is neither a number nor a schedule.
  """
  if value is None or callable(value) or base.is_tracer(value):
    return None
  if isinstance(value, (int, float, np.number)):
    return float(value)
  # jnp.issubdtype: NumPy does not count bfloat16 (as optax's
  # inject_hyperparams passes it for bf16 parameters) as a number.
  if (isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
      and (jnp.issubdtype(value.dtype, jnp.number)
           or value.dtype == np.bool_)):
    return float(value)
  raise TypeError(
      f'{name} must be a number (or a schedule where the argument takes '
      f'one), got {value!r}.')


def finite(name: str, value: Any) -> float | None:
  """Refuses NaN and the infinities (a learning rate may be negative)."""
  number = concrete(name, value)
  if number is not None and not math.isfinite(number):
    raise ValueError(f'{name} must be a finite number, got {value!r}.')
  return number


def non_negative(name: str, value: Any) -> None:
  """Refuses a negative or non-finite value (eps, decays, bounds)."""
  number = finite(name, value)
  if number is not None and number < 0:
    raise ValueError(f'{name} must be >= 0, got {value!r}.')


def rate(name: str, value: Any, *, one_allowed: bool = False) -> None:
  """Refuses a decay rate outside [0, 1) ([0, 1] with ``one_allowed``)."""
  number = concrete(name, value)
  if number is None:
    return
  inside = 0.0 <= number <= 1.0 if one_allowed else 0.0 <= number < 1.0
  if not inside:
    interval = '[0, 1]' if one_allowed else '[0, 1)'
    raise ValueError(f'{name} must be in {interval}, got {value!r}.')


def size(name: str, value: Any) -> None:
  """Refuses an element count that is not a whole number >= 0."""
  number = concrete(name, value)
  if number is not None and not (
      math.isfinite(number) and number >= 0 and number == int(number)):
    raise ValueError(f'{name} must be a whole number >= 0, got {value!r}.')

