"""The TPU path's functional state: codes and absmax as ordinary JAX arrays.

TPUs have no managed memory and no user custom calls, so on a TPU the
state is not in the registry: every moment of a large leaf is a
``TpuMoment`` (uint8 codes, float32 absmax), every moment of a small one a
float32 array of the leaf's shape, all leaves of the optimizer state. They
shard like the parameters, move to host memory (``pinned_host``) by their
sharding's memory kind, and checkpoint with any pytree checkpointer or with
``optax_paged.state_dict`` in the format of the GPU and CPU states.

Layout of a quantized moment (``tpu_kernel`` says why):

- native, for a leaf of two or more dimensions whose last ``B`` is a
  multiple of 256: codes of the leaf's shape, absmax of shape
  ``shape[:-2] + (B // 256, shape[-2])`` (per row of ``B`` elements,
  ``B / 256`` blocks; transposed so that it is lane-dense);
- flat, for any other leaf: the leaf flattened and padded with zeros to
  rows of 2048 (codes ``(rows, 2048)``, absmax ``(8, rows)``).

4-bit moments (``code_bits=4``, blocks of 128) keep the same view with the
codes packed two a byte (``tpu_codec4``): in each group of 256 elements of
a row, element ``j`` in the low nibble and ``j + 128`` in the high nibble of
byte ``j``, so the codes are ``shape[:-1] + (B // 2,)`` (or ``(rows,
1024)``), and the absmax holds a row a block of 128: ``shape[:-2] + (B //
128, M)`` (or ``(16, rows)``). ``to_flat`` and ``from_flat`` convert to and
from the registry's flat bytes (element ``2i`` in the low nibble of byte
``i``) exactly. A flat leaf's padding is written as the code of zero by
``from_flat`` and left out of its block's maximum by the kernel.

With master weights (``master_weights``) a bfloat16 or float16 leaf also
keeps a ``TpuMaster``: its correction (int8 or int16) laid out as 8-bit
codes (one an element, whatever the moments' bits),
the fingerprints of its blocks of 128 parameters laid out as the absmax
(``shape[:-2] + (B // 128, M)``, or ``(16, rows)`` flat), and the count of
blocks whose correction was dropped, which the TPU path carries from a
checkpoint and does not add to. A leaf with float32 moments keeps the
registry's flat fingerprints and a correction of its own shape. The
fingerprints are the registry's uint32 bits held as int32: Mosaic reduces
signed integers only, and a bitcast outside the kernel would be a copy.
"""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged._src import base
from optax_paged._src import master_weights
from optax_paged._src import quantization
from optax_paged._src import tpu_codec4

BLOCK = base.BLOCK_SIZE
FLAT_LANES = 2048
FINGERPRINT = master_weights.BLOCK_SIZE
CODE_BITS = (8, 4)


def block(code_bits: int) -> int:
  """Elements a quantization block holds: 256 (8-bit) or 128 (4-bit)."""
  return base.block_size(code_bits)


class TpuMoment(NamedTuple):
  """One blockwise 8-bit or 4-bit moment of one leaf, in the TPU layout."""

  codes: jax.Array  # uint8, the leaf's shape or (rows, 2048); 4-bit: B // 2
  absmax: jax.Array  # float32, (..., B // block, M) or (2048 // block, rows)


class TpuMaster(NamedTuple):
  """One 16-bit leaf's master-weight correction, in the TPU layout."""

  correction: jax.Array  # int8 or int16, laid out as the codes
  fingerprints: jax.Array  # int32 (uint32 bits), laid out as the absmax
  resets: jax.Array  # uint32[], blocks whose correction was dropped


@jax.tree_util.register_pytree_with_keys_class
class TpuLeafState:
  """The moments of one leaf and its master-weight correction (None
  without one), with static data: the leaf's shape, the tier of its state
  (``'device'`` or ``'host'``: ``pinned_host`` memory), the parameter's
  ``NamedSharding`` on a mesh (None off a mesh), which the state's arrays
  follow, and the bits of its quantized moments' codes (8 or 4)."""

  def __init__(self, moments: tuple[Any, ...], shape: tuple[int, ...],
               tier: str = 'device',
               sharding: jax.sharding.NamedSharding | None = None,
               master: TpuMaster | None = None, code_bits: int = 8):
    self.moments = tuple(moments)
    self.shape = tuple(shape)
    self.tier = tier
    self.sharding = sharding
    self.master = master
    self.code_bits = code_bits

  def tree_flatten_with_keys(self):
    return ([(jax.tree_util.GetAttrKey('moments'), self.moments),
             (jax.tree_util.GetAttrKey('master'), self.master)],
            (self.shape, self.tier, self.sharding, self.code_bits))

  @classmethod
  def tree_unflatten(cls, aux, children):
    shape, tier, sharding, code_bits = aux
    return cls(children[0], shape, tier, sharding, children[1], code_bits)

  def replace(self, **changes: Any) -> TpuLeafState:
    fields = {'moments': self.moments, 'shape': self.shape,
              'tier': self.tier, 'sharding': self.sharding,
              'master': self.master, 'code_bits': self.code_bits, **changes}
    return TpuLeafState(**fields)

  def with_moments(self, moments: tuple[Any, ...]) -> TpuLeafState:
    return self.replace(moments=moments)

  @property
  def quantized(self) -> bool:
    return bool(self.moments) and isinstance(self.moments[0], TpuMoment)

  def __repr__(self) -> str:
    master = '' if self.master is None else f', master={self.master!r}'
    return (f'TpuLeafState(shape={self.shape}, tier={self.tier!r}, '
            f'moments={self.moments!r}{master})')


