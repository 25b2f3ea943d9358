"""The machinery every optax_paged optimizer shares.

An optimizer here is: a name, an FFI target, a number of moments, and a
function from (hyperparameters, step) to the hyperparameter vector. This
module turns that into an ``optax.GradientTransformationExtraArgs`` whose
state is ``(count, buffers)``, and runs one FFI call per dtype group.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
import optax

from optax_paged._src import base
from optax_paged._src import ffi
from optax_paged._src import hyperparam_checks
from optax_paged._src import hyperparams as hyperparams_lib
from optax_paged._src import optimizer_table
from optax_paged._src import paging
from optax_paged._src import registry
from optax_paged._src import sharding
from optax_paged._src import spmd
from optax_paged._src import state_io
from optax_paged._src import trust_ratio as trust_ratio_lib


class _OptimizerStateFields(NamedTuple):
  count: jax.Array  # shape=(), dtype=jnp.int32
  buffers: registry.StateBuffers


class OptimizerState(_OptimizerStateFields):
  """State of an optax_paged optimizer.

  Attributes:
    count: number of updates applied so far, shape ``()``, int32.
    buffers: the registry-owned moments (quantized or fp32).

  Building one (as pytree unflattening does) with a positive ``count`` on
  buffers that no step and no load ever wrote raises: that is a state whose
  count a checkpointer restored without its moments (Orbax on a raw train
  state), which would otherwise train on silently from zeroed moments.

  Example:
    >>> import jax, jax.numpy as jnp, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax_paged.adamw8bit(1e-3)
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params)
    >>> int(state.count)
    1
    >>> jax.tree.leaves(state)  # the moments are in the registry, not leaves
    [Array(1, dtype=int32)]
  """

  __slots__ = ()

  def __new__(cls, count: Any, buffers: registry.StateBuffers):
    _refuse_count_without_moments(count, buffers)
    registry.note_count(buffers, count)
    return super().__new__(cls, count, buffers)

  def __copy__(self) -> OptimizerState:
    return OptimizerState._make(self)  # shares the buffers

  def __deepcopy__(self, memo: dict[int, Any]) -> OptimizerState:
    del memo
    return state_io.copy_state(self)

  def __reduce__(self) -> tuple[Any, ...]:
    return state_io.reduce_state(self)


# Its name before 0.2 ("paged" now means managed memory only): pickles
# written then name the class by it.
PagedOptimizerState = OptimizerState


RESTORED_WITHOUT_MOMENTS_MSG = (
    'optax_paged: this optimizer state is being rebuilt with step count {} '
    'on buffers that no step and no load ever wrote: a checkpointer restored '
    'its count without its moments (Orbax\'s StandardCheckpointer or '
    'CheckpointManager given a raw train state saves only the count). '
    'Training on would start from zeroed moments. Save and restore with '
    'flax.serialization.to_state_dict / from_state_dict around Orbax, or '
    'optax_paged.state_dict / load_state_dict (docs/checkpoints.md).'
)


def _refuse_count_without_moments(count: Any, buffers: Any) -> None:
  record = getattr(buffers, '_record', None)
  if record is None or record.released or not (
      record.adopt_count or not record.touched):
    return
  if base.is_tracer(count) or not isinstance(
      count, (jax.Array, np.ndarray, np.integer, int)):
    return
  value = np.asarray(jax.device_get(count))
  if value.shape != ():
    return
  if record.adopt_count:
    record.adopt_count = False
    record.set_moments_step(int(value))
  elif value > 0:
    # A step compiled for an earlier state of this state id (state_ids)
    # runs without tracing, so it never sets ``touched``: the stamps tell.
    if record.moments_step() == 0:
      raise ValueError(RESTORED_WITHOUT_MOMENTS_MSG.format(int(value)))
    record.touched = True


# (count before the step, count after it) -> float32[16]
HyperparamFn = Callable[[jax.Array, jax.Array], jax.Array]


class OptimizerSpec(NamedTuple):
  """What distinguishes one optimizer of the family from another.

  Its FFI target, moments and maps come from the optimizer table's row
  ``kernel``; its states belong to ``name``: LAMB runs AdamW's kernel, yet
  its states are LAMB's, refused by AdamW's update and its checkpoints.
  """

  name: str
  # (count before the step, count after it) -> hyperparameter vector.
  hyperparams: HyperparamFn
  # The optimizer table's row whose kernel runs the step.
  kernel: str
  # Value every element of each moment starts from (Adagrad's accumulator);
  # read at init only, so an injected (traced) one does not stop an update.
  initial_values: tuple[Any, ...] = ()
  # Per-tensor trust ratio around the kernel (LAMB, LARS); the hyperparameter
  # vector then carries learning rate 1 and no decoupled decay.
  trust_ratio: trust_ratio_lib.TrustRatio | None = None

  @property
  def target(self) -> str:
    return optimizer_table.info(self.kernel).target

  @property
  def num_moments(self) -> int:
    return optimizer_table.info(self.kernel).num_moments

  @property
  def signed(self) -> tuple[bool, ...]:
    return optimizer_table.info(self.kernel).signed


# update_fn of every optax_paged transformation -> its spec, so that
# apply_gradients can run the fused step of a transformation it is handed.
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# update_fn -> init taking a ZeRO-1 axis, for shard_state_over.
_INITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# update_fn -> fused step of a transformation not built here (the TPU
# path's), which apply_gradients runs instead of run_step.
FUSED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_mask(mask: Any, params: Any, default: bool = True) -> list[bool]:
  """Per-leaf booleans from an optax-style mask (tree, prefix or callable)."""
  leaves = jax.tree.leaves(params)
  if mask is None:
    return [default] * len(leaves)
  tree = mask(params) if callable(mask) else mask
  full = jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: bool(m), sub), tree, params
  )
  flags = jax.tree.leaves(full)
  if len(flags) != len(leaves):
    raise ValueError(
        'mask must have the structure of the parameters (or a prefix of it).'
    )
  return flags


def make_transformation(
    spec: OptimizerSpec,
    *,
    quantize: bool,
    min_8bit_size: int,
    weight_decay_mask: Any,
    paged: bool,
    device_budget: Any = None,
    keep_32bit: Any = None,
    code_bits: int = 8,
    master_weight_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optax transformation for ``spec``.

  ``code_bits`` (8 or 4) is the width of the quantized moments' codes;
  ``master_weight_bits`` (None, 24 or 32) that of the 16-bit parameters'
  master weights.
  """
  if paged:
    paging.check_budget(device_budget)
  hyperparam_checks.size('min_8bit_size', min_8bit_size)

  # Traces in which this optimizer's update ran: an init in the same trace
  # is a re-initialisation inside a step (optax.lookahead(reset_state=True)).
  updated_in: weakref.WeakSet = weakref.WeakSet()

  def init_with(params: base.Params,
                zero_axis: str | None) -> OptimizerState:
    sharding.refuse_pmap()
    leaves = jax.tree.leaves(params)
    if any(_trace_of(leaf) in updated_in for leaf in leaves):
      raise TypeError(REINIT_MSG)
    kept = resolve_mask(keep_32bit, params, default=False)
    # Decided on the global leaf size, never on a shard.
    quantized = [
        quantize and np.size(leaf) >= min_8bit_size and not keep
        for leaf, keep in zip(leaves, kept, strict=True)
    ]
    decay = resolve_mask(weight_decay_mask, params)
    buffers = paging.place_new_state(registry.REGISTRY.allocate(
        spec.name, spec.num_moments, params, quantized, decay,
        paged=paged, device_budget=device_budget, zero_axis=zero_axis,
        initial_values=tuple(map(float, spec.initial_values)),
        signed=spec.signed, code_bits=code_bits,
        master_weight_bits=master_weight_bits,
    ), device_budget)
    return OptimizerState._make((state_io.zero_count(buffers), buffers))

  def init_fn(params: base.Params) -> OptimizerState:
    return init_with(params, None)

  def update_fn(
      updates: base.Updates,
      state: OptimizerState,
      params: base.Params | None = None,
      **extra_args: Any,
  ) -> tuple[base.Updates, OptimizerState]:
    del extra_args
    for leaf in jax.tree.leaves(params):
      if _trace_of(leaf) is not None:
        updated_in.add(_trace_of(leaf))
    outputs, count = run_step(
        spec, updates, state, params, output_mode=ffi.OUTPUT_UPDATES
    )
    return outputs, OptimizerState(count=count, buffers=state.buffers)

  _SPECS[update_fn] = spec
  _INITS[update_fn] = init_with
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _registered(table: weakref.WeakKeyDictionary, tx: Any, caller: str,
                advice: str) -> Any:
  """What ``table`` holds for an optax_paged optimizer; else a TypeError."""
  value = table.get(getattr(tx, 'update', None))
  if value is None:
    raise TypeError(
        f'{caller} needs an optax_paged optimizer as returned by its factory '
        f'(e.g. optax_paged.paged_adamw8bit(...)); {advice}.'
    )
  return value


