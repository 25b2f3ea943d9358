"""LAMB and LARS on the TPU path: the kernel in Pallas' TPU interpreter,
the trust ratio around it (trust_ratio), against the registry's CPU path.

The comparison is tpu_kernel_test's ``run_both``: parameters to 4 ulps and
moments to rounding (codes equal but for neighbours at a midpoint). The
interpreter runs the kernel's arithmetic as XLA:CPU compiles it, which
contracts FMAs the C++ kernel does not (docs/tpu.md, "Bitwise equality"),
so the kernel's directions differ by an ulp; the ratio's norms, computed in
XLA on both paths from those directions, then differ by an ulp too, and the
update (lr times the ratio times the direction: 1e-3 of a parameter at
most) by a few ulps of itself, far under the parameter's ulp.

Not here: a mesh. The step runs in the global view (only the kernel runs
per shard under ``shard_map``), so the norms are of whole leaves by
construction; a 4-device run would cost the suite more than this file.
"""

import jax.numpy as jnp
import pytest

import optax_paged
from optax_paged._src import tpu_transform
from optax_paged._src.tpu_state import TpuState
from tests import helpers
from tests import tpu_kernel_test

# On the CPU on any host: the comparisons hold as XLA:CPU rounds.
pytestmark = pytest.mark.usefixtures('on_cpu')


def _no_decay_on_small(params):
  return {k: v.ndim > 1 for k, v in params.items()}


def _no_ratio_on_leaf1(params):
  return {k: k != 'leaf1' for k in params}


CASES = [
    pytest.param(optax_paged.lamb8bit,
                 dict(weight_decay=0.01, mask=_no_decay_on_small),
                 id='lamb-optax'),
    pytest.param(optax_paged.paged_lamb8bit,
                 dict(weight_decay=0.01, trust_ratio='bitsandbytes',
                      max_unorm=0.5),
                 id='paged_lamb-bitsandbytes'),
    pytest.param(optax_paged.lars8bit,
                 dict(weight_decay=1e-4, trust_ratio_mask=_no_ratio_on_leaf1,
                      mask=_no_decay_on_small, trust_coefficient=0.02),
                 id='lars-optax'),
    pytest.param(optax_paged.lars8bit,
                 # A bound under the momentum's norm (0.01 gradients for
                 # unit parameters), so that the clip acts.
                 dict(weight_decay=1e-4, trust_ratio='bitsandbytes',
                      trust_ratio_mask=_no_ratio_on_leaf1, max_unorm=0.005),
                 id='lars-bitsandbytes'),
]


@pytest.mark.parametrize('factory, kwargs', CASES)
def test_as_the_cpu_path(factory, kwargs):
  tpu_kernel_test.run_both(factory, jnp.float32, steps=3, **kwargs)


def test_selected():
  params = helpers.random_tree([(64, 512), (100,)])
  with tpu_transform.force('interpret'):
    txs = [optax_paged.lamb8bit(1e-3), optax_paged.paged_lamb8bit(1e-3),
           optax_paged.lars8bit(0.1),
           optax_paged.paged_lars8bit(0.1, trust_ratio='bitsandbytes')]
  for tx in txs:
    assert isinstance(tx.init(params), TpuState)


@pytest.mark.parametrize('factory, kwargs', [
    pytest.param(optax_paged.lamb8bit, dict(weight_decay=0.01), id='lamb'),
    pytest.param(optax_paged.lars8bit, dict(weight_decay=1e-4), id='lars'),
])
def test_fused_step_is_update_and_apply(factory, kwargs):
  # bfloat16: the directions stay float32 until the scaled update is
  # rounded, on both the fused and the plain step.
  params = helpers.random_tree([(64, 512), (100,)], jnp.bfloat16)
  helpers.assert_fused_is_update_and_apply(
      tpu_kernel_test.tpu_optimizer(factory, 1e-3, **kwargs), params,
      helpers.random_grads(params, seed=1))


def test_compiled_path_takes_float16():
  # The kernel runs on float32 copies of the leaves (the directions are
  # scaled in float32), so float16 parameters, which the other optimizers'
  # compiled kernels refuse (Mosaic has no float16 vectors), are taken.
  params = {'w': jnp.ones((64, 512), jnp.float16)}
  with tpu_transform.force('tpu'):
    tx = optax_paged.lamb8bit(1e-3)
  assert isinstance(tx.init(params), TpuState)


def test_stochastic_rounding_is_refused():
  params = helpers.random_tree([(64, 512)])
  tx = tpu_kernel_test.tpu_optimizer(optax_paged.lamb8bit, 1e-3)
  with pytest.raises(ValueError, match='stochastic_rounding'):
    optax_paged.apply_gradients(tx, params, tx.init(params), params,
                                stochastic_rounding=True)
