"""Master weights: 16-bit parameters with a correction toward float32.

With ``master_weight_bits`` an optimizer keeps, for each bfloat16 or float16
parameter, a signed correction (8 bits for a 24-bit master, 16 bits for a
32-bit one) in its state, next to the moments. The master weight is

  ``master = p + q * gap / 2**bits``,

where ``gap`` is the distance from ``p`` to its neighbour on the master's
side. The step updates the master in float32, makes the parameter the
master rounded to nearest (ties toward +infinity, so that every offset
fits the correction's range) and writes the new correction against it.
The functions here are the kernels' (``ffi/master_weights.h``) in
``jax.numpy``, bit for bit: the reference optimizers,
``optax_paged.master_params`` and the TPU path's Pallas kernel
(``tpu_kernel``, where Mosaic lowers them) use them.

The parameters a correction belongs to are fingerprinted per block of
``BLOCK_SIZE`` elements; a block whose parameters changed outside the
optimizer drops its correction, so a correction never applies to a
parameter it was not computed for.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base

# Parameters per fingerprint (kMasterBlockSize).
BLOCK_SIZE = 128
# master_weight_bits -> bits of the correction.
CORRECTION_BITS = {24: 8, 32: 16}
_SIXTEEN_BIT = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
_EXPONENT_MASK = {np.dtype(jnp.bfloat16): 0x7f80, np.dtype(jnp.float16): 0x7c00}
_FINGERPRINT_MULTIPLIER = np.uint32(0x9e3779b1)


INJECTED_MSG = (
    '{name} decides the state\'s layout at init, so it must be known there: '
    'under optax.inject_hyperparams pass static_args=({name!r},).')


def check_bits(name: str, value: Any) -> int | None:
  """``master_weight_bits`` as None, 24 or 32; refuses anything else.

  A concrete array (as optax.inject_hyperparams passes numbers) counts by
  its value; a traced one is returned as it is, and refused if an init
  needs it (``correction_bits``).
  """
  if value is None or base.is_tracer(value):
    return value
  if isinstance(value, (jax.Array, np.ndarray)) and value.shape == ():
    number = value.item()
  elif isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be None, 24 or 32, got {value!r}.')
  else:
    number = int(value)
  if number not in CORRECTION_BITS:
    raise ValueError(
        f'{name} must be None, 24 (an 8-bit correction a parameter) or 32 '
        f'(16 bits: the exact float32 master of a bfloat16 parameter), got '
        f'{value}.')
  return int(number)


def correction_bits(master_weight_bits: int | None, dtype: np.dtype) -> int:
  """Bits of a leaf's correction: 0 unless it is a 16-bit parameter."""
  if master_weight_bits is None or np.dtype(dtype) not in _SIXTEEN_BIT:
    return 0
  if base.is_tracer(master_weight_bits):
    raise TypeError(INJECTED_MSG.format(name='master_weight_bits'))
  return CORRECTION_BITS[int(master_weight_bits)]


def check_leaves(optimizer: str, master_weight_bits: int | None,
                 dtypes: list[np.dtype]) -> None:
  """Refuses master weights for parameters none of which is 16-bit."""
  if master_weight_bits is None or not dtypes:
    return
  if not any(np.dtype(d) in _SIXTEEN_BIT for d in dtypes):
    raise ValueError(
        f'{optimizer}: master_weight_bits={master_weight_bits} keeps float32 '
        'master weights for bfloat16 and float16 parameters, and these '
        f'parameters are all {np.dtype(dtypes[0]).name}: they are their own '
        'masters. Leave master_weight_bits=None.')


def _bits(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)


def _from_bits(bits: jax.Array, dtype: Any) -> jax.Array:
  return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), dtype)


def _is_finite(x: jax.Array) -> jax.Array:
  mask = _EXPONENT_MASK[np.dtype(x.dtype)]
  return (_bits(x) & mask) != mask


def neighbour(x: jax.Array, up: jax.Array) -> jax.Array:
  """The next 16-bit value toward +inf (``up``) or -inf."""
  bits = _bits(x)
  negative = (bits & 0x8000) != 0
  stepped = jnp.where(negative == up, bits - 1, bits + 1)
  zero = jnp.where(up, jnp.uint32(0x0001), jnp.uint32(0x8001))
  return _from_bits(jnp.where((bits & 0x7fff) == 0, zero, stepped), x.dtype)


