"""The dynamic maps' decode and encode for TPU kernels, without wide gathers.

A TPU has no fast gather from a table in memory, but it gathers within one
vector register: ``jnp.take_along_axis`` over 128 lanes lowers to Mosaic's
``tpu.dynamic_gather``. Every table here is therefore split into rows of 128
entries, and each lookup is one lane gather per row plus a select:

- decode: ``values[code]`` is two 128-lane gathers (codes below and above
  128) and one select;
- encode: the code is the number of midpoints below ``|x|`` (what the CPU's
  ``Encode`` in ``ffi/quantization.h`` computes with its bit-bucket table),
  found by a branchless binary search whose probes are lane gathers: 7 for
  the signed map, 8 for the unsigned one, instead of 127 or 255 comparisons
  of a compare-and-count.

The signed map is symmetric except for its entry 1.0: its negative side's
127 midpoints are the first 127 of the positive side's 128 (the same
float32 sums, negated), so one 128-entry table serves both sides and a
negative value's count is clipped to 127.

These functions are plain ``jax.numpy`` and run inside a Pallas TPU kernel
(lane-dense operands, last dimension a multiple of 128) or anywhere else;
``tests/tpu_codec_test.py`` proves them equal to the CPU codec on every code
and on both sides of every midpoint.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import quantization

LANES = 128


@functools.cache
def tables(signed: bool) -> tuple[np.ndarray, np.ndarray]:
  """(values as float32[2, 128], midpoints as float32[rows, 128]).

  ``values[h, l]`` is map entry ``128 h + l``. The midpoints are the
  ascending magnitudes the encoder counts: for the signed map the 128 of
  its positive side; for the unsigned map its 255, padded with infinity.
  """
  t = quantization.tables(signed)
  values = t.values.reshape(2, LANES)
  mids = t.positive
  rows = -(-mids.size // LANES)
  padded = np.full(rows * LANES, np.inf, np.float32)
  padded[:mids.size] = mids
  return values, padded.reshape(rows, LANES)


def _lookup(table_row: jax.Array, index: jax.Array) -> jax.Array:
  """``table_row[index]`` for a float32[1, 128] row and int32 indices in
  [0, 128) shaped (rows, 128 k): one lane gather per 128-lane slice."""
  rows, width = index.shape
  row = jnp.broadcast_to(table_row, (rows, LANES))
  parts = [jnp.take_along_axis(row, index[:, i:i + LANES], axis=1)
           for i in range(0, width, LANES)]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def decode(codes: jax.Array, values: jax.Array) -> jax.Array:
  """Map entries of codes (int32, shape (rows, 128 k)); ``values`` is
  ``tables(signed)[0]`` as an array."""
  low = _lookup(values[0:1], codes & (LANES - 1))
  high = _lookup(values[1:2], codes & (LANES - 1))
  return jnp.where(codes >= LANES, high, low)


def _count_below(magnitude: jax.Array, row: jax.Array) -> jax.Array:
  """Number of entries of a sorted float32[1, 128] row below each value
  (0 to 128): a branchless binary search, one lane gather a probe."""
  position = jnp.where(row[0, 63] < magnitude, 64, 0)
  for step in (32, 16, 8, 4, 2, 1):
    probe = _lookup(row, position + (step - 1))
    position = jnp.where(probe < magnitude, position + step, position)
  last = _lookup(row, jnp.minimum(position, LANES - 1))
  return position + jnp.where((position < LANES) & (last < magnitude), 1, 0)


def encode(scaled: jax.Array, midpoints: jax.Array, signed: bool) -> jax.Array:
  """Codes (int32) of the map entries nearest to scaled float32 values, as
  the CPU kernel's ``Encode``: ties to the smaller magnitude, NaN to the
  zero code, the sign taken from the sign bit (-0.0 is on the negative
  side, where it counts no midpoint)."""
  bits = jax.lax.bitcast_convert_type(scaled, jnp.int32)
  negative = bits < 0
  magnitude = jnp.abs(scaled)
  if signed:
    count = _count_below(magnitude, midpoints[0:1])
    zero = quantization.tables(True).zero_code
    codes = jnp.where(negative, zero - jnp.minimum(count, LANES - 1),
                      zero + count)
  else:
    low = _count_below(magnitude, midpoints[0:1])
    high = _count_below(magnitude, midpoints[1:2])
    count = jnp.where(low == LANES, LANES + high, low)
    codes = jnp.where(negative, 0, count)
  zero = quantization.tables(signed).zero_code
  return jnp.where(jnp.isnan(scaled), zero, codes)


def inverse_scale(absmax: jax.Array) -> jax.Array:
  """``InverseScale`` of ffi/quantization.h: 1 / absmax for a normal finite
  absmax, else 0 (the block decodes to zero, or to NaN with a NaN absmax)."""
  f32 = np.finfo(np.float32)
  finite_positive = (absmax >= f32.tiny) & (absmax <= f32.max)
  return jnp.where(finite_positive, 1.0 / jnp.where(finite_positive, absmax,
                                                    1.0), 0.0)