@jax.tree_util.register_pytree_with_keys_class
class TpuState:
  """State of an optax_paged optimizer on the TPU path.

  Attributes:
    count: number of updates applied so far, shape ``()``, int32.
    leaves: a tree like the parameters; each leaf a ``TpuLeafState``.
    optimizer: the optimizer its states belong to (``'adamw'``, ...).
    signed: per moment, whether it uses the signed map.
    code_bits: bits of the quantized moments' codes, 8 or 4.
  """

  def __init__(self, count: Any, leaves: Any, optimizer: str,
               signed: tuple[bool, ...], code_bits: int = 8):
    self.count = count
    self.leaves = leaves
    self.optimizer = optimizer
    self.signed = tuple(signed)
    self.code_bits = code_bits

  def tree_flatten_with_keys(self):
    return ([(jax.tree_util.GetAttrKey('count'), self.count),
             (jax.tree_util.GetAttrKey('leaves'), self.leaves)],
            (self.optimizer, self.signed, self.code_bits))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], children[1], *aux)

  def replace(self, **changes: Any) -> TpuState:
    fields = {'count': self.count, 'leaves': self.leaves,
              'optimizer': self.optimizer, 'signed': self.signed,
              'code_bits': self.code_bits, **changes}
    return TpuState(**fields)

  def __repr__(self) -> str:
    return (f'TpuState(optimizer={self.optimizer!r}, count={self.count!r}, '
            f'leaves={self.leaves!r})')


def is_leaf_state(x: Any) -> bool:
  return isinstance(x, TpuLeafState)


def is_native(shape: tuple[int, ...]) -> bool:
  """Whether a leaf's moments use the native layout (no flattening)."""
  return len(shape) >= 2 and shape[-1] % BLOCK == 0


