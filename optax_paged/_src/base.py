"""Constants, type aliases and shared messages of optax_paged."""

from typing import Any

import jax
import optax

Params = optax.Params
Updates = optax.Updates
OptState = optax.OptState
ScalarOrSchedule = optax.ScalarOrSchedule

# bitsandbytes >= 0.44 blockwise optimizers: blocks of 256, fp32 absmax.
BLOCK_SIZE = 256
# 4-bit states (Li et al., 2023; torchao's AdamW4bit): blocks of 128, two
# codes a byte (element 2i in the low nibble).
FOUR_BIT_BLOCK_SIZE = 128


def block_size(code_bits: int) -> int:
  """Elements per quantization block of ``code_bits``-bit codes (8 or 4)."""
  return FOUR_BIT_BLOCK_SIZE if code_bits == 4 else BLOCK_SIZE


def code_bytes(size: int, code_bits: int) -> int:
  """Bytes of one moment's codes for ``size`` elements."""
  return -(-size // 2) if code_bits == 4 else size


# An fp32 moment's bytes per element, the most any state format takes.
FP32_MOMENT_BYTES = 4
# A leaf's state may take at most 2^48 bytes (256 TiB): beyond the memory of
# any machine, and far enough below 2^63 that no size or offset in bytes
# overflows the registry's int64 arithmetic.
MAX_LEAF_STATE_BYTES = 2**48

# bitsandbytes keeps fp32 state for tensors under 4096 elements.
MIN_8BIT_SIZE = 4096
# Version of the state_dict layout; bump when the stored arrays change.
# 2: the checksum covers the step count; states on a mesh.
# 3: Flax's export of the buffers field carries the moments' step (it was 0).
# 4: 'code_bits' (8 or 4; absent before, meaning 8); a 4-bit state's
#    block_size and maps are the 4-bit ones.
# 5: a leaf with master weights has 'master': its 'correction' and
#    'fingerprints' (the reset count last), covered by the checksums.
FORMAT_VERSION = 5
# Versions load_state_dict still reads (1: the checksum skips the count).
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4, 5)

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

STALE_STATE_MSG = (
    '{name}: this state\'s count is {count} but its moments are at step '
    '{step}: the count and the moments come from different points of '
    'training (a count restored without its moments, e.g. by nnx.update or '
    'Orbax on nnx.state(optimizer); a state reset with jax.tree.map, which '
    'resets only the count; an older copy of a state stepped again after a '
    'newer one; or a wrapper that runs the update and discards its result, '
    'as optax.MultiSteps does). The moments were left as they were. Restore '
    'with optax_paged.load_state_dict, reset with tx.init(params), '
    'accumulate with optax_paged.accumulate_gradients, and step the state '
    'the last step returned.'
)

# optax counts steps in int32; optax.safe_increment stops at the largest.
MAX_COUNT = 2**31 - 1

COUNT_OVERFLOW_MSG = (
    '{name}: this state\'s step count is 2147483647 (2^31 - 1), the largest '
    'int32: optax counts steps in int32 and optax.safe_increment stops '
    'there, while each step must take the moments one step further, so the '
    'state cannot take another step. Its moments were left as they were. '
    'Train on with a new state from tx.init(params) (at this count the bias '
    'corrections are 1: only the moments start afresh).'
)

RELEASED_STATE_MSG = (
    'this optimizer state was released (optax_paged.release or garbage '
    'collection of every state that referred to it); create a new one with '
    'tx.init(params).'
)


def is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def value_at(value: ScalarOrSchedule, count: jax.Array) -> Any:
  """A scalar's or schedule's value for the step that starts at ``count``.

  As optax evaluates its learning rate and weight decay schedules.
  """
  return value(count) if callable(value) else value
