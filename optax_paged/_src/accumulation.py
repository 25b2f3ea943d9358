"""Gradient accumulation that is correct for in-place optimizers.

``optax.MultiSteps`` calls its inner optimizer on every micro-step and keeps
or discards the result afterwards. An optax_paged optimizer writes its state
in place, so a discarded call would still have moved the moments:
``optax.MultiSteps`` around one is refused (see ``transform.py``), and this
wrapper runs the inner update only on the micro-steps that apply it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class AccumulateGradientsState(NamedTuple):
  """State of :func:`accumulate_gradients`.

  Attributes:
    mini_step: micro-steps accumulated since the last update, shape ``()``.
    grad_sum: float32 sums of the gradients of those micro-steps.
    inner_state: the wrapped optimizer's state.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.accumulate_gradients(optax_paged.adamw8bit(1e-3), 4)
    >>> params = {'w': jnp.ones((64, 64))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.ones((64, 64))}, state, params)
    >>> int(state.mini_step), state.grad_sum['w'].dtype
    (1, dtype('float32'))
  """

  mini_step: jax.Array  # shape=(), dtype=jnp.int32
  grad_sum: optax.Updates
  inner_state: optax.OptState


def accumulate_gradients(
    tx: optax.GradientTransformation, every_k: int
) -> optax.GradientTransformationExtraArgs:
  """Applies ``tx`` to the mean gradient of every ``every_k`` micro-steps.

  The gradients are summed in float32; on the ``every_k``-th micro-step the
  inner optimizer is called once, inside ``jax.lax.cond``, with the sum
  divided by ``every_k`` (in the gradients' dtype), and its updates are
  returned. The other micro-steps return zero updates and leave the inner
  state untouched. ``every_k`` micro-steps therefore give exactly the
  parameters and state of one step on the mean gradient.

  Args:
    tx: the optimizer to wrap (any optax transformation; made for optax_paged
      optimizers, whose state must not see the skipped micro-steps).
    every_k: micro-steps per update (>= 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> tx = optax_paged.accumulate_gradients(
    ...     optax_paged.paged_adamw8bit(1e-3), every_k=4)
    >>> params = {'w': jnp.ones((64, 64))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((64, 64))}, state, params)
  """
  if not isinstance(every_k, int) or every_k < 1:
    raise ValueError(f'every_k must be a positive int, got {every_k!r}.')
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    return AccumulateGradientsState(
        mini_step=jnp.zeros([], jnp.int32),
        grad_sum=jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params
        ),
        inner_state=tx.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    grad_sum = jax.tree.map(
        lambda s, g: s + g.astype(jnp.float32), state.grad_sum, updates
    )
    apply = state.mini_step == every_k - 1
    inner = functools.partial(tx.update, params=params, **extra_args)

    def do_update(_):
      mean = jax.tree.map(
          lambda s, g: (s / every_k).astype(g.dtype), grad_sum, updates
      )
      return inner(mean, state.inner_state)

    def skip_update(_):
      shapes, _ = jax.eval_shape(inner, updates, state.inner_state)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      return zeros, state.inner_state

    new_updates, inner_state = jax.lax.cond(
        apply, do_update, skip_update, None
    )
    grad_sum = jax.tree.map(
        lambda s: jnp.where(apply, jnp.zeros_like(s), s), grad_sum
    )
    return new_updates, AccumulateGradientsState(
        mini_step=jnp.where(apply, 0, state.mini_step + 1).astype(jnp.int32),
        grad_sum=grad_sum,
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
