"""Loading the compiled extension and calling its FFI update targets.

The update is a JAX primitive lowered to the FFI custom call. Its rules make
the transformations JAX cannot apply to an in-place update fail loudly:
``jax.vmap`` (every batch member would update the same state) and
differentiation (the state update has no derivative).
"""

import functools
from collections.abc import Sequence

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
from jax.interpreters import partial_eval

from optax_paged import _optax_paged_ext
from optax_paged._src import cuda_support

# OutputMode of ffi/element_types.h, as the extension exports it.
OUTPUT_UPDATES, OUTPUT_PARAMS, OUTPUT_PARAMS_STOCHASTIC = (
    _optax_paged_ext.OUTPUT_MODES)

VMAP_MSG = (
    'optax_paged updates change optimizer state in place and cannot be '
    'vmapped: every batch member would update the same state. Apply the '
    'optimizer outside jax.vmap (average per-example gradients first).'
)
DIFFERENTIATION_MSG = (
    'optax_paged updates cannot be differentiated: they write optimizer '
    'state in place. Compute gradients first, then call tx.update outside '
    'jax.grad / jax.jvp.'
)


def extension():
  return _optax_paged_ext


def cuda_gpus() -> list[jax.Device]:
  """The CUDA GPUs JAX sees (none without a CUDA backend)."""
  try:
    return [d for d in jax.devices('gpu') if d.platform == 'gpu']
  except RuntimeError:
    return []


def has_cuda_backend() -> bool:
  """Whether JAX has a CUDA GPU and this build has the CUDA kernels."""
  return bool(_optax_paged_ext.WITH_CUDA) and bool(cuda_gpus())


def cuda_architectures() -> list[str] | None:
  """The CMAKE_CUDA_ARCHITECTURES entries the kernels were built for."""
  architectures = _optax_paged_ext.CUDA_ARCHITECTURES
  return architectures.split(',') if architectures else None


def gpu_missing(gpus: Sequence[jax.Device] | None = None) -> str | None:
  """What keeps this build from updating on ``gpus``, or None.

  Args:
    gpus: CUDA devices; JAX's (``cuda_gpus()``) when None.
  """
  if gpus is None:
    gpus = cuda_gpus()
  return cuda_support.gpu_missing(
      _optax_paged_ext.CPU_ONLY_REASON,
      cuda_architectures(),
      [(d.device_kind, getattr(d, 'compute_capability', None)) for d in gpus],
  )


@functools.cache
def register_targets() -> None:
  """Registers the FFI targets with JAX, once per process."""
  for name, capsule in _optax_paged_ext.cpu_registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform='cpu')
  if has_cuda_backend():
    for name, capsule in _optax_paged_ext.cuda_registrations().items():
      jax.ffi.register_ffi_target(name, capsule, platform='CUDA')


def refuse_vmap(*args, **kwargs):
  del args, kwargs
  raise ValueError(VMAP_MSG)


def refuse_jvp(*args, **kwargs):
  del args, kwargs
  raise ValueError(DIFFERENTIATION_MSG)


def _keep_always(used_outputs, eqn):
  # The call writes the optimizer state: it must run even when nobody reads
  # its results (jaxpr dead-code elimination would drop it otherwise).
  del used_outputs
  return [True] * len(eqn.invars), eqn


