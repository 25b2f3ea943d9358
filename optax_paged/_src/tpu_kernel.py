"""The Pallas TPU kernel of a blockwise 8-bit optimizer step, one leaf a call.

A leaf is seen as ``(L, M, B)``: its last dimension ``B`` (a multiple of
256), its second-to-last ``M`` and the rest merged into ``L``, which is how
TPU memory already holds it ((8, 128) tiles over the last two dimensions),
so no relayout copy runs before the kernel. A quantization block is 256
consecutive elements of the flattened leaf, bitsandbytes' blocks (the CPU
and GPU kernels' codes, bit for bit): here a 256-lane segment of one row.
Leaves of another shape are flattened and padded to rows of 2048 first
(``tpu_layout``).

The codes have the leaf's view shape; the absmax of the blocks of rows
``M`` and lane groups ``K = B / 256`` is stored transposed, ``(L, K, M)``,
so that it is lane-dense (a ``(M, K)`` array would pad ``K`` to 128 lanes).

The grid walks tiles of 128 rows by 2048 lanes (one (8, 128) tile of
absmax). Inside a tile the absmax is transposed into a column scratch, and a
loop over chunks of 32 rows (the uint8 tile height) and 256-lane groups
decodes the moments, runs the family's element update in float32 (the
``jax.numpy`` function the reference uses), re-encodes with the new block
maxima (``tpu_codec``) and writes the update or the new parameter. The
moments' codes and absmax are updated in place (input/output aliases).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from optax_paged._src import base
from optax_paged._src import families
from optax_paged._src import optimizer_table
from optax_paged._src import tpu_codec

BLOCK = base.BLOCK_SIZE
TILE_ROWS = 128
TILE_LANES = 2048
CHUNK_ROWS = 32


def tile_shape(rows: int, lanes: int) -> tuple[int, int]:
  """The (rows, lanes) of one grid step's tile for a (rows, lanes) view."""
  return min(rows, TILE_ROWS), min(lanes, TILE_LANES)


def _chunk_rows(tile_rows: int) -> int:
  return CHUNK_ROWS if tile_rows % CHUNK_ROWS == 0 else tile_rows


def _eye(n: int) -> jax.Array:
  return (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
          == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))


def _columns(x: jax.Array) -> jax.Array:
  """The transpose of a float32 (groups, rows) tile, one masked lane
  reduction a group: exact (a sum of the value and zeros), and lowered by
  Mosaic for any shape."""
  eye = _eye(x.shape[1])
  return jnp.concatenate(
      [jnp.sum(jnp.where(eye, x[k:k + 1, :], 0.0), axis=1, keepdims=True)
       for k in range(x.shape[0])], axis=1)


def _rows(x: jax.Array) -> jax.Array:
  """The transpose of a float32 (rows, groups) tile (``_columns`` back)."""
  eye = _eye(x.shape[0])
  return jnp.concatenate(
      [jnp.sum(jnp.where(eye, x[:, k:k + 1], 0.0), axis=0, keepdims=True)
       for k in range(x.shape[1])], axis=0)


