"""optax_paged: paged, blockwise 8-bit optimizers for JAX.

Every optimizer is an ``optax.GradientTransformationExtraArgs`` whose moments
live in a state registry and are updated in place by one fused XLA FFI call
per step.
"""

from optax_paged import quantization
from optax_paged._src import reference
from optax_paged._src.accumulation import AccumulateGradientsState
from optax_paged._src.accumulation import accumulate_gradients
from optax_paged._src.adamw import adam8bit
from optax_paged._src.adamw import adamw8bit
from optax_paged._src.adamw import paged_adam
from optax_paged._src.adamw import paged_adam8bit
from optax_paged._src.adamw import paged_adamw
from optax_paged._src.adamw import paged_adamw8bit
from optax_paged._src.adamw4bit import adam4bit
from optax_paged._src.adamw4bit import adamw4bit
from optax_paged._src.adamw4bit import paged_adam4bit
from optax_paged._src.adamw4bit import paged_adamw4bit
from optax_paged._src.ademamix import ademamix8bit
from optax_paged._src.ademamix import paged_ademamix
from optax_paged._src.ademamix import paged_ademamix8bit
from optax_paged._src.allocation import allocate_state
from optax_paged._src.auto_budget import AutoBudget
from optax_paged._src.build_info import build_info
from optax_paged._src.checkpoint import load_state_dict
from optax_paged._src.checkpoint import state_dict
from optax_paged._src.lamb import lamb8bit
from optax_paged._src.lamb import paged_lamb
from optax_paged._src.lamb import paged_lamb8bit
from optax_paged._src.lars import lars8bit
from optax_paged._src.lars import paged_lars
from optax_paged._src.lars import paged_lars8bit
from optax_paged._src.lion import lion8bit
from optax_paged._src.lion import paged_lion
from optax_paged._src.lion import paged_lion8bit
from optax_paged._src.lion4bit import lion4bit
from optax_paged._src.lion4bit import paged_lion4bit
from optax_paged._src.memory_guard import MemoryGuardedStep
from optax_paged._src.memory_guard import StepAllocation
from optax_paged._src.memory_guard import memory_guarded
from optax_paged._src.paging import MemoryReport
from optax_paged._src.paging import memory_report
from optax_paged._src.paging import set_device_budget
from optax_paged._src.paging import state_nbytes
from optax_paged._src.percentile_clipping import PercentileClippingState
from optax_paged._src.percentile_clipping import percentile_clipping
from optax_paged._src.registry import REGISTRY as state_registry
from optax_paged._src.registry import MoveStats
from optax_paged._src.registry import StateBuffers
from optax_paged._src.registry import StateRegistry
from optax_paged._src.registry import free_orphans
from optax_paged._src.registry import release
from optax_paged._src.single_moment import adagrad8bit
from optax_paged._src.single_moment import rmsprop8bit
from optax_paged._src.single_moment import sgd8bit
from optax_paged._src.transform import PagedOptimizerState
from optax_paged._src.transform import apply_gradients
from optax_paged._src.transform import shard_state_over

__version__ = '0.1.0'

# Train states holding optax_paged states serialize with their moments.
from optax_paged._src import flax_serialization as _flax_serialization  # noqa: E402,I001

_flax_serialization.register()

__all__ = [
    'accumulate_gradients',
    'AccumulateGradientsState',
    'AutoBudget',
    'MemoryGuardedStep',
    'adagrad8bit',
    'adam4bit',
    'adam8bit',
    'adamw4bit',
    'adamw8bit',
    'allocate_state',
    'ademamix8bit',
    'apply_gradients',
    'build_info',
    'free_orphans',
    'lamb8bit',
    'lars8bit',
    'lion4bit',
    'lion8bit',
    'load_state_dict',
    'memory_guarded',
    'memory_report',
    'MemoryReport',
    'MoveStats',
    'paged_adam',
    'paged_adam4bit',
    'paged_adam8bit',
    'paged_adamw',
    'paged_adamw4bit',
    'paged_adamw8bit',
    'paged_ademamix',
    'paged_ademamix8bit',
    'paged_lamb',
    'paged_lamb8bit',
    'paged_lars',
    'paged_lars8bit',
    'paged_lion',
    'paged_lion4bit',
    'paged_lion8bit',
    'PagedOptimizerState',
    'percentile_clipping',
    'PercentileClippingState',
    'quantization',
    'reference',
    'release',
    'rmsprop8bit',
    'set_device_budget',
    'shard_state_over',
    'sgd8bit',
    'state_dict',
    'state_nbytes',
    'state_registry',
    'StateBuffers',
    'StateRegistry',
    'StepAllocation',
]