def _abstract_eval(hyperparams, position, *operands, target, state_id,
                   leaf_indices, output_mode):
  del hyperparams, target, state_id, leaf_indices, output_mode
  params = operands[len(operands) // 2:]
  return [*(jax.core.ShapedArray(p.shape, p.dtype) for p in params),
          jax.core.ShapedArray(position.shape, position.dtype)]


def _lowering(ctx, hyperparams, position, *operands, target, state_id,
              leaf_indices, output_mode):
  count = len(operands) // 2
  # Each result is written over an operand of its shape, so no new buffer is
  # needed: the fused step's over parameter i (operand 2 + count + i), the
  # update's over gradient i (operand 2 + i). Gradients computed in the same
  # jit are dead after the call and are reused in place, which saves a
  # parameter-sized buffer; XLA copies an operand that is still live or not
  # donated.
  first = 2 + count if output_mode != OUTPUT_UPDATES else 2
  aliases = {first + i: i for i in range(count)}
  # The last result, the receipt, is the position operand's buffer, which
  # the handler never writes: a result of the call that is not a leaf's.
  aliases[1] = count
  rule = jax.ffi.ffi_lowering(
      target, has_side_effect=True, operand_output_aliases=aliases
  )
  return rule(
      ctx,
      hyperparams,
      position,
      *operands,
      state_id=np.int64(state_id),
      leaf_indices=np.asarray(leaf_indices, dtype=np.int64),
      output_mode=np.int64(output_mode),
  )


# The update as a primitive of its own rather than jax.ffi.ffi_call: XLA
# still sees a side-effecting custom call (never dropped, merged or
# reordered against its data), but JAX sees no effect, so a jitted step keeps
# JAX's C++ dispatch path (an effect sends every call through Python, about
# 10 ms per step for 300 arrays).
update_p = jax_core.Primitive('optax_paged_update')
update_p.multiple_results = True
update_p.def_abstract_eval(_abstract_eval)
@functools.lru_cache(maxsize=256)
def _jitted_update(**params):
  return jax.jit(functools.partial(update_p.bind, **params))


def _eager_update(*operands, **params):
  # An eager call (tx.update outside jax.jit) runs the primitive compiled,
  # as JAX runs its own primitives; one compiled call per set of params.
  # Under jax.disable_jit the jitted call would bind the primitive again,
  # eagerly, without end: as JAX's own apply_primitive, jit is re-enabled.
  with jax.disable_jit(False):
    return _jitted_update(**params)(*operands)


update_p.def_impl(_eager_update)
mlir.register_lowering(update_p, _lowering)
batching.primitive_batchers[update_p] = refuse_vmap
ad.primitive_jvps[update_p] = refuse_jvp
partial_eval.dce_rules[update_p] = _keep_always


def update_call(
    target: str,
    hyperparams: jax.Array,
    position: jax.Array,
    grads: Sequence[jax.Array],
    params: Sequence[jax.Array],
    *,
    state_id: int,
    leaf_indices: Sequence[int],
    output_mode: int = 0,
) -> tuple[list[jax.Array], jax.Array]:
  """Runs one in-place update over the leaves of one dtype group.

  Args:
    target: FFI target name, e.g. ``'optax_paged_adamw'``.
    hyperparams: float32 vector built by ``hyperparams``.
    position: int32 scalar, the device's linear position in the mesh the
      state was made for (0 on one device); the handler refuses a call whose
      position differs from its entry's.
    grads: the group's gradients, in the parameters' dtype.
    params: the group's parameters.
    state_id: the state's id in the registry; each device's handler finds
      its own entry of the state by it.
    leaf_indices: positions of these leaves in the registry entry.
    output_mode: ``OUTPUT_UPDATES`` for the updates, ``OUTPUT_PARAMS`` for
      the new parameters, ``OUTPUT_PARAMS_STOCHASTIC`` for new parameters
      rounded stochastically (bf16).

  Returns:
    One array per leaf (the update, or the new parameter), and the receipt:
    an int32 zero computed from a result, to add to the new count (see
    ``_receipt``).
  """
  register_targets()
  if len(grads) != len(params):
    raise ValueError('update_call: one gradient per parameter')
  # XLA:GPU may hand a custom call a dynamic slice of a larger buffer
  # (dynamic-slice fusion, e.g. gradients stacked for lax.scan), and then
  # the handler read the wrong rows (seen with jax 0.11.2 on an H100). The
  # barrier makes XLA materialise every operand as a buffer of its own.
  grads, params = jax.lax.optimization_barrier((list(grads), list(params)))
  outputs = update_p.bind(
      jnp.asarray(hyperparams, jnp.float32),
      jnp.asarray(position, jnp.int32).reshape([1]),
      *grads,
      *params,
      target=target,
      state_id=int(state_id),
      leaf_indices=tuple(int(i) for i in leaf_indices),
      output_mode=int(output_mode),
  )
  return list(outputs[:-1]), _receipt(outputs[-1])


def _receipt(result: jax.Array) -> jax.Array:
  """An int32 zero computed from the call's receipt result.

  The caller adds it to the new count, which it always keeps, so that the
  count depends on the call. JAX drops a shard_map, nested jit or cond none
  of whose results is used, whatever primitives it holds (the dce rule above
  reaches only a call at the top level of a jaxpr): without this, a step
  whose updates are discarded (``jax.jit(lambda s: tx.update(g, s, p)[1])``)
  advanced the count on a mesh while the kernel never ran. Read from a
  result of the call, it also makes the count ready only once the kernel
  has run, so waiting for a state, as ``release`` and exports do, waits for
  its step. The receipt is a result of its own, not an element of a leaf's:
  reading a leaf's result, which is written over a donated gradient or
  parameter, made XLA copy that operand first. A bit count is never
  negative, and XLA does not fold its minimum with 0.
  """
  bits = result.reshape(-1)[0]
  return jnp.minimum(jax.lax.population_count(bits), 0).astype(jnp.int32)