def view(shape: tuple[int, ...]) -> tuple[int, int, int]:
  """The kernel's (L, M, B) view of a leaf."""
  if is_native(shape):
    return math.prod(shape[:-2]), shape[-2], shape[-1]
  return 1, -(-math.prod(shape) // FLAT_LANES), FLAT_LANES


def moment_shapes(shape: tuple[int, ...], code_bits: int = 8
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(codes shape, absmax shape) of a quantized moment of a leaf."""
  per_byte = 8 // code_bits
  size = block(code_bits)
  if is_native(shape):
    return (shape[:-1] + (shape[-1] // per_byte,),
            shape[:-2] + (shape[-1] // size, shape[-2]))
  rows = view(shape)[1]
  return (rows, FLAT_LANES // per_byte), (FLAT_LANES // size, rows)


def element_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of a quantized leaf's per-element arrays (a master's
  correction): the leaf's (native) or ``(rows, 2048)`` (flat)."""
  return moment_shapes(shape)[0]


def fill_code(signed: bool, code_bits: int) -> int:
  """The code of zero, which a flat leaf's padding holds."""
  if code_bits == 4:
    return 7 if signed else 0
  return quantization.tables(signed).zero_code


def kernel_view(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A parameter-shaped array as the kernel's (L, M, B) view."""
  lead, rows, lanes = view(shape)
  if is_native(shape):
    return x.reshape(lead, rows, lanes)
  flat = x.reshape(-1)
  return jnp.pad(flat, (0, rows * lanes - flat.size)).reshape(1, rows, lanes)


def from_kernel_view(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if is_native(shape):
    return x.reshape(shape)
  return x.reshape(-1)[:math.prod(shape)].reshape(shape)


def moment_view(moment: TpuMoment, shape: tuple[int, ...],
                code_bits: int = 8) -> TpuMoment:
  lead, rows, lanes = view(shape)
  return TpuMoment(
      moment.codes.reshape(lead, rows, lanes * code_bits // 8),
      moment.absmax.reshape(lead, lanes // block(code_bits), rows))


def moment_from_view(moment: TpuMoment, shape: tuple[int, ...],
                     code_bits: int = 8) -> TpuMoment:
  codes_shape, absmax_shape = moment_shapes(shape, code_bits)
  return TpuMoment(moment.codes.reshape(codes_shape),
                   moment.absmax.reshape(absmax_shape))


def to_flat(moment: TpuMoment, shape: tuple[int, ...], code_bits: int = 8
            ) -> tuple[np.ndarray, np.ndarray]:
  """The (codes, absmax) of the GPU/CPU format: flat, block order (4-bit
  codes packed two a byte, element ``2i`` in the low nibble)."""
  n = math.prod(shape)
  if code_bits == 4:
    codes = quantization.pack_nibbles(
        tpu_codec4.to_registry_order(np.asarray(moment.codes), n))
  else:
    codes = np.asarray(moment.codes).reshape(-1)[:n]
  absmax = np.swapaxes(np.asarray(moment.absmax), -1, -2).reshape(-1)
  return codes, absmax[:-(-n // block(code_bits))]


def from_flat(codes: np.ndarray, absmax: np.ndarray, shape: tuple[int, ...],
              signed: bool, code_bits: int = 8) -> TpuMoment:
  """A TPU-layout moment from flat codes and absmax (NumPy)."""
  codes_shape, absmax_shape = moment_shapes(shape, code_bits)
  fill = fill_code(signed, code_bits)
  if code_bits == 4:
    elements = quantization.unpack_nibbles(np.asarray(codes, np.uint8),
                                           math.prod(shape))
    padded = np.full(2 * math.prod(codes_shape), fill, np.uint8)
    padded[:elements.size] = elements
    padded = tpu_codec4.from_registry_order(padded, fill)
  else:
    padded = np.full(math.prod(codes_shape), fill, np.uint8)
    padded[:codes.size] = codes
  blocks = np.zeros(math.prod(absmax_shape), np.float32)
  blocks[:absmax.size] = absmax
  swapped = absmax_shape[:-2] + (absmax_shape[-1], absmax_shape[-2])
  return TpuMoment(padded.reshape(codes_shape),
                   np.swapaxes(blocks.reshape(swapped), -1, -2))


def absmax_spec(spec: Any, ndim: int) -> Any:
  """The PartitionSpec of a native absmax for a leaf's spec: the last two
  dimensions' entries swapped (the block axis splits as the last does).
  A replicated spec stays replicated, whatever the leaf's rank: a flat
  leaf's absmax on a mesh is replicated, as its codes are."""
  entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  if not any(entries):
    return jax.sharding.PartitionSpec()
  return jax.sharding.PartitionSpec(*entries[:-2], entries[-1], entries[-2])


def fingerprint_shape(shape: tuple[int, ...], quantized: bool
                      ) -> tuple[int, ...]:
  """The shape of a leaf's master-weight fingerprints: the absmax's, a
  row a block of 128 (quantized), or the registry's flat one."""
  if not quantized:
    return (-(-math.prod(shape) // FINGERPRINT),)
  if is_native(shape):
    return shape[:-2] + (shape[-1] // FINGERPRINT, shape[-2])
  return FLAT_LANES // FINGERPRINT, view(shape)[1]


def master_view(correction: jax.Array, fingerprints: jax.Array,
                shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """A quantized leaf's (correction, fingerprints) in the kernel's view."""
  lead, rows, lanes = view(shape)
  return (correction.reshape(lead, rows, lanes),
          fingerprints.reshape(lead, lanes // FINGERPRINT, rows))


def master_from_view(correction: jax.Array, fingerprints: jax.Array,
                     shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  return (correction.reshape(element_shape(shape)),
          fingerprints.reshape(fingerprint_shape(shape, True)))


def master_to_flat(master: TpuMaster, shape: tuple[int, ...],
                   quantized: bool) -> tuple[np.ndarray, np.ndarray]:
  """(correction, fingerprints with the reset count last) in the GPU/CPU
  format: flat, block order."""
  n = math.prod(shape)
  correction = np.asarray(master.correction).reshape(-1)[:n]
  prints = np.asarray(master.fingerprints).view(np.uint32)
  if quantized:
    prints = np.swapaxes(prints, -1, -2)
  prints = prints.reshape(-1)[:-(-n // FINGERPRINT)]
  return correction, np.append(prints, np.asarray(master.resets, np.uint32))


def master_from_flat(correction: np.ndarray, fingerprints: np.ndarray,
                     shape: tuple[int, ...], quantized: bool) -> TpuMaster:
  """A TPU-layout master from the flat format's arrays (NumPy)."""
  if not quantized:
    return TpuMaster(correction.reshape(shape),
                     fingerprints[:-1].view(np.int32).copy(),
                     np.asarray(fingerprints[-1], np.uint32))
  codes_shape = element_shape(shape)
  padded = np.zeros(math.prod(codes_shape), correction.dtype)
  padded[:correction.size] = correction
  prints_shape = fingerprint_shape(shape, True)
  prints = np.zeros(math.prod(prints_shape), np.uint32)
  prints[:fingerprints.size - 1] = fingerprints[:-1]
  swapped = prints_shape[:-2] + (prints_shape[-1], prints_shape[-2])
  return TpuMaster(padded.reshape(codes_shape),
                   np.swapaxes(prints.view(np.int32).reshape(swapped), -1, -2),
                   np.asarray(fingerprints[-1], np.uint32))