def shard_state_over(
    tx: optax.GradientTransformation, axis_name: str
) -> optax.GradientTransformationExtraArgs:
  """ZeRO-1: splits the state of replicated parameters over a mesh axis.

  With data parallelism every device holds the whole state of a replicated
  parameter. Wrapped in this, ``tx.init`` gives each device along
  ``axis_name`` an equal, 256-aligned chunk of the flattened leaf's state
  instead (per-device state bytes fall by the axis size); each device
  updates its chunk and the results are gathered over the axis (the one
  collective this adds). Chunks are whole quantization blocks, so the
  result equals the unsplit update bit for bit. Leaves already split over
  ``axis_name`` keep their per-shard state.

  Args:
    tx: an optax_paged optimizer, as returned by its factory.
    axis_name: a mesh axis of the parameters' mesh, usually the data axis.

  Returns:
    The same optimizer with ZeRO-1 state; ``update`` and ``apply_gradients``
    work as for ``tx``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_paged
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
    >>> params = jax.device_put({'w': jnp.ones((512, 64))},
    ...                         NamedSharding(mesh, P()))
    >>> tx = optax_paged.shard_state_over(optax_paged.adamw8bit(1e-3), 'data')
    >>> state = tx.init(params)
  """
  init_with = _registered(_INITS, tx, 'shard_state_over',
                          'chain other transformations around the result')
  if not isinstance(axis_name, str):
    raise TypeError(f'axis_name must be a mesh axis name, got {axis_name!r}.')
  return optax.GradientTransformationExtraArgs(
      lambda params: init_with(params, axis_name), tx.update)