def _kernel(h_ref, g_ref, p_ref, *refs, kernel, decay, num_moments, signed,
            output_params, tile_rows, tile_lanes):
  codes_in = refs[0:2 * num_moments:2]
  absmax_in = refs[1:2 * num_moments:2]
  tables_ref = refs[2 * num_moments]
  out_ref = refs[2 * num_moments + 1]
  codes_out = refs[2 * num_moments + 2:4 * num_moments + 2:2]
  absmax_out = refs[2 * num_moments + 3:4 * num_moments + 2:2]
  columns_in = refs[4 * num_moments + 2]
  columns_out = refs[4 * num_moments + 3]
  groups = tile_lanes // BLOCK
  update_fn = families.reference_update(kernel)
  slots = optimizer_table.info(kernel).slots
  s = {name: h_ref[i] for i, name in enumerate(slots)}
  for m in range(num_moments):
    columns_in[m] = _columns(absmax_in[m][...])
  chunk = _chunk_rows(tile_rows)

  def body(c, carry):
    r0 = pl.multiple_of(c * chunk, chunk)
    rows = pl.ds(r0, chunk)
    for k in range(groups):
      lanes = pl.ds(k * BLOCK, BLOCK)
      p_raw = p_ref[rows, lanes]
      g = g_ref[rows, lanes].astype(p_raw.dtype).astype(jnp.float32)
      p = p_raw.astype(jnp.float32)
      moments = []
      for m in range(num_moments):
        codes = codes_in[m][rows, lanes].astype(jnp.int32)
        values = tables_ref[m, 0:2, :]
        scale = columns_in[m, rows, k:k + 1]
        moments.append(tpu_codec.decode(codes, values) * scale)
      update, new = update_fn(s, g, p, decay, moments)
      update = update.astype(p_raw.dtype)
      if output_params:
        out_ref[rows, lanes] = (
            p + update.astype(jnp.float32)).astype(p_raw.dtype)
      else:
        out_ref[rows, lanes] = update
      for m in range(num_moments):
        absmax = jnp.max(jnp.abs(new[m]), axis=1, keepdims=True)
        midpoints = tables_ref[m, 2:4, :]
        codes = tpu_codec.encode(new[m] * tpu_codec.inverse_scale(absmax),
                                 midpoints, signed[m])
        codes_out[m][rows, lanes] = codes.astype(jnp.uint8)
        columns_out[m, rows, k:k + 1] = absmax
    return carry

  jax.lax.fori_loop(0, tile_rows // chunk, body, 0)
  for m in range(num_moments):
    absmax_out[m][...] = _rows(columns_out[m])


@functools.cache
def code_tables(signed: tuple[bool, ...]) -> np.ndarray:
  """float32[moments, 4, 128]: each moment's map values (rows 0-1) and
  encoder midpoints (rows 2-3, the signed map's second row unused)."""
  out = np.full((len(signed), 4, tpu_codec.LANES), np.inf, np.float32)
  for m, is_signed in enumerate(signed):
    values, midpoints = tpu_codec.tables(is_signed)
    out[m, 0:2] = values
    out[m, 2:2 + midpoints.shape[0]] = midpoints
  return out


def leaf_step(kernel: str, hyperparams: jax.Array, grad: jax.Array,
              param: jax.Array, moments: list[tuple[jax.Array, jax.Array]],
              *, decay: bool, output_params: bool, interpret: bool
              ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
  """One step of one leaf in its (L, M, B) view.

  Args:
    kernel: the optimizer table's row (``'adamw'``, ``'lion'``).
    hyperparams: float32[16], the kernel's slots.
    grad, param: the leaf's (L, M, B) views.
    moments: per moment, (codes uint8[L, M, B], absmax float32[L, K, M]).
    decay: whether the leaf takes weight decay.
    output_params: return the new parameter instead of the update.
    interpret: run in Pallas' TPU interpreter (any backend).

  Returns:
    (update or new parameter, new moments).
  """
  info = optimizer_table.info(kernel)
  lead, rows, lanes = param.shape
  tile_rows, tile_lanes = tile_shape(rows, lanes)
  groups = tile_lanes // BLOCK
  grid = (lead, pl.cdiv(rows, tile_rows), pl.cdiv(lanes, tile_lanes))
  data = pl.BlockSpec((None, tile_rows, tile_lanes), lambda b, i, j: (b, i, j))
  scale = pl.BlockSpec((None, groups, tile_rows), lambda b, i, j: (b, j, i))
  num = info.num_moments
  tables = jnp.asarray(code_tables(info.signed))
  in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM), data, data]
  in_specs += [data, scale] * num
  in_specs.append(pl.BlockSpec(tables.shape, lambda b, i, j: (0, 0, 0)))
  out_shape = [jax.ShapeDtypeStruct(param.shape, param.dtype)]
  for codes, absmax in moments:
    out_shape += [jax.ShapeDtypeStruct(codes.shape, codes.dtype),
                  jax.ShapeDtypeStruct(absmax.shape, absmax.dtype)]
  # Operand 0 is the hyperparameters, 1 the gradient, 2 the parameter.
  aliases = {3 + i: 1 + i for i in range(2 * num)}
  if output_params:
    aliases[2] = 0
  body = functools.partial(
      _kernel, kernel=kernel, decay=decay, num_moments=num,
      signed=info.signed, output_params=output_params, tile_rows=tile_rows,
      tile_lanes=tile_lanes)
  bytes_accessed = sum(
      x.size * x.dtype.itemsize
      for x in (grad, param, param, *[a for pair in moments for a in pair],
                *[a for pair in moments for a in pair]))
  call = pl.pallas_call(
      body,
      grid=grid,
      in_specs=in_specs,
      out_specs=[data] + [data, scale] * num,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((num, tile_rows, groups), jnp.float32),
                      pltpu.VMEM((num, tile_rows, groups), jnp.float32)],
      # Pallas' interpreter (jax 0.10.2) returns an aliased output padded to
      # whole blocks; without aliases it returns the right shape.
      input_output_aliases={} if interpret else aliases,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel')),
      cost_estimate=pl.CostEstimate(
          flops=60 * param.size, transcendentals=param.size,
          bytes_accessed=bytes_accessed),
      interpret=pltpu.InterpretParams() if interpret else False,
  )
  operands = [hyperparams, grad, param]
  for codes, absmax in moments:
    operands += [codes, absmax]
  operands.append(tables)
  out = call(*operands)
  return out[0], [(out[1 + 2 * m], out[2 + 2 * m]) for m in range(num)]
