"""optax_paged: paged, blockwise 8-bit optimizers for JAX.

Every optimizer is an ``optax.GradientTransformationExtraArgs`` whose moments
live in a state registry and are updated in place by one fused XLA FFI call
per step.

Importing the package registers ``OptimizerState`` with
``flax.serialization``, so that ``to_state_dict`` / ``from_state_dict`` of a
train state holding one save and restore its moments.
"""

import importlib
import warnings

from optax_paged import quantization
from optax_paged._src import reference
from optax_paged._src.accumulation import AccumulateGradientsState
from optax_paged._src.accumulation import accumulate_gradients
from optax_paged._src.allocation import allocate_state
from optax_paged._src.auto_budget import AutoBudget
from optax_paged._src.build_info import build_info
from optax_paged._src.checkpoint import load_state_dict
from optax_paged._src.checkpoint import state_dict
from optax_paged._src.factories import FACTORIES as _FACTORIES
from optax_paged._src.master_params import master_params
from optax_paged._src.memory_guard import MemoryGuardedStep
from optax_paged._src.memory_guard import StepAllocation
from optax_paged._src.memory_guard import memory_guarded
from optax_paged._src.paging import MemoryReport
from optax_paged._src.paging import memory_report
from optax_paged._src.paging import set_device_budget
from optax_paged._src.paging import state_nbytes
from optax_paged._src.percentile_clipping import PercentileClippingState
from optax_paged._src.percentile_clipping import percentile_clipping
from optax_paged._src.registry import free_orphans
from optax_paged._src.registry import release
from optax_paged._src.transform import OptimizerState
from optax_paged._src.transform import apply_gradients
from optax_paged._src.transform import shard_state_over

# The optimizer factories (adamw8bit, paged_adamw8bit, ...), one per family
# and storage variant of the table in optax_paged/_src/families.py.
globals().update(_FACTORIES)

__version__ = '0.1.0'

# Train states holding optax_paged states serialize with their moments.
from optax_paged._src import flax_serialization as _flax_serialization  # noqa: E402,I001

_flax_serialization.register()

__all__ = [
    'AccumulateGradientsState',
    'AutoBudget',
    'MemoryGuardedStep',
    'MemoryReport',
    'OptimizerState',
    'PercentileClippingState',
    'StepAllocation',
    'accumulate_gradients',
    'allocate_state',
    'apply_gradients',
    'build_info',
    'free_orphans',
    'load_state_dict',
    'master_params',
    'memory_guarded',
    'memory_report',
    'percentile_clipping',
    'quantization',
    'reference',
    'release',
    'set_device_budget',
    'shard_state_over',
    'state_dict',
    'state_nbytes',
]
__all__ += sorted(_FACTORIES)

# Names of earlier releases, importable with a DeprecationWarning until the
# next one: (where the object lives now, what to use instead).
_DEPRECATED = {
    'PagedOptimizerState': (
        'optax_paged._src.transform:OptimizerState',
        'optax_paged.OptimizerState (the state of every optax_paged '
        'optimizer, paged or not)'),
    'StateBuffers': ('optax_paged._src.registry:StateBuffers',
                     "an optimizer state's .buffers"),
    'StateRegistry': ('optax_paged._src.registry:StateRegistry',
                      'optax_paged.memory_report(state), state_nbytes(state) '
                      'and free_orphans()'),
    'state_registry': ('optax_paged._src.registry:REGISTRY',
                       'optax_paged.memory_report(state), '
                       'state_nbytes(state) and free_orphans()'),
    'MoveStats': ('optax_paged._src.registry:MoveStats',
                  'optax_paged.memory_report(state).moves'),
}


def __getattr__(name: str):
  if name not in _DEPRECATED:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  where, instead = _DEPRECATED[name]
  module, attribute = where.split(':')
  warnings.warn(
      f'optax_paged.{name} is deprecated and leaves the public namespace in '
      f'the next release; use {instead}.', DeprecationWarning, stacklevel=2)
  return getattr(importlib.import_module(module), attribute)
