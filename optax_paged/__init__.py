"""optax_paged: paged, blockwise 8-bit optimizers for JAX.

Every optimizer is an ``optax.GradientTransformationExtraArgs`` whose moments
live in a state registry and are updated in place by one fused XLA FFI call
per step.
"""

from optax_paged import quantization
from optax_paged._src import reference
from optax_paged._src.adamw import adamw8bit, paged_adamw8bit
from optax_paged._src.checkpoint import load_state_dict, state_dict
from optax_paged._src.registry import REGISTRY as state_registry
from optax_paged._src.registry import StateBuffers, StateRegistry, release
from optax_paged._src.transform import PagedOptimizerState, apply_gradients

__version__ = '0.1.0'

__all__ = [
    'PagedOptimizerState',
    'StateBuffers',
    'StateRegistry',
    'adamw8bit',
    'apply_gradients',
    'load_state_dict',
    'paged_adamw8bit',
    'quantization',
    'reference',
    'release',
    'state_dict',
    'state_registry',
]
