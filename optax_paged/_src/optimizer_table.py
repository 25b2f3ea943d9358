"""The optimizer table, as the compiled extension defines it.

``OPTAX_PAGED_OPTIMIZERS`` in ``ffi/optimizer_math.h`` is the one list of
optimizers: it generates the CPU and CUDA handlers, their FFI targets and
the table read here (FFI target, number of moments, which moments use the
signed map, the names of the hyperparameter slots). Python takes all of it
from the extension, so nothing about an optimizer is written twice.
"""

import functools
from typing import NamedTuple

from optax_paged._src import base
from optax_paged._src import ffi


class OptimizerInfo(NamedTuple):
  """One row of the table."""

  name: str
  target: str
  num_moments: int
  # Which moments use the signed map (first moments) or the unsigned one.
  signed: tuple[bool, ...]
  # Names of the hyperparameter slots, in the order the kernel reads them.
  slots: tuple[str, ...]
  # Whether its kernels are built for 4-bit states.
  four_bit: bool
  # Whether its signed 4-bit codes are rounded stochastically.
  stochastic_four_bit: bool


@functools.cache
def table() -> dict[str, OptimizerInfo]:
  return {
      name: OptimizerInfo(
          name=name, target=row['target'], num_moments=int(row['num_moments']),
          signed=tuple(bool(s) for s in row['signed']),
          slots=tuple(str(s) for s in row['slots']),
          four_bit=bool(row['four_bit']),
          stochastic_four_bit=bool(row['stochastic_four_bit']))
      for name, row in ffi.extension().optimizer_table().items()
  }


def info(name: str) -> OptimizerInfo:
  """The row of optimizer ``name``; a clear error for a stale build."""
  try:
    return table()[name]
  except KeyError:
    raise ImportError(
        f'optax_paged: the compiled extension has no optimizer {name!r} '
        f'(it has {sorted(table())}); rebuild the package.'
    ) from None


def _check_extension() -> None:
  """Refuses an extension built from other sources than this Python code."""
  extension = ffi.extension()
  if extension.BLOCK_SIZE != base.BLOCK_SIZE:
    raise ImportError(
        f'optax_paged: the compiled extension quantizes blocks of '
        f'{extension.BLOCK_SIZE}, Python expects {base.BLOCK_SIZE}; rebuild '
        'the package.')
  for row in table().values():
    if (len(row.signed) != row.num_moments
        or not 1 <= row.num_moments <= extension.MAX_MOMENTS
        or len(row.slots) > extension.SEED_INDEX
        or len(set(row.slots)) != len(row.slots)):
      raise ImportError(f'optax_paged: malformed optimizer table row {row}.')


_check_extension()
