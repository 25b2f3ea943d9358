"""Loading the compiled extension and calling its FFI update targets.

The update call is wrapped so that the transformations JAX cannot apply to an
in-place update fail loudly: ``jax.vmap`` (every batch member would update the
same state) and differentiation (the state update has no derivative).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from optax_paged import _optax_paged_ext

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


def has_cuda_backend() -> bool:
  """Whether JAX has a CUDA GPU and this build has the CUDA kernels."""
  if not _optax_paged_ext.WITH_CUDA:
    return False
  try:
    return any(d.platform == 'gpu' for d in jax.devices('gpu'))
  except RuntimeError:
    return False


@functools.cache
def register_targets() -> None:
  """Registers the FFI targets with JAX, once per process."""
  for name, capsule in _optax_paged_ext.cpu_registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform='cpu')
  if has_cuda_backend():
    for name, capsule in _optax_paged_ext.cuda_registrations().items():
      jax.ffi.register_ffi_target(name, capsule, platform='CUDA')


def _guarded(call):
  """Wraps ``call`` so vmap and differentiation raise clear errors."""

  @jax.custom_jvp
  def guarded(*operands):
    return unbatchable(*operands)

  @custom_vmap
  def unbatchable(*operands):
    return call(*operands)

  @unbatchable.def_vmap
  def _refuse_vmap(axis_size, in_batched, *operands):
    del axis_size, in_batched, operands
    raise ValueError(VMAP_MSG)

  @guarded.defjvp
  def _refuse_jvp(primals, tangents):
    del primals, tangents
    raise ValueError(DIFFERENTIATION_MSG)

  return guarded


def update_call(
    target: str,
    hyperparams: jax.Array,
    grads: Sequence[jax.Array],
    params: Sequence[jax.Array],
    *,
    state_id: int,
    leaf_indices: Sequence[int],
    apply_updates: bool = False,
) -> list[jax.Array]:
  """Runs one in-place update over the leaves of one dtype group.

  Args:
    target: FFI target name, e.g. ``'optax_paged_adamw'``.
    hyperparams: float32 vector built by ``hyperparams``.
    grads: the group's gradients, in the parameters' dtype.
    params: the group's parameters.
    state_id: the registry entry holding the moments.
    leaf_indices: positions of these leaves in the registry entry.
    apply_updates: return new parameters instead of updates.

  Returns:
    One array per leaf: the update, or the new parameter.
  """
  register_targets()
  result_types = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
  count = len(grads)
  # The fused step writes the new parameters over the old ones: operand
  # 1 + count + i (parameter i) aliases result i, so donated parameters are
  # updated in place (XLA copies them first when they are not donated).
  aliases = (
      {1 + count + i: i for i in range(count)} if apply_updates else None
  )
  call = jax.ffi.ffi_call(
      target,
      result_types,
      has_side_effect=True,
      vmap_method='sequential',  # never reached: the guard refuses vmap
      input_output_aliases=aliases,
  )

  def run(hyper, *operands):
    return call(
        hyper,
        *operands,
        state_id=np.int64(state_id),
        leaf_indices=np.asarray(leaf_indices, dtype=np.int64),
        apply_updates=bool(apply_updates),
    )

  # XLA:GPU may hand a custom call a dynamic slice of a larger buffer
  # (dynamic-slice fusion, e.g. gradients stacked for lax.scan), and then
  # the handler read the wrong rows (seen with jax 0.11.2 on an H100). The
  # barrier makes XLA materialise every operand as a buffer of its own.
  grads, params = jax.lax.optimization_barrier((list(grads), list(params)))
  outputs = _guarded(run)(
      jnp.asarray(hyperparams, jnp.float32), *grads, *params
  )
  if len(outputs) != count:
    raise AssertionError('FFI call returned the wrong number of results')
  return list(outputs)