def apply_gradients(
    tx: optax.GradientTransformation,
    grads: base.Updates,
    state: OptimizerState,
    params: base.Params,
    *,
    stochastic_rounding: bool = False,
) -> tuple[base.Params, OptimizerState]:
  """The fused step: new parameters in one pass, bit-identical to
  ``optax.apply_updates(params, tx.update(grads, state, params)[0])``.

  The kernel writes the new parameters instead of returning updates, so XLA
  skips the separate ``apply_updates`` pass and the updates buffer; when the
  parameters are donated (``jax.jit(..., donate_argnums=...)``) it updates
  them in place.

  Args:
    tx: an optax_paged optimizer, as returned by its factory (not a chain or
      a wrapper: apply those transformations to the gradients first).
    grads: the gradients (or updates from earlier transformations).
    state: ``tx``'s state.
    params: the parameters.
    stochastic_rounding: round bf16 parameters up or down at random, with
      the probabilities that make the rounding unbiased, instead of to
      nearest, so that updates smaller than half a bf16 ulp still count on
      average. Then no longer bit-identical to update + apply_updates.
      No effect on float32 and float16 parameters.

  Returns:
    ``(new_params, new_state)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.paged_adamw8bit(1e-3)
    >>> params = {'w': jnp.ones((64, 64))}
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p),
    ...                donate_argnums=(1, 2))
    >>> params, state = step({'w': jnp.ones((64, 64))}, state, params)
  """
  fused = FUSED_STEPS.get(getattr(tx, 'update', None))
  if fused is not None:  # another path's fused step (tpu_transform)
    return fused(grads, state, params,
                 stochastic_rounding=stochastic_rounding)
  spec = _registered(
      _SPECS, tx, 'apply_gradients',
      'for a chain, apply the earlier transformations to the gradients first')
  if stochastic_rounding and state.buffers.record().has_master_weights:
    raise ValueError(MASTER_STOCHASTIC_MSG.format(spec.name))
  mode = (
      ffi.OUTPUT_PARAMS_STOCHASTIC if stochastic_rounding
      else ffi.OUTPUT_PARAMS
  )
  new_params, count = run_step(spec, grads, state, params, output_mode=mode)
  return new_params, OptimizerState(count=count, buffers=state.buffers)


