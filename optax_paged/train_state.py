"""A Flax Linen train state that takes the fused optax_paged step.

Imported on its own (``from optax_paged.train_state import FusedTrainState``)
so that optax_paged does not need Flax.
"""

from __future__ import annotations

from typing import Any

from flax.training import train_state

from optax_paged._src.transform import apply_gradients


class FusedTrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` whose ``apply_gradients`` runs
  ``optax_paged.apply_gradients``: the optimizer writes the new parameters
  in one pass (in place when the state is donated to ``jax.jit``), with the
  same results as the plain ``TrainState``.

  ``tx`` must be an optax_paged optimizer itself (not a chain).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax_paged
    >>> from optax_paged.train_state import FusedTrainState
    >>> model = nn.Dense(64)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 64)))
    >>> state = FusedTrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=optax_paged.paged_adamw8bit(1e-3))
    >>> state = state.apply_gradients(grads=params)
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> FusedTrainState:
    """The fused step: ``optax_paged.apply_gradients(tx, grads, ...)``.

    Args:
      grads: gradients with the structure of ``params``.
      **kwargs: other fields to replace, as ``TrainState.apply_gradients``.

    Returns:
      The train state one step on: ``step + 1``, the new ``params`` and
      ``opt_state``.
    """
    params, opt_state = apply_gradients(
        self.tx, grads, self.opt_state, self.params
    )
    return self.replace(
        step=self.step + 1, params=params, opt_state=opt_state, **kwargs
    )
