"""The optax_paged algorithms in plain ``jax.numpy``: the test oracle.

Each function here computes what the FFI kernels compute, operation for
operation in float32, with the quantized moments held as ordinary arrays in
a functional optax state (:class:`ReferenceState`). The transformations
below are also a portable fallback: they run wherever JAX runs (any backend,
sharded, vmapped), at the cost of XLA's unfused memory traffic.

``adamw8bit`` is :func:`optax_paged.adamw8bit`'s reference;
``reference_transformation(spec(name, ...))`` that of any family of the
optimizer table (``'adamw'``, ``'lion'``, ``'ademamix'``, ``'sgd'``, ...).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from optax_paged import reference
  >>> params = {'w': jnp.ones((64, 64))}
  >>> tx = reference.adamw8bit(1e-3)
  >>> state = tx.init(params)  # the codes and absmax are leaves
  >>> state.moments['w'][0].codes.shape, state.moments['w'][0].absmax.shape
  ((4096,), (16,))
  >>> vmapped = jax.vmap(tx.update, in_axes=(0, None, None))
  >>> grads = jnp.ones((3, 64, 64)) * jnp.arange(1., 4.)[:, None, None]
  >>> updates, _ = vmapped({'w': grads}, state, params)
  >>> updates['w'].shape
  (3, 64, 64)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_paged._src import base
from optax_paged._src import families
from optax_paged._src import hyperparams
from optax_paged._src import master_weights
from optax_paged._src import optimizer_table
from optax_paged._src import quantization
from optax_paged._src import transform
from optax_paged._src import trust_ratio

__all__ = [
    'adamw8bit',
    'reference_transformation',
    'spec',
    'ReferenceState',
    'QuantizedMoment',
    'FourBitMoment',
    'MasterCorrection',
]


class QuantizedMoment(NamedTuple):
  """One blockwise-quantized moment of one leaf."""

  codes: jax.Array  # shape=(n,), dtype=uint8
  absmax: jax.Array  # shape=(ceil(n / 256),), dtype=float32


class FourBitMoment(NamedTuple):
  """One moment of one leaf in 4-bit codes, one code a uint8 (unpacked)."""

  codes: jax.Array  # shape=(n,), dtype=uint8, values 0..15
  absmax: jax.Array  # shape=(ceil(n / 128),), dtype=float32


class MasterCorrection(NamedTuple):
  """One leaf's master-weight correction (``master_weights``)."""

  correction: jax.Array  # shape=(n,), dtype=int8 or int16
  fingerprints: jax.Array  # shape=(ceil(n / 128),), dtype=uint32


class ReferenceState(NamedTuple):
  """Functional state: per leaf, a tuple of moments (quantized or fp32)
  and, with master weights, its correction (None where it keeps none)."""

  count: jax.Array  # shape=(), dtype=jnp.int32
  moments: Any  # tree like params; each leaf a tuple of moments
  masters: Any = None  # tree like params; each leaf a MasterCorrection