MASTER_STOCHASTIC_MSG = (
    '{}: stochastic_rounding with master weights: the master keeps the '
    'bits that stochastic rounding would keep only on average, and the '
    'parameter is rounded to nearest from it. Drop stochastic_rounding '
    '(or master_weight_bits).'
)

REINIT_MSG = (
    'optax_paged: tx.init was called inside a step that also ran tx.update '
    '(optax.lookahead(reset_state=True) does this to reset the fast '
    'optimizer). A state made inside a step owns no buffers and cannot '
    'replace the live one. Use reset_state=False, or reset between steps '
    'with a new tx.init(params) outside jax.jit.'
)


def _trace_of(leaf: Any) -> Any:
  """The trace a tracer belongs to (None for concrete values)."""
  return getattr(leaf, '_trace', None) if base.is_tracer(leaf) else None


MULTISTEPS_MSG = (
    'optax.MultiSteps calls the inner optimizer on every micro-step and '
    'discards the result afterwards, but optax_paged optimizers update their '
    'state in place, so every micro-step would be applied. Use '
    'optax_paged.accumulate_gradients(tx, every_k) instead.'
)


def _inside_optax_multisteps() -> bool:
  """Whether this update is being traced by optax.MultiSteps.update."""
  multisteps_update = optax.MultiSteps.update.__code__
  frame = inspect.currentframe()
  while frame is not None:
    if frame.f_code is multisteps_update:
      return True
    frame = frame.f_back
  return False


def run_step(
    spec: OptimizerSpec,
    grads: base.Updates,
    state: OptimizerState,
    params: base.Params | None,
    *,
    output_mode: int,
) -> tuple[Any, jax.Array]:
  """One FFI call per dtype group; returns (updates or new params, count)."""
  sharding.refuse_pmap()
  if params is None:
    raise ValueError(base.NO_PARAMS_MSG)
  if _inside_optax_multisteps():
    raise TypeError(MULTISTEPS_MSG)
  if not isinstance(state, OptimizerState):
    raise TypeError(
        f'{spec.name}: expected the state made by this optimizer\'s init, '
        f'got {type(state).__name__}.'
    )
  record = state.buffers.record()
  if record.optimizer != spec.name:
    raise ValueError(
        f'{spec.name}: this state was made by {record.optimizer}.'
    )
  # The parameters are checked against the state first, so that a renamed
  # leaf is named as such rather than as a gradient mismatch.
  record.check_paths(spec.name, 'params', params)
  _check_structure(spec.name, grads, params)
  _refuse_saturated_count(spec.name, state.count, record)
  record.touched = True  # a step now writes the moments
  count_inc = optax.safe_increment(state.count)
  hyperparams = hyperparams_lib.with_seed(
      spec.hyperparams(state.count, count_inc), count_inc
  )
  if spec.trust_ratio is None:
    outputs, receipt = spmd.update(record, spec.target, hyperparams, grads,
                                   params, output_mode)
  else:
    outputs, receipt = _trust_ratio_step(record, spec, hyperparams, grads,
                                         params, state.count, output_mode)
  # The new count depends on the update calls (spmd.update's receipt): a
  # step whose updates are discarded still runs them wherever the count is
  # kept, inside a shard_map or a nested jit too.
  return (jax.tree.unflatten(jax.tree.structure(grads), outputs),
          count_inc + receipt)


