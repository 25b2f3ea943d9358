"""The dynamic tree quantization map of bitsandbytes, built in NumPy.

The map is the code book of the 8-bit optimizer states: 256 float32 values,
sorted, with a dense logarithmic spread near zero. The construction follows
bitsandbytes' ``create_dynamic_map`` (Dettmers, 2016) operation by operation,
including the float32 rounding of ``torch.linspace`` (a fused multiply-add from
the nearer end), so the values are bit-identical to the ones bitsandbytes uses.
"""

import numpy as np

_F32 = np.float32


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=float32)`` bit for bit.

  PyTorch's CPU kernel computes the first half as ``start + step * i`` and the
  second half as ``end - step * (steps - 1 - i)``, each as one fused
  multiply-add rounded once to float32.
  """
  start32, end32 = _F32(start), _F32(end)
  step = (end32 - start32) / _F32(steps - 1)
  out = np.empty(steps, dtype=_F32)
  for i in range(steps):
    if i < steps // 2:
      exact = np.float64(start32) + np.float64(step) * i
    else:
      exact = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    out[i] = _F32(exact)
  return out


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
  """Builds bitsandbytes' dynamic tree quantization map.

  Args:
    signed: whether the map covers [-1, 1] (first moments) or [0, 1] (second
      moments).
    max_exponent_bits: the number of decades the map spans.
    total_bits: bits of a code (1 to 8); the map's non-zero values fill
      ``2 ** total_bits`` entries at most.

  Returns:
    A sorted float32 array of 256 values, identical to
    ``bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits,
    total_bits)``: like bitsandbytes, maps of fewer than 8 bits are padded
    with zeros to 256 entries (and so sort their padding among the
    values).

  Example:
    >>> from optax_paged.quantization import create_dynamic_map
    >>> create_dynamic_map(signed=False)[-1]
    np.float32(1.0)
  """
  if not 1 <= total_bits <= 8:
    raise ValueError(f'create_dynamic_map: total_bits must be in [1, 8], got '
                     f'{total_bits}.')
  if not 1 <= max_exponent_bits <= total_bits - 1:
    raise ValueError(
        'create_dynamic_map: max_exponent_bits must be in [1, total_bits - 1]'
        f', got {max_exponent_bits} for {total_bits} bits.'
    )
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  data: list[float] = []

  def add_decade(decade: int, fraction_items: int) -> None:
    boundaries = _torch_linspace_f32(0.1, 1.0, fraction_items)
    means = (boundaries[:-1] + boundaries[1:]) / _F32(2.0)
    scale = _F32(10.0 ** (-(max_exponent_bits - 1) + decade))
    data.extend((scale * means).tolist())
    if signed:
      data.extend((-scale * means).tolist())

  for i in range(max_exponent_bits):
    extra = 0 if signed else 1
    add_decade(i, 2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1)
  if additional_items > 0:
    add_decade(max_exponent_bits - 1, additional_items + 1)
  data.extend([0.0, 1.0])
  data.extend([0.0] * (256 - len(data)))
  return np.sort(np.asarray(data, dtype=_F32))


def four_bit_signed_map() -> np.ndarray:
  """The 16-entry map of 4-bit first moments.

  torchao's ``AdamW4bit`` map (Li et al., 2023): bitsandbytes'
  ``create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)``
  without its zero padding to 256 entries. Seven negative entries, zero and
  eight positive ones up to 1.

  Returns:
    A sorted float32 array of 16 values.
  """
  padded = create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
  nonzero = padded[padded != 0]
  return np.sort(np.append(nonzero, _F32(0.0))).astype(_F32)


def four_bit_unsigned_map() -> np.ndarray:
  """The 16-entry map of 4-bit second moments: ``1/16, 2/16, ..., 1``.

  Linear and without zero (Li et al., 2023; torchao's ``AdamW4bit``): a
  second moment is never decoded as zero, so ``m / sqrt(v)`` cannot blow up
  where a small ``v`` shares a block with a large one (the zero-point
  problem).

  Returns:
    A sorted float32 array of 16 values.
  """
  return (np.arange(1, 17, dtype=_F32) / _F32(16.0)).astype(_F32)