def init_master(leaf: jax.Array,
                master_weight_bits: int | None) -> MasterCorrection | None:
  """A leaf's zero correction, or None if it keeps none."""
  bits = master_weights.correction_bits(master_weight_bits, leaf.dtype)
  if not bits:
    return None
  n = int(jnp.size(leaf))
  blocks = -(-n // master_weights.BLOCK_SIZE)
  return MasterCorrection(
      jnp.zeros([n], jnp.int8 if bits == 8 else jnp.int16),
      jnp.zeros([blocks], jnp.uint32))


def init_moments(leaf: jax.Array, num_moments: int, quantized: bool,
                 initial_values=(), signed=(), code_bits: int = 8):
  """Initial moments for one leaf, in the registry's format."""
  n = int(jnp.size(leaf))
  values = tuple(initial_values) or (0.0,) * num_moments
  out = []
  for m in range(num_moments):
    full = jnp.full([n], values[m], jnp.float32)
    if quantized:
      is_signed = signed[m] if signed else m == 0
      kind = FourBitMoment if code_bits == 4 else QuantizedMoment
      out.append(kind(*quantization.quantize_blockwise(
          full, is_signed, code_bits)))
    else:
      out.append(full)
  return tuple(out)


def decode_moments(moments, signed: tuple[bool, ...]) -> list[jax.Array]:
  out = []
  for moment, is_signed in zip(moments, signed, strict=True):
    if isinstance(moment, FourBitMoment):
      out.append(quantization.dequantize_blockwise(
          moment.codes, moment.absmax, is_signed, code_bits=4))
    elif isinstance(moment, QuantizedMoment):
      out.append(
          quantization.dequantize_blockwise(
              moment.codes, moment.absmax, is_signed
          )
      )
    else:
      out.append(moment)
  return out


def encode_moments(values, like, signed: tuple[bool, ...], random=None):
  """Moments in ``like``'s formats; ``random`` rounds signed 4-bit codes."""
  out = []
  for value, moment, is_signed in zip(values, like, signed, strict=True):
    if isinstance(moment, FourBitMoment):
      out.append(FourBitMoment(*quantization.quantize_blockwise(
          value, is_signed, code_bits=4,
          random=random if is_signed else None)))
    elif isinstance(moment, QuantizedMoment):
      out.append(
          QuantizedMoment(*quantization.quantize_blockwise(value, is_signed))
      )
    else:
      out.append(value)
  return tuple(out)


# Element update: (slots by name, g, p, decay, moments) -> (update, new
# moments); the family table holds one per kernel.
ElementUpdate = Callable[..., tuple[jax.Array, list[jax.Array]]]


def leaf_step(
    element_update: ElementUpdate,
    signed: tuple[bool, ...],
    slots: dict[str, jax.Array],
    grad: jax.Array,
    param: jax.Array,
    moments,
    decay: bool,
    random: jax.Array | None = None,
    master: MasterCorrection | None = None,
):
  """One step of one leaf: decode, update in fp32, re-encode.

  ``random`` (uint32 per element) rounds signed 4-bit codes stochastically.
  With ``master`` the update is of the master weights; returns (update,
  moments, new master correction or None).
  """
  g = jnp.ravel(grad).astype(param.dtype).astype(jnp.float32)
  flat = jnp.ravel(param)
  if master is None:
    p = flat.astype(jnp.float32)
  else:
    bits = 8 * master.correction.dtype.itemsize
    correction = master_weights.valid_corrections(
        flat, master.correction, master.fingerprints)
    p = master_weights.decode(flat, correction, bits)
  update, values = element_update(
      slots, g, p, decay, decode_moments(moments, signed)
  )
  new_master = None
  if master is None:
    update = update.astype(param.dtype)
  else:
    target = p + update
    update, applied = master_weights.step_to_master(flat, target)
    new_master = MasterCorrection(
        master_weights.encode(target, applied, bits).astype(
            master.correction.dtype),
        master_weights.fingerprints(applied))
  return (update.reshape(param.shape),
          encode_moments(values, moments, signed, random), new_master)


def spec(name: str, learning_rate: base.ScalarOrSchedule,
         **arguments: Any) -> transform.OptimizerSpec:
  """The optimizer ``reference_transformation`` computes.

  Args:
    name: a family of the optimizer table: ``'adamw'``, ``'adam'``,
      ``'lion'``, ``'ademamix'``, ``'sgd'``, ``'rmsprop'``, ``'adagrad'``,
      ``'adabelief'``, ``'lamb'`` or ``'lars'``.
    learning_rate: a scalar or an optax schedule of the step count.
    **arguments: the family's factory arguments (``b1``, ``weight_decay``,
      ...); those not given take the factories' defaults.

  Returns:
    What its factories build from these arguments.

  Example:
    >>> from optax_paged import reference
    >>> lion = reference.spec('lion', 1e-4, weight_decay=1e-2)
    >>> lion.num_moments
    1
  """
  return families.spec(name, learning_rate, **arguments)


def reference_transformation(
    spec: transform.OptimizerSpec,
    *,
    quantize: bool = True,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    weight_decay_mask: Any = None,
    code_bits: int = 8,
    master_weight_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """A functional optax transformation computing what the kernels compute.

  Args:
    spec: the optimizer, as :func:`spec` builds it.
    quantize: ``False`` keeps every moment in fp32.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    weight_decay_mask: as the optimizers' ``mask``.
    code_bits: bits of a quantized moment's codes, 8 or 4.
    master_weight_bits: None, or 24 or 32 for the master weights of 16-bit
      parameters, as the optimizers' option.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a functional state.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> from optax_paged import reference
    >>> params = {'w': jnp.linspace(-1., 1., 8192)}
    >>> grads = {'w': jnp.full(8192, 0.1)}
    >>> ref = reference.reference_transformation(reference.spec('lion', 1e-3))
    >>> ref_updates, _ = ref.update(grads, ref.init(params), params)
    >>> tx = optax_paged.lion8bit(1e-3)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> bool(jnp.allclose(updates['w'], ref_updates['w'], rtol=1e-6, atol=0))
    True
  """
  master_weights.check_bits('master_weight_bits', master_weight_bits)
  if master_weight_bits is not None and spec.trust_ratio is not None:
    raise ValueError('master_weight_bits is not available with a trust ratio.')
  element_update = families.reference_update(spec.kernel)
  signed = spec.signed
  stochastic = code_bits == 4 and optimizer_table.info(
      spec.kernel).stochastic_four_bit

  def init_fn(params):
    return ReferenceState(
        count=jnp.zeros([], jnp.int32),
        moments=jax.tree.map(
            lambda p: init_moments(
                p,
                spec.num_moments,
                quantize and jnp.size(p) >= min_8bit_size,
                spec.initial_values,
                spec.signed,
                code_bits,
            ),
            params,
        ),
        masters=jax.tree.map(
            lambda p: init_master(p, master_weight_bits), params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    count_inc = optax.safe_increment(state.count)
    # Jitted even when the update runs eagerly: the kernels get the vector
    # from a jitted step, and XLA rounds b ** count differently op by op.
    slots = hyperparams.unpack(
        spec.kernel, jax.jit(spec.hyperparams)(state.count, count_inc))
    decay = transform.resolve_mask(weight_decay_mask, params)
    grads, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)
    moment_leaves = treedef.flatten_up_to(state.moments)
    trust = spec.trust_ratio
    scaled = (transform.resolve_mask(trust.mask, params)
              if trust is not None else None)
    if trust is not None and trust.before_kernel:
      grads = trust_ratio.scale_gradients(trust, grads, param_leaves, decay,
                                          scaled, state.count)
    # A trust ratio scales the kernel's float32 input or output before the
    # update is rounded.
    as_computed = ((lambda x: x.astype(jnp.float32))
                   if trust is not None else (lambda x: x))
    # The kernels' random bits: leaf i of the state, the incremented count.
    randoms = [
        quantization.state_rounding_bits(count_inc, i, jnp.size(p))
        if stochastic else None
        for i, p in enumerate(param_leaves)
    ]
    master_leaves = (treedef.flatten_up_to(state.masters)
                     if state.masters is not None
                     else [None] * len(param_leaves))
    results = [
        leaf_step(element_update, signed, slots, as_computed(g),
                  as_computed(p), m, d, r, master)
        for g, p, m, d, r, master in zip(
            grads, param_leaves, moment_leaves, decay, randoms,
            master_leaves, strict=True
        )
    ]
    outputs = [r[0] for r in results]
    if trust is not None and trust.before_kernel:
      outputs = [u.astype(p.dtype)
                 for u, p in zip(outputs, param_leaves, strict=True)]
    elif trust is not None:
      outputs = trust_ratio.apply(trust, outputs, param_leaves, decay, scaled,
                                  state.count)
    new_updates = treedef.unflatten(outputs)
    new_moments = treedef.unflatten([r[1] for r in results])
    new_masters = (treedef.unflatten([r[2] for r in results])
                   if state.masters is not None else None)
    return new_updates, ReferenceState(count=count_inc, moments=new_moments,
                                       masters=new_masters)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamw8bit(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    min_8bit_size: int = base.MIN_8BIT_SIZE,
    quantize: bool = True,
    eps_root: float = 0.0,
    nesterov: bool = False,
    code_bits: int = 8,
    master_weight_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Pure-JAX :func:`optax_paged.adamw8bit` with a functional state.

  Args:
    learning_rate: a scalar or an optax schedule of the step count.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator for numerical stability.
    weight_decay: decoupled weight decay strength, a scalar or a schedule
      of the step count.
    mask: which parameters get weight decay, as ``optax.adamw``'s ``mask``.
    min_8bit_size: leaves with fewer elements keep fp32 state.
    quantize: ``False`` keeps every moment in fp32.
    eps_root: added inside the square root, as ``optax.adamw``'s.
    nesterov: Nesterov momentum, as ``optax.adamw``'s.
    code_bits: 4 for :func:`optax_paged.adamw4bit`'s 4-bit moments.
    master_weight_bits: None, 24 or 32, as the optimizers' option.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state holds the codes
    and absmax arrays as leaves.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optax_paged import reference
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = reference.adamw8bit(1e-3, weight_decay=0.01)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.full((64, 64), 0.1)}, state,
    ...                            params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(state.count)
    1
  """

  spec = families.spec('adamw', learning_rate, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay, eps_root=eps_root,
                       nesterov=nesterov)
  return reference_transformation(
      spec,
      quantize=quantize,
      min_8bit_size=min_8bit_size,
      weight_decay_mask=mask,
      code_bits=code_bits,
      master_weight_bits=master_weight_bits,
  )
