"""Constants, type aliases and shared messages of optax_paged."""

from typing import Any

import jax
import optax

Params = optax.Params
Updates = optax.Updates
OptState = optax.OptState
ScalarOrSchedule = optax.ScalarOrSchedule
PyTree = Any

# bitsandbytes >= 0.44 blockwise optimizers: blocks of 256, fp32 absmax.
BLOCK_SIZE = 256
# bitsandbytes keeps fp32 state for tensors under 4096 elements.
MIN_8BIT_SIZE = 4096
# Version of the state_dict layout; bump when the stored arrays change.
# 2: the checksum covers the step count; states on a mesh.
FORMAT_VERSION = 2
# Versions load_state_dict still reads (1: the checksum skips the count).
READABLE_FORMAT_VERSIONS = (1, 2)

NO_PARAMS_MSG = (
    'optax_paged optimizers need the parameters: call '
    'tx.update(updates, state, params).'
)

ABSTRACT_STATE_MSG = (
    'this optimizer state was made by tx.init under a JAX transformation '
    '(jax.jit, jax.eval_shape, ...) and owns no buffers yet. Allocate them '
    'with opt_state = optax_paged.allocate_state(opt_state, params) (any '
    'pytree holding the state, e.g. a Flax TrainState, with the concrete '
    'parameters), or call tx.init outside jax.jit.'
)

RELEASED_STATE_MSG = (
    'this optimizer state was released (optax_paged.release or garbage '
    'collection of every state that referred to it); create a new one with '
    'tx.init(params).'
)


def is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)
