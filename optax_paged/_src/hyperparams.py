"""The hyperparameter operand of the update call.

Hyperparameters reach the kernel as one float32 device vector (never as
compile-time attributes), so learning-rate schedules and
``optax.inject_hyperparams`` change values without recompiling. Each
optimizer's slots are named in the optimizer table (``kSlots`` in
``ffi/optimizer_math.h``), and ``pack`` lays values out by those names.
"""

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import ffi
from optax_paged._src import optimizer_table

NUM_HYPERPARAMS = 16
# The last slot carries the step count's bits: the seed of stochastic rounding.
SEED_INDEX = NUM_HYPERPARAMS - 1


def _f32(x) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def one_minus(x) -> jax.Array:
  """1 - x: in float64 when x is a Python number, as optax computes it."""
  if isinstance(x, (int, float, np.floating)):
    return _f32(1.0 - float(x))
  return 1.0 - _f32(x)


def bias_correction(decay, count) -> jax.Array:
  """Exactly optax's ``1 - decay**count`` (float decay, int32 count)."""
  return _f32(1 - decay**count)


def pack(optimizer: str, **values) -> jax.Array:
  """The hyperparameter vector of ``optimizer`` from its slots, by name.

  Args:
    optimizer: the optimizer's name in the table.
    **values: one value per slot the table names for it (scalars or traced
      scalars), no more and no fewer.

  Returns:
    float32[NUM_HYPERPARAMS], the slots in the kernel's order, zero padded.
  """
  slots = optimizer_table.info(optimizer).slots
  if set(values) != set(slots):
    raise TypeError(
        f'{optimizer}: hyperparameters {sorted(values)} do not match the '
        f'slots of the compiled optimizer {list(slots)}.'
    )
  padding = [_f32(0.0)] * (NUM_HYPERPARAMS - len(slots))
  return jnp.stack([_f32(values[name]) for name in slots] + padding)


def unpack(optimizer: str, hyperparams: jax.Array) -> dict[str, jax.Array]:
  """The slots of ``optimizer``'s hyperparameter vector, by name."""
  return {name: hyperparams[i] for i, name in
          enumerate(optimizer_table.info(optimizer).slots)}


def with_seed(hyperparams: jax.Array, count: jax.Array) -> jax.Array:
  """``hyperparams`` with the step count's bits in its seed slot."""
  seed = jax.lax.bitcast_convert_type(count.astype(jnp.int32), jnp.float32)
  return hyperparams.at[SEED_INDEX].set(seed)


def _check_layout() -> None:
  extension = ffi.extension()
  if (extension.NUM_HYPERPARAMS, extension.SEED_INDEX) != (
      NUM_HYPERPARAMS, SEED_INDEX):
    raise ImportError(
        'optax_paged: the compiled extension expects '
        f'{extension.NUM_HYPERPARAMS} hyperparameters, Python packs '
        f'{NUM_HYPERPARAMS}; rebuild the package.'
    )


_check_layout()