def _refuse_saturated_count(name: str, count: Any, record: Any) -> None:
  """Refuses a step from a count optax can no longer increment.

  The kernel would see the saturated count as a step behind the moments
  and refuse the step as stale. A count in host memory is read; a traced
  one is judged by the moments' step while tracing (a step compiled before
  the count saturated is refused by the kernel).
  """
  if base.is_tracer(count):
    saturated = record.moments_step() == base.MAX_COUNT
  elif isinstance(count, jax.Array) and (
      not count.is_fully_addressable
      or any(d.platform != 'cpu' for d in count.devices())):
    # Reading it would wait for the previous step; a GPU kernel marks the
    # refused step, and the next call names the overflow (registry).
    saturated = False
  else:
    saturated = int(np.asarray(count)) >= base.MAX_COUNT
  if saturated:
    raise ValueError(base.COUNT_OVERFLOW_MSG.format(name=name))


TRUST_RATIO_STOCHASTIC_MSG = (
    '{}: stochastic_rounding is not available with a trust ratio (LAMB, '
    'LARS): the update is scaled after the kernel, so the new parameters are '
    'rounded by XLA. Use apply_gradients without it, or tx.update.'
)


def _trust_ratio_step(record, spec, hyperparams, grads, params, count,
                      output_mode) -> tuple[list[jax.Array], jax.Array]:
  """The kernel's step with a trust ratio, scaled per leaf (trust_ratio).

  Returns the results and spmd.update's receipt.
  """
  if output_mode == ffi.OUTPUT_PARAMS_STOCHASTIC:
    raise ValueError(TRUST_RATIO_STOCHASTIC_MSG.format(spec.name))
  trust = spec.trust_ratio
  param_leaves = jax.tree.leaves(params)
  decay = [leaf.decay for leaf in record.leaves]
  scaled = resolve_mask(trust.mask, params)
  if trust.before_kernel:
    # The gradients are combined with the parameters before any check of
    # the kernel's: refuse a shape or dtype that is not the parameters'.
    grad_leaves = record.check_tree(
        spec.name, 'updates', grads, [np.shape(p) for p in param_leaves])
    grads = jax.tree.unflatten(jax.tree.structure(grads),
                               trust_ratio_lib.scale_gradients(
                                   trust, grad_leaves, param_leaves, decay,
                                   scaled, count, spmd.norm_axes(record)))
  # In float32, so that a 16-bit parameter's update is rounded once, after
  # the scaling, not also before it.
  directions, receipt = spmd.update(record, spec.target, hyperparams, grads,
                                    params, ffi.OUTPUT_UPDATES,
                                    in_float32=True)
  return trust_ratio_lib.finish(
      trust, directions, param_leaves, decay, scaled, count,
      output_mode != ffi.OUTPUT_UPDATES, spmd.norm_axes(record)), receipt


def _check_structure(name: str, grads: Any, params: Any) -> None:
  """Refuses updates whose tree is not the parameters' (optax's rule).

  optax maps over ``updates`` and ``params`` together, so their trees must
  match; leaves alone could be paired by position (a tuple of gradients
  for a dict of parameters) and applied to the wrong parameters.
  """
  try:
    jax.tree.map(lambda *_: None, grads, params)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f'{name}: the updates tree {jax.tree.structure(grads)} does not match '
        f'the parameters tree {jax.tree.structure(params)}: {error}'
    ) from None
