"""The Pallas TPU kernel of a blockwise 8-bit or 4-bit optimizer step, one
leaf a call.

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
4-bit states (blocks of 128) keep the same view with the codes packed two a
byte, ``(L, M, B / 2)``: in each 256-lane group, lane ``j``'s code in the
low nibble and lane ``j + 128``'s in the high nibble of byte ``j``
(``tpu_codec4``), so a group's two blocks unpack into two whole vector
registers; their absmax is ``(L, B / 128, M)``. Lion's 4-bit codes are
rounded stochastically from each element's index in the leaf (an SMEM
operand gives the leaf's key and where each view row starts). The fused
step's ``stochastic_rounding`` rounds the new bfloat16 parameters with the
registry's random bits (``tpu_rounding``) from the same indices and the
leaf's parameter key in the same operand.

The grid walks tiles of 128 rows by 2048 lanes (one (8, 128) tile of
absmax). Inside a tile the absmax is transposed into a column scratch, and a
loop over chunks of 32 rows (the uint8 tile height) and 256-lane groups
decodes the moments, runs the family's element update in float32 (the
``jax.numpy`` function the reference uses), re-encodes with the new block
maxima (``tpu_codec``) and writes the update or the new parameter. The
moments' codes and absmax are updated in place (input/output aliases).

With master weights (bfloat16 or float16 parameters, ``master_weight_bits``)
the kernel also takes the leaf's correction (int8 or int16, the view's
shape) and the fingerprints of its blocks of 128 parameters (int32, stored
transposed as the absmax is: ``(L, B / 128, M)``), both aliased in place.
In the same pass it fingerprints each 128-lane half-group of the incoming
parameters, drops the corrections of a half-group whose fingerprint is not
the saved one (parameters changed outside the optimizer), reconstructs the
float32 master, updates it, writes the master's rounding (ties up) or the
update to it, the new correction and the new parameters' fingerprints.
The element maths is ``master_weights``' ``jax.numpy`` functions, which
Mosaic lowers as they are for bfloat16 (libtpu 0.0.42.1 has no float16
vectors: float16 runs in the interpreter only); the fingerprint's wrapping
sum is an int32 lane reduction (Mosaic has no unsigned reductions; the bits
are the same).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from optax_paged._src import base
from optax_paged._src import families
from optax_paged._src import master_weights
from optax_paged._src import optimizer_table
from optax_paged._src import tpu_codec
from optax_paged._src import tpu_codec4
from optax_paged._src import tpu_rounding

BLOCK = base.BLOCK_SIZE
LANES = tpu_codec.LANES
TILE_ROWS = 128
TILE_LANES = 2048
CHUNK_ROWS = 32
# Parameters per master-weight fingerprint: half a quantization block.
FINGERPRINT = master_weights.BLOCK_SIZE


def tile_shape(rows: int, lanes: int) -> tuple[int, int]:
  """The (rows, lanes) of one grid step's tile for a (rows, lanes) view."""
  return min(rows, TILE_ROWS), min(lanes, TILE_LANES)


def _chunk_rows(tile_rows: int) -> int:
  return CHUNK_ROWS if tile_rows % CHUNK_ROWS == 0 else tile_rows


def _eye(n: int) -> jax.Array:
  return (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
          == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))


def _columns(x: jax.Array) -> jax.Array:
  """The transpose of a float32 or int32 (groups, rows) tile, one masked
  lane reduction a group: exact (a sum of the value and zeros), and lowered
  by Mosaic for any shape."""
  eye = _eye(x.shape[1])
  return jnp.concatenate(
      [jnp.sum(jnp.where(eye, x[k:k + 1, :], 0), axis=1, keepdims=True)
       for k in range(x.shape[0])], axis=1)


def _rows(x: jax.Array) -> jax.Array:
  """The transpose of a (rows, groups) tile (``_columns`` back)."""
  eye = _eye(x.shape[0])
  return jnp.concatenate(
      [jnp.sum(jnp.where(eye, x[:, k:k + 1], 0), axis=0, keepdims=True)
       for k in range(x.shape[1])], axis=0)


