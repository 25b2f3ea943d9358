"""The hyperparameter operand of the update call.

Hyperparameters reach the kernel as one float32 device vector (never as
compile-time attributes), so learning-rate schedules and
``optax.inject_hyperparams`` change values without recompiling. The layout
mirrors the ``Index`` enums of ``ffi/optimizer_math.h``.
"""

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import ffi

NUM_HYPERPARAMS = 16
# The last slot carries the step count's bits: the seed of stochastic rounding.
SEED_INDEX = NUM_HYPERPARAMS - 1


def _f32(x) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def _one_minus(x) -> jax.Array:
  # 1 - b in float64 when b is a Python number, as optax computes it.
  if isinstance(x, (int, float, np.floating)):
    return _f32(1.0 - float(x))
  return 1.0 - _f32(x)


def _bias_correction(decay, count) -> jax.Array:
  # Exactly optax's expression (float decay, int32 count), then float32.
  return _f32(1 - decay**count)


def _pack(values: list[jax.Array]) -> jax.Array:
  padding = [_f32(0.0)] * (NUM_HYPERPARAMS - len(values))
  return jnp.stack([_f32(v) for v in values] + padding)


def with_seed(vector: jax.Array, count: jax.Array) -> jax.Array:
  """``vector`` with the step count's bits in its seed slot."""
  seed = jax.lax.bitcast_convert_type(count.astype(jnp.int32), jnp.float32)
  return vector.at[SEED_INDEX].set(seed)


def adamw(learning_rate, b1, b2, eps, weight_decay, count) -> jax.Array:
  """AdamW's vector; ``count`` is the step number after this step (>= 1)."""
  return _pack([
      learning_rate,
      b1,
      _one_minus(b1),
      b2,
      _one_minus(b2),
      eps,
      weight_decay,
      _bias_correction(b1, count),
      _bias_correction(b2, count),
  ])


def lion(learning_rate, b1, b2, weight_decay) -> jax.Array:
  """Lion's vector (``Lion::Load`` in ffi/optimizer_math.h)."""
  return _pack([learning_rate, b1, _one_minus(b1), b2, _one_minus(b2),
                weight_decay])


def ademamix(learning_rate, b1, b2, b3, alpha, eps, weight_decay,
             count) -> jax.Array:
  """AdEMAMix's vector; ``b3`` and ``alpha`` already evaluated this step."""
  return _pack([
      learning_rate, b1, _one_minus(b1), b2, _one_minus(b2), eps,
      weight_decay, _bias_correction(b1, count), _bias_correction(b2, count),
      b3, _one_minus(b3), alpha,
  ])


def sgd(learning_rate, momentum, weight_decay) -> jax.Array:
  return _pack([learning_rate, momentum, weight_decay])


def rmsprop(learning_rate, decay, eps) -> jax.Array:
  return _pack([learning_rate, decay, _one_minus(decay), eps])


def adagrad(learning_rate, eps) -> jax.Array:
  return _pack([learning_rate, eps])


def _check_layout() -> None:
  if ffi.extension().NUM_HYPERPARAMS != NUM_HYPERPARAMS:
    raise ImportError(
        'optax_paged: the compiled extension expects '
        f'{ffi.extension().NUM_HYPERPARAMS} hyperparameters, Python packs '
        f'{NUM_HYPERPARAMS}; rebuild the package.'
    )


_check_layout()
