"""bitsandbytes' percentile clipping, as an optax transformation to chain."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# bitsandbytes keeps the last 100 gradient norms of each tensor.
HISTORY = 100


class PercentileClippingState(NamedTuple):
  """State of :func:`percentile_clipping`.

  Attributes:
    count: steps taken so far, int32.
    history: per leaf, float32[100]: the squared gradient norms of the last
      100 steps, at ``step % 100`` (steps count from 1).

  Example:
    >>> import jax.numpy as jnp, optax_paged
    >>> clip = optax_paged.percentile_clipping(5)
    >>> grads = {'w': jnp.full((3, 4), 2.0)}
    >>> state = clip.init(grads)
    >>> _, state = clip.update(grads, state)
    >>> int(state.count), float(state.history['w'][1])  # |g|^2 at step 1
    (1, 48.0)
  """

  count: jax.Array
  history: Any


def percentile_clipping(percentile: int = 5) -> optax.GradientTransformation:
  """Clips each gradient leaf's norm to a percentile of its last 100 norms.

  bitsandbytes' ``percentile_clipping`` option of its optimizers, as a
  transformation to chain before any optimizer: each leaf keeps the squared
  norms of its last 100 gradients (all 100 set to the first step's), and a
  gradient whose norm exceeds the ``percentile``-th smallest of them is
  scaled down to it. It adapts the clipping threshold to the run instead of
  fixing one (``optax.clip_by_global_norm``). bitsandbytes scales the
  gradient in fp32 inside its kernel; here the scaled gradient is rounded to
  its own dtype first (no difference for fp32 gradients).

  Args:
    percentile: which of the 100 sorted past norms is the threshold, in
      [0, 100); 5 clips every gradient larger than all but the 5 smallest of
      the last 100. bitsandbytes' default of 100 means no clipping: leave
      this transformation out instead.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_paged
    >>> params = {'w': jnp.ones((64, 64))}
    >>> tx = optax.chain(optax_paged.percentile_clipping(5),
    ...                  optax_paged.adamw8bit(learning_rate=1e-3))
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((64, 64), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
  """
  if isinstance(percentile, bool) or not isinstance(percentile, int) or not (
      0 <= percentile < HISTORY):
    raise ValueError(
        f'percentile must be an int in [0, {HISTORY}), got {percentile!r}.')

  def init_fn(params):
    return PercentileClippingState(
        count=jnp.zeros([], jnp.int32),
        history=jax.tree.map(lambda _: jnp.zeros([HISTORY], jnp.float32),
                             params),
    )

  def clip_leaf(g, history, step):
    squared = jnp.sum(jnp.square(g.astype(jnp.float32)))
    history = jnp.where(step == 1, jnp.full_like(history, squared),
                        history.at[step % HISTORY].set(squared))
    norm = jnp.sqrt(squared)
    threshold = jnp.sqrt(jnp.sort(history)[percentile])
    scale = jnp.where(norm > threshold, threshold / norm, 1.0)
    return (g.astype(jnp.float32) * scale).astype(g.dtype), history

  def update_fn(updates, state, params=None):
    del params
    step = optax.safe_increment(state.count)
    grads, treedef = jax.tree.flatten(updates)
    pairs = [clip_leaf(g, h, step) for g, h in zip(
        grads, treedef.flatten_up_to(state.history), strict=True)]
    return (
        treedef.unflatten([g for g, _ in pairs]),
        PercentileClippingState(
            count=step, history=treedef.unflatten([h for _, h in pairs])),
    )

  return optax.GradientTransformation(init_fn, update_fn)
