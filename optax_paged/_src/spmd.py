"""Running the update on every device that holds a shard of the state.

Three views, told apart by the axes that are manual where ``tx.update`` is
traced:

- global (``jax.jit``, no manual axes): the update is wrapped in a
  ``jax.shard_map`` over the mesh and specs recorded at ``init``, so each
  device's handler sees its own shards, with no collective;
- inside the user's ``shard_map`` over every mesh axis: the operands are
  already local shards and the update runs as is;
- inside a ``shard_map`` over some axes: the remaining ones are mapped by a
  nested ``shard_map``.

Every call passes the device's linear mesh position (from ``axis_index``);
the handler compares it with the position its entry was made for, so a
shard that reaches another device's entry is refused, never applied. Inside
the user's ``shard_map`` the devices' order is compared with the state's
mesh before that, when the step is lowered (``device_order``), so that no
device applies a step that another refuses.

A state on one device also runs inside a ``shard_map`` over a one-device
mesh (what the ``shard_map`` recipe gives on one GPU): there the operands
are whole leaves.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_paged._src import device_order
from optax_paged._src import ffi
from optax_paged._src import registry
from optax_paged._src import sharding


def manual_axes() -> tuple[str, ...]:
  """The mesh axes that are manual where this is traced."""
  return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def norm_axes(
    record: registry.StateRecord) -> list[tuple[str, ...]] | None:
  """Per leaf, the manual axes its shards are spread over, where traced.

  A whole leaf's norm is the sum of its shards' over these; None where every
  operand is a whole leaf (one device, or the global view).
  """
  manual = set(manual_axes())
  if record.layout is None or not manual:
    return None
  return [tuple(a for axes in dims for a in axes if a in manual)
          for dims in record.layout.dims]


def _traced_position(layout: sharding.MeshLayout) -> jax.Array:
  sizes = layout.axis_sizes
  position = jnp.zeros([], jnp.int32)
  for name in layout.mesh.axis_names:
    position = position * sizes[name] + jax.lax.axis_index(name)
  return position.astype(jnp.int32)


# Every gradient of one call is live until the call runs: each is an
# operand of it, behind one optimization barrier. One call over a whole
# model therefore held every gradient in device memory at once (the host
# tier's capacity on an H100 was parameters plus all gradients, 8 bytes a
# float32 parameter). Calls over at most this many bytes of gradients let
# XLA free each chunk's gradients once its call has run, where its schedule
# computes them one chunk after another, as it does for optax's elementwise
# updates. A leaf larger than this is a call of its own; a model smaller
# than this keeps one call a dtype group (one kernel launch).
MAX_CALL_BYTES = 1 << 30


def call_chunks(indices: Sequence[int], nbytes: Sequence[int],
                max_bytes: int) -> list[tuple[int, ...]]:
  """``indices`` in order, cut into runs of at most ``max_bytes``.

  Args:
    indices: the leaves of one dtype group, in call order.
    nbytes: each of those leaves' operand size in bytes.
    max_bytes: the most bytes one run holds, unless one leaf alone holds
      more (it is then a run of its own).

  Returns:
    The runs, each a tuple of indices; together ``indices`` in order.
  """
  chunks: list[tuple[int, ...]] = []
  current: list[int] = []
  held = 0
  for index, size in zip(indices, nbytes, strict=True):
    if current and held + size > max_bytes:
      chunks.append(tuple(current))
      current, held = [], 0
    current.append(index)
    held += size
  if current:
    chunks.append(tuple(current))
  return chunks


def _call_groups(
    record: registry.StateRecord, target: str, hyperparams: jax.Array,
    position: jax.Array, grads: Sequence[jax.Array],
    params: Sequence[jax.Array], output_mode: int,
) -> tuple[list[jax.Array], jax.Array]:
  """FFI calls over this device's operands: a dtype group's leaves in runs
  of at most ``MAX_CALL_BYTES`` of gradients."""
  outputs: list[Any] = [None] * len(grads)
  receipt = jnp.zeros([], jnp.int32)
  for group in record.groups:
    sizes = [grads[i].size * grads[i].dtype.itemsize for i in group.indices]
    for chunk in call_chunks(group.indices, sizes, MAX_CALL_BYTES):
      results, chunk_receipt = ffi.update_call(
          target,
          hyperparams,
          position,
          [grads[i] for i in chunk],
          [params[i] for i in chunk],
          state_id=record.state_id,
          leaf_indices=chunk,
          output_mode=output_mode,
      )
      receipt = receipt + chunk_receipt
      for i, result in zip(chunk, results, strict=True):
        outputs[i] = result
  return outputs, receipt


def update(
    record: registry.StateRecord, target: str, hyperparams: jax.Array,
    grads: Any, params: Any, output_mode: int, *, in_float32: bool = False,
) -> tuple[list[jax.Array], jax.Array]:
  """The update's results (one per leaf) for ``grads`` and ``params``.

  With ``in_float32`` the kernel runs on float32 copies of 16-bit operands
  and returns float32 results (for a result that is scaled further before
  it is rounded once to the parameter's dtype).

  Returns:
    The results, and the receipt: an int32 zero that depends on every
    update call (``ffi.update_call``). Add it to the new count, so that the
    calls run whenever the count is kept, even where the results are not.
  """
  if record.layout is None:
    return _single_device_update(record, target, hyperparams, grads, params,
                                 output_mode, in_float32)
  return _mesh_update(record, target, hyperparams, grads, params, output_mode,
                      in_float32)


def _operands(
    record: registry.StateRecord, grads: Any, params: Any,
    shapes: Sequence[tuple[int, ...]] | None = None,
    in_float32: bool = False,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """Checked leaves; gradients in their parameter's dtype (or float32)."""
  grads = record.check_tree(record.optimizer, 'updates', grads, shapes)
  params = record.check_tree(record.optimizer, 'params', params, shapes)
  dtypes = [jnp.float32 if in_float32 else leaf.dtype
            for leaf in record.leaves]
  return ([jnp.asarray(g).astype(d) for g, d in zip(grads, dtypes,
                                                    strict=True)],
          [jnp.asarray(p).astype(d) for p, d in zip(params, dtypes,
                                                    strict=True)])


def _single_device_update(
    record: registry.StateRecord, target: str, hyperparams: jax.Array,
    grads: Any, params: Any, output_mode: int, in_float32: bool,
) -> list[jax.Array]:
  """The update of a state that lives on one device."""
  grads, params = _operands(record, grads, params, in_float32=in_float32)
  axes = manual_axes()
  context = jax.sharding.get_abstract_mesh()
  if axes and math.prod(context.axis_sizes) > 1:
    raise ValueError(
        f'{record.optimizer}: this state was initialised for parameters on '
        f'one device, but the update runs inside a shard_map over {axes} of '
        f'a mesh of {math.prod(context.axis_sizes)} devices. Initialise it '
        'with the parameters on the mesh (NamedSharding): tx.init then makes '
        'one entry per device.'
    )
  if axes:  # a one-device mesh: it must be the state's device
    hyperparams = device_order.checked(hyperparams, record.optimizer, None,
                                 record.devices[0])
  for x in (*grads, *params):
    mesh = _aval_mesh(x)
    if mesh is not None and math.prod(mesh.axis_sizes) > 1:
      axes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
      raise ValueError(
          f'{record.optimizer}: this state was initialised for parameters on '
          f'one device, but the update gets operands on a mesh {axes}. '
          'Initialise it with the parameters on that mesh (NamedSharding): '
          'tx.init then makes one entry per device.'
      )
  return _call_groups(record, target, hyperparams, jnp.zeros([], jnp.int32),
                      grads, params, output_mode)


def _aval_mesh(x: Any) -> Any:
  """The (abstract) mesh JAX's types give ``x``, or None."""
  mesh = getattr(getattr(jax.typeof(x), 'sharding', None), 'mesh', None)
  if mesh is None or not mesh.axis_names:
    return None
  return mesh


def _local_step(
    record: registry.StateRecord, target: str, output_mode: int,
    hyperparams: jax.Array, grads: Sequence[jax.Array],
    params: Sequence[jax.Array],
) -> list[jax.Array]:
  """The update on one device, every mesh axis manual."""
  layout = record.layout
  grads, params = list(grads), list(params)
  for i, chunk in enumerate(layout.chunks):
    if chunk:
      grads[i], params[i] = (
          _my_chunk(layout, x, chunk) for x in (grads[i], params[i])
      )
  outputs, receipt = _call_groups(record, target, hyperparams,
                                  _traced_position(layout), grads, params,
                                  output_mode)
  for i, chunk in enumerate(layout.chunks):
    if chunk:
      gathered = jax.lax.all_gather(outputs[i], layout.zero_axis, tiled=True)
      outputs[i] = gathered[:layout.local_size(i)].reshape(
          layout.local_shapes[i])
  return outputs, receipt


def _my_chunk(layout: sharding.MeshLayout, x: jax.Array,
              chunk: int) -> jax.Array:
  """This device's ZeRO-1 chunk of the flattened shard ``x`` (zero-padded).

  Padding elements have zero gradient and parameter: every optimizer keeps
  their moments at their initial value, which never exceeds the block's
  other elements, so the block's absmax, and every code, are unchanged.
  """
  n = layout.axis_sizes[layout.zero_axis]
  flat = x.reshape(-1)
  flat = jnp.pad(flat, (0, n * chunk - flat.size))
  start = jax.lax.axis_index(layout.zero_axis) * chunk
  return jax.lax.dynamic_slice(flat, (start,), (chunk,))


def _conform(x: jax.Array, layout: sharding.MeshLayout, spec: P) -> jax.Array:
  """``x`` resharded to ``spec`` where the mesh has explicit axes.

  shard_map refuses an operand whose explicit sharding differs from its
  in_spec; on an automatic mesh it reshards by itself.
  """
  explicit = jax.sharding.AxisType.Explicit
  if explicit not in tuple(layout.mesh.axis_types):
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(layout.mesh, spec))