def _fingerprints(param: jax.Array, live: jax.Array | None) -> jax.Array:
  """int32[rows, 2]: the fingerprints of the two 128-lane halves of a
  (rows, 256) group of parameters (``master_weights.fingerprints``' wrapping
  sums; ``live`` masks a flat leaf's padding)."""
  position = jax.lax.broadcasted_iota(jnp.uint32, param.shape, 1) % FINGERPRINT
  terms = master_weights.fingerprint_terms(param, position)
  if live is not None:
    terms = jnp.where(live, terms, jnp.uint32(0))
  terms = jax.lax.bitcast_convert_type(terms, jnp.int32)
  return jnp.concatenate(
      [jnp.sum(terms[:, h * FINGERPRINT:(h + 1) * FINGERPRINT], axis=1,
               keepdims=True) for h in range(BLOCK // FINGERPRINT)], axis=1)


def _load(codes_ref, columns, tables_ref, m, rows, k, code_bits, signed):
  """Moment m's float32 values in group k (256 lanes) of a chunk of rows."""
  if code_bits == 8:
    codes = codes_ref[rows, pl.ds(k * BLOCK, BLOCK)].astype(jnp.int32)
    return tpu_codec.decode(codes, tables_ref[m, 0:2, :]) * (
        columns[m, rows, k:k + 1])
  # 4-bit: the group's two blocks are the bytes' low and high nibbles.
  halves = tpu_codec4.unpack(codes_ref[rows, pl.ds(k * LANES, LANES)])
  values = tables_ref[m, 0:1, :]
  return jnp.concatenate(
      [tpu_codec4.decode(codes, values, signed)
       * columns[m, rows, 2 * k + h:2 * k + h + 1]
       for h, codes in enumerate(halves)], axis=1)


def _store(new, codes_ref, columns, tables_ref, m, rows, k, code_bits,
           signed, random):
  """Encodes moment m's new values of group k with their blocks' maxima
  (``random``: int32 bits rounding signed 4-bit codes, or None)."""
  if code_bits == 8:
    absmax = jnp.max(jnp.abs(new), axis=1, keepdims=True)
    codes = tpu_codec.encode(new * tpu_codec.inverse_scale(absmax),
                             tables_ref[m, 2:4, :], signed)
    codes_ref[rows, pl.ds(k * BLOCK, BLOCK)] = codes.astype(jnp.uint8)
    columns[m, rows, k:k + 1] = absmax
    return
  halves = []
  for h in range(2):
    part = new[:, h * LANES:(h + 1) * LANES]
    absmax = jnp.max(jnp.abs(part), axis=1, keepdims=True)
    scaled = part * tpu_codec.inverse_scale(absmax)
    if random is None:
      halves.append(tpu_codec4.encode(scaled, signed))
    else:
      halves.append(tpu_codec4.encode_stochastic(
          scaled, random[:, h * LANES:(h + 1) * LANES], tables_ref[m, 0:1, :]))
    columns[m, rows, 2 * k + h:2 * k + h + 1] = absmax
  codes_ref[rows, pl.ds(k * LANES, LANES)] = tpu_codec4.pack(
      *halves).astype(jnp.uint8)


def _kernel(h_ref, *refs, kernel, decay, num_moments, signed, output_params,
            tile_rows, tile_lanes, correction_bits, size, code_bits,
            stochastic, round_params):
  refs = iter(refs)
  rounding_ref = next(refs) if stochastic or round_params else None
  g_ref, p_ref = next(refs), next(refs)
  moments_in = [(next(refs), next(refs)) for _ in range(num_moments)]
  if correction_bits:
    correction_in, fingerprints_in = next(refs), next(refs)
  tables_ref = next(refs)
  out_ref = next(refs)
  moments_out = [(next(refs), next(refs)) for _ in range(num_moments)]
  if correction_bits:
    correction_out, fingerprints_out = next(refs), next(refs)
  columns_in, columns_out = next(refs), next(refs)
  if correction_bits:
    prints_in, prints_out = next(refs), next(refs)
    prints_in[...] = _columns(fingerprints_in[...])
  groups = tile_lanes // BLOCK
  halves = BLOCK // FINGERPRINT
  update_fn = families.reference_update(kernel)
  slots = optimizer_table.info(kernel).slots
  s = {name: h_ref[i] for i, name in enumerate(slots)}
  for m in range(num_moments):
    columns_in[m] = _columns(moments_in[m][1][...])
  chunk = _chunk_rows(tile_rows)

  def body(c, carry):
    r0 = pl.multiple_of(c * chunk, chunk)
    rows = pl.ds(r0, chunk)
    if size is not None or stochastic or round_params:
      row = (pl.program_id(1) * tile_rows + r0
             + jax.lax.broadcasted_iota(jnp.int32, (chunk, BLOCK), 0))
      lane = jax.lax.broadcasted_iota(jnp.int32, (chunk, BLOCK), 1)
    if size is not None:
      # A flat leaf (rows one tile wide): the element's index in the leaf.
      index = row * tile_lanes + lane
    if stochastic or round_params:
      # The element's index in the whole leaf (int32 bits of the uint32
      # index), for its random bits: rounding_ref holds the leaf's key, the
      # leaf's row stride, its parameter key (two words) and each of the
      # view's L the index of its first element.
      start = (rounding_ref[4 + pl.program_id(0)]
               + pl.program_id(2) * tile_lanes)
      element = start + row * rounding_ref[1] + lane
    for k in range(groups):
      lanes = pl.ds(k * BLOCK, BLOCK)
      p_raw = p_ref[rows, lanes]
      g = g_ref[rows, lanes].astype(p_raw.dtype).astype(jnp.float32)
      moments = [_load(moments_in[m][0], columns_in, tables_ref, m, rows, k,
                       code_bits, signed[m]) for m in range(num_moments)]
      if correction_bits:
        # Padding has no share in its block's fingerprint.
        live = None if size is None else index + k * BLOCK < size
        # Each lane's fingerprint, new and saved, compared as int32 (Mosaic
        # does not broadcast booleans).
        first = jax.lax.broadcasted_iota(jnp.int32, p_raw.shape, 1) < (
            FINGERPRINT)
        found = _fingerprints(p_raw, live)
        saved = prints_in[rows, halves * k:halves * (k + 1)]
        correction = jnp.where(
            jnp.where(first, found[:, 0:1], found[:, 1:2])
            == jnp.where(first, saved[:, 0:1], saved[:, 1:2]),
            correction_in[rows, lanes].astype(jnp.int32), 0)
        p = master_weights.decode(p_raw, correction, correction_bits)
      else:
        p = p_raw.astype(jnp.float32)
      update, new = update_fn(s, g, p, decay, moments)
      if correction_bits:
        master = p + update
        update, param = master_weights.step_to_master(p_raw, master)
        correction_out[rows, lanes] = master_weights.encode(
            master, param, correction_bits).astype(correction_out.dtype)
        prints_out[rows, halves * k:halves * (k + 1)] = _fingerprints(
            param, live)
      elif round_params:
        param = tpu_rounding.new_param(
            p, update, p_raw.dtype,
            tpu_rounding.bits(rounding_ref[2], rounding_ref[3],
                              element + k * BLOCK))
      else:
        update = update.astype(p_raw.dtype)
        param = (p + update.astype(jnp.float32)).astype(
            p_raw.dtype) if output_params else None
      out_ref[rows, lanes] = param if output_params else update
      random = None
      if stochastic:
        random = tpu_codec4.mix32((element + k * BLOCK) ^ rounding_ref[0])
      for m in range(num_moments):
        value = new[m]
        if code_bits == 4 and size is not None:
          # A flat leaf's padding out of its block's maximum, as the
          # registry's shorter last block: the unsigned map has no zero.
          value = jnp.where(index + k * BLOCK < size, value, 0.0)
        _store(value, moments_out[m][0], columns_out, tables_ref, m, rows, k,
               code_bits, signed[m], random if signed[m] else None)
    return carry

  jax.lax.fori_loop(0, tile_rows // chunk, body, 0)
  for m in range(num_moments):
    moments_out[m][1][...] = _rows(columns_out[m])
  if correction_bits:
    fingerprints_out[...] = _rows(prints_out[...])


@functools.cache
def code_tables(signed: tuple[bool, ...], code_bits: int = 8) -> np.ndarray:
  """float32[moments, 4, 128]: each moment's map values (rows 0-1) and
  encoder midpoints (rows 2-3, the signed map's second row unused); 4-bit:
  the signed map's 16 values in row 0 (the rest unused)."""
  out = np.full((len(signed), 4, tpu_codec.LANES), np.inf, np.float32)
  if code_bits == 4:
    out[:, 0:1] = tpu_codec4.signed_values()
    return out
  for m, is_signed in enumerate(signed):
    values, midpoints = tpu_codec.tables(is_signed)
    out[m, 0:2] = values
    out[m, 2:2 + midpoints.shape[0]] = midpoints
  return out


def leaf_step(kernel: str, hyperparams: jax.Array, grad: jax.Array,
              param: jax.Array, moments: list[tuple[jax.Array, jax.Array]],
              *, decay: bool, output_params: bool, interpret: bool,
              master: tuple[jax.Array, jax.Array] | None = None,
              size: int | None = None, code_bits: int = 8,
              rounding: jax.Array | None = None,
              round_params: bool = False,
              ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]],
                         tuple[jax.Array, jax.Array] | None]:
  """One step of one leaf in its (L, M, B) view.

  Args:
    kernel: the optimizer table's row (``'adamw'``, ``'lion'``).
    hyperparams: float32[16], the kernel's slots.
    grad, param: the leaf's (L, M, B) views.
    moments: per moment, (codes uint8[L, M, B], absmax float32[L, K, M]),
      ``K = B / 256``; 4-bit: (codes uint8[L, M, B / 2], absmax
      float32[L, B / 128, M]), ``tpu_codec4``'s nibbles.
    decay: whether the leaf takes weight decay.
    output_params: return the new parameter instead of the update.
    interpret: run in Pallas' TPU interpreter (any backend).
    master: with master weights, (correction int8 or int16[L, M, B],
      fingerprints int32[L, B / 128, M]); the parameter is 16-bit.
    size: the elements of a flat leaf (its view is padded past them), None
      for a native one.
    code_bits: the moments' codes, 8 or 4.
    rounding: for stochastic 4-bit codes (Lion's) or parameters, int32[4 +
      L]: the leaf's ``StateRoundingKey`` bits, the leaf's row stride (its
      last dimension), its parameter key (``tpu_rounding.leaf_key``) and
      per L the index in the leaf of the view's element (L, 0, 0); None for
      codes and parameters rounded to nearest.
    round_params: write the new parameters rounded as the registry's
      stochastic output mode (``output_params`` and ``rounding`` too).

  Returns:
    (update or new parameter, new moments, new master or None).
  """
  info = optimizer_table.info(kernel)
  lead, rows, lanes = param.shape
  tile_rows, tile_lanes = tile_shape(rows, lanes)
  if size is not None and tile_lanes != lanes:
    raise ValueError(f'a flat leaf is one tile wide, got {lanes} lanes.')
  blocks = tile_lanes // base.block_size(code_bits)
  grid = (lead, pl.cdiv(rows, tile_rows), pl.cdiv(lanes, tile_lanes))
  data = pl.BlockSpec((None, tile_rows, tile_lanes), lambda b, i, j: (b, i, j))
  codes = pl.BlockSpec((None, tile_rows, tile_lanes * code_bits // 8),
                       lambda b, i, j: (b, i, j))
  scale = pl.BlockSpec((None, blocks, tile_rows), lambda b, i, j: (b, j, i))
  prints = pl.BlockSpec((None, tile_lanes // FINGERPRINT, tile_rows),
                        lambda b, i, j: (b, j, i))
  num = info.num_moments
  tables = jnp.asarray(code_tables(info.signed, code_bits))
  state = [a for pair in moments for a in pair]
  state_specs = [codes, scale] * num
  correction_bits = 0
  if master is not None:
    state += list(master)
    state_specs += [data, prints]
    correction_bits = 8 * master[0].dtype.itemsize
  if round_params and (rounding is None or not output_params
                       or master is not None):
    raise ValueError('round_params: the new parameters (output_params) '
                     'without master weights, with a rounding operand.')
  has_rounding = rounding is not None
  # As the registry's kernels: Lion's 4-bit momentum rounds stochastically.
  stochastic = has_rounding and code_bits == 4 and info.stochastic_four_bit
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  in_specs = [smem, *[smem] * has_rounding, data, data, *state_specs,
              pl.BlockSpec(tables.shape, lambda b, i, j: (0, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct(param.shape, param.dtype)] + [
      jax.ShapeDtypeStruct(a.shape, a.dtype) for a in state]
  # Operand 0 is the hyperparameters, then the rounding operand if any,
  # the gradient and the parameter.
  param_operand = 2 + has_rounding
  aliases = {param_operand + 1 + i: 1 + i for i in range(len(state))}
  if output_params:
    aliases[param_operand] = 0
  scratch = [pltpu.VMEM((num, tile_rows, blocks), jnp.float32),
             pltpu.VMEM((num, tile_rows, blocks), jnp.float32)]
  if master is not None:
    scratch += [pltpu.VMEM((tile_rows, tile_lanes // FINGERPRINT), jnp.int32)
                ] * 2
  body = functools.partial(
      _kernel, kernel=kernel, decay=decay, num_moments=num,
      signed=info.signed, output_params=output_params, tile_rows=tile_rows,
      tile_lanes=tile_lanes, correction_bits=correction_bits, size=size,
      code_bits=code_bits, stochastic=stochastic, round_params=round_params)
  bytes_accessed = sum(x.size * x.dtype.itemsize
                       for x in (grad, param, param, *state, *state))
  call = pl.pallas_call(
      body,
      grid=grid,
      in_specs=in_specs,
      out_specs=[data] + state_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      # Pallas' interpreter (jax 0.10.2) returns an aliased output padded to
      # whole blocks; without aliases it returns the right shape.
      input_output_aliases={} if interpret else aliases,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel')),
      cost_estimate=pl.CostEstimate(
          flops=(60 + 40 * (master is not None)) * param.size,
          transcendentals=param.size, bytes_accessed=bytes_accessed),
      interpret=pltpu.InterpretParams() if interpret else False,
  )
  streamed = [grad, param, *state]
  if not interpret:
    # The kernel streams these through VMEM tile by tile. Left free, XLA's
    # memory-space assignment stages the ones that fit into VMEM whole
    # around the call (copy-start/copy-done): the same HBM bytes, but
    # copies the cost analysis counts on top of the kernel's accesses, and
    # VMEM held that the rest of a training step could use.
    streamed = [pltpu.with_memory_space_constraint(x, pltpu.HBM)
                for x in streamed]
  out = call(hyperparams, *([rounding] if has_rounding else []), *streamed,
             tables)
  new_moments = [(out[1 + 2 * m], out[2 + 2 * m]) for m in range(num)]
  new_master = (None if master is None
                else (out[1 + 2 * num], out[2 + 2 * num]))
  return out[0], new_moments, new_master