def gap_toward(x: jax.Array, up: jax.Array) -> jax.Array:
  """|neighbour(x, up) - x| in float32 (a power of two, or inf)."""
  here = x.astype(jnp.float32)
  there = neighbour(x, up).astype(jnp.float32)
  return jnp.where(up, there - here, here - there)


def round_ties_up(master: jax.Array, dtype: Any) -> jax.Array:
  """``master`` rounded to ``dtype``, to nearest with ties toward +inf."""
  rounded = master.astype(dtype)
  below = master - rounded.astype(jnp.float32)
  tie = (_is_finite(rounded) & (below > 0)
         & (below == 0.5 * gap_toward(rounded, jnp.bool_(True))))
  return jnp.where(tie, neighbour(rounded, jnp.bool_(True)), rounded)


def _units(bits: int) -> float:
  return 65536.0 if bits == 16 else 256.0


def encode(master: jax.Array, param: jax.Array, bits: int) -> jax.Array:
  """The ``bits``-bit correction (int32) of ``master`` against ``param``."""
  limit = 32767.0 if bits == 16 else 127.0
  offset = master - param.astype(jnp.float32)
  gap = gap_toward(param, offset > 0)
  # Divided first, as the kernels: offset * 2^16 overflowed past 2^111.
  units = (offset / gap) * jnp.float32(_units(bits))
  usable = _is_finite(param) & (units == units) & (gap < jnp.inf)
  clipped = jnp.clip(units, -limit - 1.0, limit)
  return jnp.where(usable, jnp.rint(clipped), 0.0).astype(jnp.int32)


def decode(param: jax.Array, correction: jax.Array, bits: int) -> jax.Array:
  """The float32 master of ``param`` and its ``bits``-bit correction."""
  correction = correction.astype(jnp.int32)
  here = param.astype(jnp.float32)
  gap = gap_toward(param, correction > 0)
  # The unit first (exact), as the kernels: q * gap overflowed past 2^111.
  master = here + correction.astype(jnp.float32) * (
      gap / jnp.float32(_units(bits)))
  return jnp.where((correction == 0) | ~_is_finite(param), here, master)


def step_to_master(param: jax.Array,
                   master: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(update, new parameter): the step toward ``master``, as the kernels
  take it (the update's rounding, then ``optax.apply_updates``')."""
  target = round_ties_up(master, param.dtype)
  update = (target.astype(jnp.float32)
            - param.astype(jnp.float32)).astype(param.dtype)
  applied = (param.astype(jnp.float32)
             + update.astype(jnp.float32)).astype(param.dtype)
  return update, applied


def fingerprint_terms(param: jax.Array, position: jax.Array) -> jax.Array:
  """Each element's uint32 share of its block's fingerprint (a wrapping
  sum over the block), ``position`` its place in the block (uint32)."""
  return (_bits(param) + 1) * (_FINGERPRINT_MULTIPLIER * (2 * position + 1))


def fingerprints(param: jax.Array) -> jax.Array:
  """The uint32 fingerprint of each block of ``BLOCK_SIZE`` elements."""
  flat = jnp.ravel(param)
  n = flat.shape[0]
  blocks = -(-n // BLOCK_SIZE)
  position = (jnp.arange(blocks * BLOCK_SIZE, dtype=jnp.uint32)
              % BLOCK_SIZE)
  terms = fingerprint_terms(jnp.pad(flat, (0, blocks * BLOCK_SIZE - n)),
                            position)
  live = jnp.arange(blocks * BLOCK_SIZE) < n
  terms = jnp.where(live, terms, jnp.uint32(0))
  return jnp.sum(terms.reshape(blocks, BLOCK_SIZE), axis=1, dtype=jnp.uint32)


def valid_corrections(param: jax.Array, correction: jax.Array,
                      saved: jax.Array) -> jax.Array:
  """``correction`` with the blocks whose fingerprint is not ``saved``
  zeroed: those parameters changed since the correction was written."""
  n = correction.shape[0]
  same = fingerprints(param) == saved
  keep = jnp.repeat(same, BLOCK_SIZE)[:n]
  return jnp.where(keep, correction, jnp.zeros_like(correction))