def _mesh_update(
    record: registry.StateRecord, target: str, hyperparams: jax.Array,
    grads: Any, params: Any, output_mode: int, in_float32: bool,
) -> list[jax.Array]:
  """The update of a state spread over a mesh, in whatever view."""
  layout = record.layout
  name = record.optimizer
  axes = manual_axes()
  sizes = layout.axis_sizes
  context = jax.sharding.get_abstract_mesh()
  context_sizes = dict(zip(context.axis_names, context.axis_sizes,
                           strict=True)) if axes else {}
  for axis in axes:
    if context_sizes.get(axis) != sizes.get(axis):
      raise ValueError(
          f'{name}: the update runs inside a shard_map over axis {axis!r} '
          f'of size {context_sizes.get(axis)}, but the state was initialised '
          f'on a mesh with axes {sizes}. Use the mesh the parameters had at '
          'init.'
      )
  shapes = [layout.local_shape_in(i, axes) for i in range(len(record.leaves))]
  grads, params = _operands(record, grads, params, shapes, in_float32)
  if axes:
    # The global view maps over the state's own mesh; inside the user's
    # shard_map the devices' order is the user's mesh's.
    hyperparams = device_order.checked(hyperparams, name, layout.mesh)

  def step(hyperparams, grads, params):
    return _local_step(record, target, output_mode, hyperparams, grads, params)

  if set(axes) == set(layout.mesh.axis_names):
    return step(hyperparams, grads, params)
  specs = [layout.spec(i, without=axes) for i in range(len(grads))]
  if not axes:
    grads = [_conform(g, layout, s) for g, s in zip(grads, specs, strict=True)]
    params = [_conform(p, layout, s)
              for p, s in zip(params, specs, strict=True)]
    hyperparams = _conform(hyperparams, layout, P())
  mapped = jax.shard_map(
      step,
      mesh=layout.mesh if not axes else None,
      in_specs=(P(), specs, specs),
      out_specs=(specs, P()),
      axis_names=frozenset(a for a in layout.mesh.axis_names if a not in axes),
      check_vma=False,
  )
  outputs, receipt = mapped(hyperparams, grads, params)
  return list(outputs), receipt
