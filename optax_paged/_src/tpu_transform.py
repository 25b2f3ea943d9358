"""The optimizers on the TPU path: a functional state and Pallas TPU kernels.

The factories (``paged_adamw8bit``, ``adamw8bit``, ``lion8bit``, the 4-bit
``adamw4bit``, ``paged_adamw4bit``, ``lion4bit``, ...) build this
transformation instead of the registry's when ``selected()`` says so:
on a TPU backend, or when a test forces it (``force('interpret')`` runs the
kernels in Pallas' TPU interpreter on any backend; ``force('tpu')`` builds
the compiled kernels, for an ahead-of-time compile on TPU topologies).

The state is a ``tpu_state.TpuState``: per large leaf and moment, uint8
codes and float32 absmax, updated by one Pallas kernel call per leaf
(``tpu_kernel``). 4-bit states keep the registry's 4-bit codes (blocks of
128, torchao's maps), two a byte in a TPU layout (``tpu_codec4``), and
Lion's 4-bit momentum is rounded stochastically with the registry's random
bits (the kernel takes the leaf's key and its elements' indices in the
whole leaf, per shard on a mesh). The fused step's ``stochastic_rounding``
rounds the new bfloat16 parameters as the registry's stochastic output mode,
with its random bits from the same element indices (``tpu_rounding``), in
the kernel. Small leaves keep float32 moments updated in XLA with the same
element maths and the same rounding. Paging is JAX's host memory: with a
device budget (``paged_*`` factories) the leaves beyond it keep their state
in ``pinned_host`` memory, and the step copies each one to the device, runs
its kernel and copies it back. A state on a mesh shards like the
parameters; the kernels run per shard under ``jax.shard_map``.

With ``master_weight_bits`` (24 or 32) each bfloat16 or float16 leaf also
keeps a master-weight correction and the fingerprints of its blocks of 128
parameters (``tpu_state.TpuMaster``), updated in the same kernel pass as
the moments (``tpu_kernel``) with ``master_weights``' arithmetic: the
update is the step to the master's rounding, as on the registry's path.

The trust-ratio families (LAMB, LARS) run as on the registry's path
(``transform._trust_ratio_step``): the kernel runs the base optimizer with
learning rate 1 and no decoupled decay on float32 copies of the gradients
and parameters, optax's LARS scales the gradients before it and the others
scale its float32 directions after it (``trust_ratio``), and the fused step
adds the updates as ``optax.apply_updates``. The step works in the global
view, so a sharded leaf's norms are of the whole leaf.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_paged._src import base
from optax_paged._src import families
from optax_paged._src import hyperparams as hyperparams_lib
from optax_paged._src import master_weights
from optax_paged._src import optimizer_table
from optax_paged._src import paging
from optax_paged._src import quantization
from optax_paged._src import reference
from optax_paged._src import tpu_codec4
from optax_paged._src import tpu_host_tier
from optax_paged._src import tpu_rounding
from optax_paged._src import tpu_state
from optax_paged._src import transform
from optax_paged._src import trust_ratio as trust_ratio_lib
from optax_paged._src.tpu_state import TpuLeafState
from optax_paged._src.tpu_state import TpuMaster
from optax_paged._src.tpu_state import TpuMoment
from optax_paged._src.tpu_state import TpuState

# The environment variable that forces a path: 'tpu', 'interpret' or 'off'.
ENV = 'OPTAX_PAGED_TPU_PATH'
MODES = ('tpu', 'interpret', 'off')
_forced: list[str] = []


def selected() -> str | None:
  """The TPU path's mode for factories built now: ``'tpu'`` (compiled
  kernels), ``'interpret'`` (Pallas' TPU interpreter) or None (the
  registry's path). Forced by ``force`` or ``$OPTAX_PAGED_TPU_PATH``; else
  ``'tpu'`` exactly when JAX's default backend is a TPU."""
  mode = _forced[-1] if _forced else os.environ.get(ENV)
  if mode:
    if mode not in MODES:
      raise ValueError(f'{ENV}={mode!r}: expected one of {MODES}.')
    return None if mode == 'off' else mode
  return 'tpu' if jax.default_backend() == 'tpu' else None


@contextlib.contextmanager
def force(mode: str) -> Iterator[None]:
  """Factories called inside build the TPU path in ``mode`` (see
  ``selected``): ``'interpret'`` tests the kernels on a CPU."""
  if mode not in MODES:
    raise ValueError(f'force: expected one of {MODES}, got {mode!r}.')
  _forced.append(mode)
  try:
    yield
  finally:
    _forced.pop()


def supports(spec: transform.OptimizerSpec, code_bits: int) -> bool:
  """Whether the TPU kernels run this optimizer (with or without master
  weights)."""
  return (code_bits in tpu_state.CODE_BITS
          and (code_bits == 8 or optimizer_table.info(spec.kernel).four_bit)
          and any(f.name == spec.kernel and f.reference_update is not None
                  for f in families.FAMILIES.values()))


def make_transformation(
    spec: transform.OptimizerSpec,
    *,
    mode: str,
    quantize: bool,
    min_8bit_size: int,
    weight_decay_mask: Any,
    paged: bool,
    device_budget: Any = None,
    keep_32bit: Any = None,
    master_weight_bits: int | None = None,
    code_bits: int = 8,
) -> optax.GradientTransformationExtraArgs:
  """The TPU path's transformation of ``spec`` (see the module docstring).

  ``mode`` is ``'tpu'`` or ``'interpret'``; ``master_weight_bits`` None, 24
  or 32; ``code_bits`` 8 or 4.
  """
  if paged:
    paging.check_budget(device_budget)
  interpret = mode == 'interpret'
  info = optimizer_table.info(spec.kernel)
  # As the registry's kernels: Lion's 4-bit momentum rounds stochastically.
  stochastic = code_bits == 4 and info.stochastic_four_bit

  def init_fn(params: base.Params) -> TpuState:
    leaves, treedef = jax.tree.flatten(params)
    kept = transform.resolve_mask(keep_32bit, params, default=False)
    quantized = [quantize and np.size(p) >= min_8bit_size and not keep
                 for p, keep in zip(leaves, kept, strict=True)]
    initial = tuple(float(v) for v in spec.initial_values) or (
        0.0,) * info.num_moments
    master_weights.check_leaves(spec.name, master_weight_bits,
                                [p.dtype for p in leaves])
    # With a trust ratio the kernels run on float32 copies of the leaves.
    if not interpret and spec.trust_ratio is None:
      _check_compilable(spec.name, leaves, quantized)
    states = [_init_leaf(p, q, initial, info.signed,
                         master_weights.correction_bits(master_weight_bits,
                                                        p.dtype), code_bits)
              for p, q in zip(leaves, quantized, strict=True)]
    if paged:
      states = _place(states, leaves, device_budget)
    count = (_abstract((), jnp.int32, leaves[0], jax.sharding.PartitionSpec())
             if leaves and _is_abstract(leaves[0])
             else jnp.zeros([], jnp.int32))
    return TpuState(count, treedef.unflatten(states), spec.name, spec.signed,
                    code_bits)

  def step(grads, state, params, output_params, stochastic_rounding=False):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    if not isinstance(state, TpuState):
      raise TypeError(f'{spec.name}: expected the state made by this '
                      f"optimizer's init, got {type(state).__name__}.")
    if state.optimizer != spec.name or state.code_bits != code_bits:
      raise ValueError(
          f'{spec.name} ({code_bits}-bit): this state was made by '
          f'{state.optimizer} ({state.code_bits}-bit).')
    param_leaves, treedef = jax.tree.flatten(params)
    grad_leaves = treedef.flatten_up_to(grads)
    leaf_states = treedef.flatten_up_to(state.leaves)
    decay = transform.resolve_mask(weight_decay_mask, params)
    for g, p, ls in zip(grad_leaves, param_leaves, leaf_states, strict=True):
      if np.shape(g) != np.shape(p) or tuple(np.shape(p)) != ls.shape:
        raise ValueError(
            f'{spec.name}: a gradient of shape {np.shape(g)} for a parameter '
            f'of shape {np.shape(p)}, state for {ls.shape}.')
    count_inc = optax.safe_increment(state.count)
    h = spec.hyperparams(state.count, count_inc)
    trust = spec.trust_ratio
    kernel_params = param_leaves
    if trust is not None:
      scaled = transform.resolve_mask(trust.mask, params)
      # As the registry's in_float32: the kernel's directions stay float32,
      # so that a 16-bit parameter's update is rounded once, after the
      # scaling.
      grad_leaves = [jnp.asarray(g).astype(jnp.float32) for g in grad_leaves]
      kernel_params = [jnp.asarray(p).astype(jnp.float32)
                       for p in param_leaves]
      if trust.before_kernel:
        grad_leaves = trust_ratio_lib.scale_gradients(
            trust, grad_leaves, param_leaves, decay, scaled, state.count)
    outs, new_states = [], []
    for i, (g, p, ls, d) in enumerate(zip(grad_leaves, kernel_params,
                                          leaf_states, decay, strict=True)):
      if ls.master is not None and (
          master_weights.correction_bits(24, p.dtype) == 0):
        raise ValueError(
            f'{spec.name}: a {np.dtype(p.dtype).name} parameter whose state '
            'keeps a master-weight correction, made for a 16-bit one.')
      key = param_key = None
      codes_random = stochastic and ls.quantized
      if codes_random or stochastic_rounding:
        if math.prod(ls.shape) >= 2**32:
          raise ValueError(
              f'{spec.name} (TPU): a leaf of {math.prod(ls.shape)} elements; '
              'the TPU kernel draws rounding bits for leaves under 2^32 '
              'elements only.')
      if codes_random:
        # The registry's random bits: leaf i of the state, the new count.
        key = tpu_codec4.rounding_key(count_inc, i)
      if stochastic_rounding:
        param_key = tpu_rounding.leaf_key(count_inc, i)
      out, new = _leaf_step(spec, h, g, p, ls, d,
                            output_params and trust is None, interpret, key,
                            param_key)
      outs.append(out)
      new_states.append(new)
    if trust is not None:
      outs = trust_ratio_lib.finish(trust, outs, param_leaves, decay, scaled,
                                    state.count, output_params)
    return (treedef.unflatten(outs),
            state.replace(count=count_inc,
                          leaves=treedef.unflatten(new_states)))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return step(updates, state, params, output_params=False)

  def fused(grads, state, params, *, stochastic_rounding=False):
    if stochastic_rounding and spec.trust_ratio is not None:
      raise ValueError(transform.TRUST_RATIO_STOCHASTIC_MSG.format(spec.name))
    if stochastic_rounding and master_weight_bits is not None:
      raise ValueError(transform.MASTER_STOCHASTIC_MSG.format(spec.name))
    return step(grads, state, params, output_params=True,
                stochastic_rounding=stochastic_rounding)

  transform.FUSED_STEPS[update_fn] = fused
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_compilable(name: str, leaves: list[Any],
                      quantized: list[bool]) -> None:
  """Refuses float16 leaves that a kernel would update: Mosaic (libtpu
  0.0.42.1) has no float16 vectors, so their kernel would fail to compile
  with a lowering error deep in the step."""
  for index, (leaf, q) in enumerate(zip(leaves, quantized, strict=True)):
    if q and jnp.dtype(leaf.dtype) == jnp.float16:
      raise ValueError(
          f'{name}: leaf {index} is float16 {tuple(np.shape(leaf))}; the TPU '
          'kernels cannot take float16 (Mosaic has no float16 vectors). Use '
          'bfloat16 or float32 parameters on a TPU.')


def _sharding_of(x: Any) -> jax.sharding.NamedSharding | None:
  sharding = getattr(x, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding) and (
      sharding.mesh.size > 1):
    return sharding
  return None


def _shards_over(sharding: jax.sharding.NamedSharding, entry: Any) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(sharding.mesh.shape[n] for n in names if n is not None)


def _check_shardable(shape: tuple[int, ...],
                     sharding: jax.sharding.NamedSharding | None) -> None:
  if sharding is None or sharding.is_fully_replicated:
    return
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  if not tpu_state.is_native(shape) or (
      shape[-1] // _shards_over(sharding, spec[-1])) % tpu_state.BLOCK:
    raise ValueError(
        f'optax_paged (TPU): a parameter of shape {shape} sharded as '
        f'{sharding.spec}: its quantized state splits into whole blocks of '
        '256 elements only for two or more dimensions whose last, per '
        'shard, is a multiple of 256. Shard another dimension, or keep it '
        'in float32 (keep_32bit).')


def _constant_moment(value, signed, code_bits) -> tuple[int, float]:
  """(code, absmax) of a moment whose every element is ``value``."""
  if value == 0:
    # 4-bit: the registry's zeroed buffers (absmax 0: every code decodes
    # to zero), so that a fresh state's checkpoint is the registry's.
    return (0 if code_bits == 4 else tpu_state.fill_code(signed, 8)), 0.0
  codes, absmax = quantization.quantize_blockwise(
      jnp.full([tpu_state.block(code_bits)], value, jnp.float32), signed,
      code_bits)
  return int(codes[0]), float(absmax[0])


def _is_abstract(param: Any) -> bool:
  return isinstance(param, jax.ShapeDtypeStruct)


def _abstract(shape, dtype, param, spec) -> jax.ShapeDtypeStruct:
  """An array of the state laid out as ``param``'s, for an ahead-of-time
  compile (``tx.init`` of ``jax.ShapeDtypeStruct`` parameters)."""
  sharding = getattr(param, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(
        sharding.mesh, sharding.spec if spec is None else spec)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _init_leaf(param, quantized, initial, signed, correction_bits,
               code_bits) -> TpuLeafState:
  shape = tuple(np.shape(param))
  sharding = _sharding_of(param)
  master = (_init_master(param, shape, quantized, correction_bits, sharding)
            if correction_bits else None)
  if _is_abstract(param):
    return _init_abstract(param, shape, quantized, len(initial),
                          sharding, code_bits).replace(master=master)
  moments = []
  for value, is_signed in zip(initial, signed, strict=True):
    if not quantized:
      moments.append(_full(shape, value, jnp.float32, sharding, None))
      continue
    _check_shardable(shape, sharding)
    codes_shape, absmax_shape = tpu_state.moment_shapes(shape, code_bits)
    code, absmax = _constant_moment(value, is_signed, code_bits)
    if value == 0 or tpu_state.is_native(shape):
      # 4-bit: the code in both nibbles.
      byte = code * 17 if code_bits == 4 else code
      spec = sharding.spec if sharding is not None else None
      moments.append(TpuMoment(
          _full(codes_shape, byte, jnp.uint8, sharding, spec),
          _full(absmax_shape, absmax, jnp.float32, sharding,
                None if spec is None else tpu_state.absmax_spec(
                    spec, len(shape)))))
    else:
      n = math.prod(shape)
      codes = np.full(n, code, np.uint8)
      if code_bits == 4:
        codes = quantization.pack_nibbles(codes)
      moments.append(tpu_state.from_flat(
          codes, np.full(-(-n // tpu_state.block(code_bits)), absmax,
                         np.float32), shape, is_signed, code_bits))
  return TpuLeafState(tuple(moments), shape, 'device', sharding, master,
                      code_bits)


def _init_master(param, shape, quantized, bits, sharding) -> TpuMaster:
  """A zero correction and fingerprints (none written yet: every block
  is kept) for a 16-bit leaf, laid out as its moments (``tpu_state``)."""
  if quantized:
    _check_shardable(shape, sharding)
  spec = None if sharding is None else sharding.spec
  correction_shape = tpu_state.element_shape(shape) if quantized else shape
  prints_shape = tpu_state.fingerprint_shape(shape, quantized)
  replicated = jax.sharding.PartitionSpec()
  prints_spec = replicated
  if quantized and spec is not None:
    prints_spec = tpu_state.absmax_spec(spec, len(shape))
  arrays = [(correction_shape, jnp.int8 if bits == 8 else jnp.int16, spec),
            (prints_shape, jnp.int32, prints_spec),
            ((), jnp.uint32, replicated)]
  if _is_abstract(param):
    return TpuMaster(*(_abstract(s, d, param, p) for s, d, p in arrays))
  return TpuMaster(*(_full(s, 0, d, sharding, p) for s, d, p in arrays))


def _init_abstract(param, shape, quantized, num_moments, sharding, code_bits
                   ) -> TpuLeafState:
  if not quantized:
    moment = _abstract(shape, jnp.float32, param, None)
  else:
    _check_shardable(shape, sharding)
    codes_shape, absmax_shape = tpu_state.moment_shapes(shape, code_bits)
    spec = None if sharding is None else sharding.spec
    moment = TpuMoment(
        _abstract(codes_shape, jnp.uint8, param, spec),
        _abstract(absmax_shape, jnp.float32, param,
                  None if spec is None else tpu_state.absmax_spec(
                      spec, len(shape))))
  return TpuLeafState((moment,) * num_moments, shape, 'device', sharding,
                      code_bits=code_bits)


def _full(shape, value, dtype, sharding, spec):
  if sharding is None:
    return jnp.full(shape, value, dtype)
  target = jax.sharding.NamedSharding(
      sharding.mesh, sharding.spec if spec is None else spec)
  return jax.jit(lambda: jnp.full(shape, value, dtype),
                 out_shardings=target)()


def _memory_kinds(x: Any) -> set[str]:
  return {m.kind for d in getattr(x, 'devices', lambda: [])()
          for m in d.addressable_memories()}


def _place(states: list[TpuLeafState], params: list[Any],
           device_budget: Any) -> list[TpuLeafState]:
  """The states with the leaves beyond the device budget in pinned host
  memory (paging.place's order: parameter order, device first)."""
  sizes = [sum(math.prod(x.shape) * x.dtype.itemsize
               for x in jax.tree.leaves(s))
           for s in states]
  budget = _budget(device_budget, params, sum(sizes))
  tiers = paging.place(sizes, budget)
  placed = []
  for state, param, tier in zip(states, params, tiers, strict=True):
    if tier == 'host':
      kinds = _memory_kinds(param)
      if kinds and 'pinned_host' not in kinds:
        raise ValueError(
            'optax_paged (TPU): this backend has no pinned_host memory for '
            'the host tier; use a larger device_budget.')
      state = tpu_host_tier.to_host(state)
    placed.append(state)
  return placed


def _budget(device_budget: Any, params: list[Any], total: int) -> int:
  """Bytes of state the device keeps: an int as is; a fraction, None or
  'auto' of the memory XLA reports free on the first device (all of it
  where XLA reports none, as on the CPU)."""
  if isinstance(device_budget, int) and not isinstance(device_budget, bool):
    return device_budget
  devices = [d for p in params for d in getattr(p, 'devices', lambda: [])()]
  stats = paging.xla_stats(devices[0]) if devices else None
  if not stats or 'bytes_limit' not in stats:
    return total
  free = stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  fraction = (device_budget if isinstance(device_budget, float)
              else paging.DEFAULT_DEVICE_FRACTION)
  return int(free * fraction)


def _leaf_step(spec, h, grad, param, ls: TpuLeafState, decay, output_params,
               interpret, key=None, param_key=None):
  """One leaf's step; ``key``: its 4-bit rounding key (int32), or None;
  ``param_key``: with the fused step's stochastic rounding, its parameter
  key (``tpu_rounding.leaf_key``), or None."""
  if ls.tier == 'host':
    out, new = _leaf_step(spec, h, grad, param, tpu_host_tier.to_device(ls),
                          decay, output_params, interpret, key, param_key)
    return out, tpu_host_tier.to_host(new)
  if not ls.quantized:
    return _xla_leaf_step(spec, h, grad, param, ls, decay, output_params,
                          param_key)
  moments = ls.moments
  master = None if ls.master is None else ls.master[:2]
  sharding = ls.sharding
  round_params = param_key is not None
  if key is not None or round_params:
    # One rounding operand: the codes' key (unused: 0) and the parameters'.
    key = jnp.concatenate([
        jnp.reshape(jnp.int32(0) if key is None else key, [1]),
        jnp.zeros([2], jnp.int32) if param_key is None else param_key])
  run = functools.partial(_run_kernel, spec.kernel, ls.shape, decay,
                          output_params, interpret, ls.code_bits,
                          None if sharding is None else sharding.mesh,
                          round_params)
  # Replicated leaves too: on a mesh every kernel is one call over all its
  # devices, as Pallas' TPU interpreter needs (a call's devices meet at
  # barriers; a one-device call between them fails its shared memory).
  if sharding is not None:
    spec_p = sharding.spec
    spec_a = tpu_state.absmax_spec(spec_p, len(ls.shape))
    moment_specs = tuple(TpuMoment(spec_p, spec_a) for _ in moments)
    # The fingerprints are laid out, and split, as the absmax.
    master_specs = None if master is None else (spec_p, spec_a)
    run = jax.shard_map(
        functools.partial(run, spec_p), mesh=sharding.mesh,
        in_specs=(jax.sharding.PartitionSpec(),
                  None if key is None else jax.sharding.PartitionSpec(),
                  spec_p, spec_p, moment_specs, master_specs),
        out_specs=(spec_p, moment_specs, master_specs), check_vma=False)
  else:
    run = functools.partial(run, None)
  out, moments, master = run(h, key, grad, param, moments, master)
  if master is not None:
    master = TpuMaster(*master, ls.master.resets)
  return out, ls.replace(moments=moments, master=master)


def _xla_leaf_step(spec, h, grad, param, ls: TpuLeafState, decay,
                   output_params, param_key=None):
  """A leaf with float32 moments: the reference's step, in XLA
  (``param_key``: the fused step's stochastic rounding, see
  ``_leaf_step``)."""
  slots = hyperparams_lib.unpack(spec.kernel, h)
  if param_key is not None:
    # The float32 update of a float32 copy (the gradient rounded to the
    # parameter's dtype first, as the kernel reads it), rounded as the
    # registry's stochastic output from p + update.
    update, moments, _ = reference.leaf_step(
        families.reference_update(spec.kernel), spec.signed, slots,
        jnp.asarray(grad).astype(param.dtype).astype(jnp.float32),
        jnp.asarray(param).astype(jnp.float32),
        tuple(m.reshape(-1) for m in ls.moments), decay)
    index = jax.lax.bitcast_convert_type(
        jnp.arange(math.prod(ls.shape), dtype=jnp.uint32), jnp.int32)
    random = tpu_rounding.bits(param_key[0], param_key[1],
                               index.reshape(ls.shape))
    out = tpu_rounding.new_param(jnp.asarray(param).astype(jnp.float32),
                                 update, param.dtype, random)
    return out, ls.replace(
        moments=tuple(m.reshape(ls.shape) for m in moments))
  master = ls.master
  if master is not None:
    master = reference.MasterCorrection(
        master.correction.reshape(-1),
        jax.lax.bitcast_convert_type(master.fingerprints, jnp.uint32))
  update, moments, new = reference.leaf_step(
      families.reference_update(spec.kernel), spec.signed, slots, grad,
      param, tuple(m.reshape(-1) for m in ls.moments), decay, master=master)
  moments = tuple(m.reshape(ls.shape) for m in moments)
  if new is not None:
    new = TpuMaster(
        new.correction.reshape(ls.shape),
        jax.lax.bitcast_convert_type(new.fingerprints, jnp.int32),
        ls.master.resets)
  out = (jnp.asarray(param + update).astype(param.dtype) if output_params
         else update)
  return out, ls.replace(moments=moments, master=new)


def _run_kernel(kernel, shape, decay, output_params, interpret, code_bits,
                mesh, round_params, spec, h, key, grad, param, moments,
                master):
  """The kernel on one leaf (or one shard of it: ``shape`` is then the
  global shape, and the local arrays' own shapes are used; ``spec`` the
  leaf's PartitionSpec on ``mesh``, None off a mesh)."""
  from optax_paged._src import tpu_kernel  # noqa: PLC0415 - Pallas on use

  local = tuple(param.shape)
  native = tpu_state.is_native(shape)
  rounding = None if key is None else _rounding(key, shape, local, spec, mesh)
  if native:
    del shape
    shape = local
  if master is not None:
    master = tpu_state.master_view(*master, shape)
  out, new, master = tpu_kernel.leaf_step(
      kernel, h, tpu_state.kernel_view(grad, shape),
      tpu_state.kernel_view(param, shape),
      [tuple(tpu_state.moment_view(m, shape, code_bits)) for m in moments],
      decay=decay, output_params=output_params, interpret=interpret,
      master=master, size=None if native else math.prod(shape),
      code_bits=code_bits, rounding=rounding, round_params=round_params)
  if master is not None:
    master = tpu_state.master_from_view(*master, shape)
  return (tpu_state.from_kernel_view(out, shape),
          tuple(tpu_state.moment_from_view(TpuMoment(*m), shape, code_bits)
                for m in new), master)


def _bits(n: int) -> np.int32:
  """An index's low 32 bits as int32 (the kernels' uint32 arithmetic)."""
  return np.array(n % 2**32, np.uint32).view(np.int32)


def _shard_offsets(spec, local, mesh) -> list[Any]:
  """Inside ``shard_map``: this shard's first index along each dimension
  (a dimension split over several mesh axes takes them major first)."""
  entries = tuple(spec) + (None,) * (len(local) - len(tuple(spec)))
  offsets = []
  for entry, n in zip(entries, local, strict=True):
    coordinate = jnp.int32(0)
    for name in entry if isinstance(entry, tuple) else (entry,):
      if name is not None:
        coordinate = (coordinate * mesh.shape[name]
                      + jax.lax.axis_index(name).astype(jnp.int32))
    offsets.append(coordinate * n)
  return offsets


def _rounding(keys, shape, local, spec, mesh) -> jax.Array:
  """The kernel's ``rounding`` operand (``tpu_kernel.leaf_step``) of a
  leaf or of this device's shard of it from int32[3] ``keys`` (the codes'
  key, the parameters' two words): the codes' key, the row stride, the
  parameters' key and the leaf index of the first element of each of the
  view's L rows' blocks, so that a shard draws the bits one device
  draws."""
  if not tpu_state.is_native(shape):
    # A flat leaf is whole on every device: its view's rows are the leaf's.
    return jnp.stack([keys[0], jnp.int32(tpu_state.FLAT_LANES), keys[1],
                      keys[2], jnp.int32(0)])
  offsets = ([jnp.int32(0)] * len(shape) if spec is None
             else _shard_offsets(spec, local, mesh))
  lead = math.prod(local[:-2])
  coordinates = np.unravel_index(np.arange(lead), local[:-2]) if (
      len(local) > 2) else ()
  first = offsets[-2] * shape[-1] + offsets[-1] + jnp.zeros([lead], jnp.int32)
  for d, c in enumerate(coordinates):
    stride = _bits(math.prod(shape[d + 1:]))
    first = first + (jnp.asarray(c, jnp.int32) + offsets[d]) * stride
  return jnp.concatenate(
      [jnp.stack([keys[0], jnp.int32(shape[-1]), keys[1], keys[2]]), first])
