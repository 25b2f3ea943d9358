"""optax_paged: paged, blockwise 8-bit optimizers for JAX.

Every optimizer is an ``optax.GradientTransformationExtraArgs`` whose moments
live in a state registry and are updated in place by one fused XLA FFI call
per step.
"""

from optax_paged import quantization
from optax_paged._src import reference
from optax_paged._src.accumulation import AccumulateGradientsState
from optax_paged._src.accumulation import accumulate_gradients
from optax_paged._src.adamw import adamw8bit
from optax_paged._src.adamw import paged_adamw8bit
from optax_paged._src.checkpoint import load_state_dict
from optax_paged._src.checkpoint import state_dict
from optax_paged._src.paging import MemoryReport
from optax_paged._src.paging import memory_report
from optax_paged._src.paging import set_device_budget
from optax_paged._src.registry import REGISTRY as state_registry
from optax_paged._src.registry import StateBuffers
from optax_paged._src.registry import StateRegistry
from optax_paged._src.registry import release
from optax_paged._src.transform import PagedOptimizerState
from optax_paged._src.transform import apply_gradients

__version__ = '0.1.0'

__all__ = [
    'AccumulateGradientsState',
    'MemoryReport',
    'PagedOptimizerState',
    'StateBuffers',
    'StateRegistry',
    'accumulate_gradients',
    'adamw8bit',
    'apply_gradients',
    'load_state_dict',
    'memory_report',
    'paged_adamw8bit',
    'quantization',
    'reference',
    'release',
    'set_device_budget',
    'state_dict',
    'state_registry',
]
