"""Every factory judges its constants alike, whatever their numeric type."""

import inspect

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged
from optax_paged._src import factories

FACTORIES = sorted(
    name for name in optax_paged.__all__
    if callable(getattr(optax_paged, name))
    and 'learning_rate' in inspect.signature(getattr(optax_paged, name))
    .parameters)

NAN, INF = float('nan'), float('inf')
# The values each kind of argument must refuse.
BAD = {
    'finite': [NAN, INF, -INF],
    'rate': [-0.1, 1.0, 1.5, NAN],
    'closed_rate': [-0.1, 1.5, NAN],
    'non_negative': [-1.0, NAN, INF],
    'size': [-1.0, 1.5, NAN],
    'budget': [-1.0, 1.5, NAN],
}
KINDS = {
    'learning_rate': 'finite', 'weight_decay': 'finite', 'alpha': 'finite',
    'b1': 'rate', 'b2': 'rate', 'b3': 'rate', 'decay': 'rate',
    'momentum': 'rate', 'eps': 'non_negative', 'eps_root': 'non_negative',
    'initial_accumulator_value': 'non_negative',
    'max_unorm': 'non_negative', 'trust_coefficient': 'non_negative',
    'min_8bit_size': 'size', 'device_budget': 'budget',
}
# Arguments that are not numbers (master_weight_bits is a choice of two,
# checked in master_weights_codec_test).
NOT_NUMBERS = {'mask', 'keep_32bit', 'mu_dtype', 'accumulator_dtype',
               'nesterov', 'trust_ratio', 'trust_ratio_mask',
               'master_weight_bits'}
# The same number as each type a user (or optax.inject_hyperparams) may pass.
AS_TYPES = {
    'python': float,
    'numpy': np.float32,
    'array': lambda v: jnp.asarray(v, jnp.float32),
}


def _kind(factory: str, argument: str) -> str:
  if factory.startswith(('lion', 'paged_lion')) and argument in ('b1', 'b2'):
    return 'closed_rate'  # optax.lion allows 1
  return KINDS[argument]


def _numeric_arguments(factory: str) -> list[str]:
  parameters = inspect.signature(getattr(optax_paged, factory)).parameters
  return [a for a in parameters if a not in NOT_NUMBERS]


def _make(factory: str, **kwargs):
  kwargs.setdefault('learning_rate', 1e-3)
  parameters = inspect.signature(getattr(optax_paged, factory)).parameters
  if 'max_unorm' in kwargs and 'trust_ratio' in parameters:
    kwargs['trust_ratio'] = 'bitsandbytes'  # its only owner
  return getattr(optax_paged, factory)(**kwargs)


TABLE = [
    (factory, argument, value, as_type)
    for factory in FACTORIES
    for argument in _numeric_arguments(factory)
    for value in BAD[_kind(factory, argument)]
    # A budget's meaning depends on int or float: it takes Python numbers.
    for as_type in (('python',) if argument == 'device_budget' else AS_TYPES)
]


def test_every_numeric_argument_has_a_kind():
  # A new argument joins the table by naming its kind here.
  unknown = {(f, a) for f in FACTORIES for a in _numeric_arguments(f)
             if a not in KINDS}
  assert not unknown
  # Every factory of the table is exported and found here.
  assert FACTORIES == sorted(factories.FACTORIES)


@pytest.mark.parametrize('factory, argument, value, as_type', TABLE)
def test_bad_constant_is_refused_at_the_factory(factory, argument, value,
                                                as_type):
  bad = AS_TYPES[as_type](value)
  with pytest.raises(ValueError, match=argument):
    _make(factory, **{argument: bad})


@pytest.mark.parametrize('factory', FACTORIES)
@pytest.mark.parametrize('as_type', AS_TYPES)
def test_good_constants_of_any_numeric_type_are_accepted(factory, as_type):
  good = {'learning_rate': -1e-3,  # ascent, allowed as in optax
          'weight_decay': 0.0, 'alpha': 2.0, 'b1': 0.0, 'b2': 0.5,
          'b3': 0.9, 'decay': 0.9, 'momentum': 0.9, 'eps': 0.0,
          'eps_root': 0.0, 'initial_accumulator_value': 0.0,
          'trust_coefficient': 0.01, 'min_8bit_size': 0.0}
  if 'adabelief' in factory:
    # With b1 = 0 the gap g - m is 0, so eps = 0 divides 0 by 0 (as in
    # optax.adabelief): the boundary is the other rate's.
    good['b1'] = 0.5
  arguments = _numeric_arguments(factory)
  kwargs = {a: AS_TYPES[as_type](v) for a, v in good.items()
            if a in arguments}
  tx = _make(factory, **kwargs)
  params = {'w': jnp.ones((8, 8))}
  updates, _ = tx.update(params, tx.init(params), params)
  assert np.all(np.isfinite(updates['w']))


@pytest.mark.parametrize('factory', ['adamw8bit', 'lion8bit', 'sgd8bit'])
def test_schedules_are_not_evaluated_at_the_factory(factory):
  schedule = optax.linear_schedule(1e-3, 0.0, 10)
  _make(factory, learning_rate=schedule, weight_decay=schedule)


@pytest.mark.parametrize('factory', FACTORIES)
def test_optional_numbers_may_be_none(factory):
  parameters = inspect.signature(getattr(optax_paged, factory)).parameters
  _make(factory, **{a: None for a in _numeric_arguments(factory)
                    if parameters[a].default is None})


@pytest.mark.parametrize('value', ['0.9', [0.9], np.array([0.9, 0.9])])
def test_a_non_number_is_a_type_error(value):
  with pytest.raises(TypeError, match='b1 must be a number'):
    optax_paged.adamw8bit(1e-3, b1=value)


def test_a_numpy_budget_names_its_type():
  # resolve_budget tells bytes from fractions by int or float: a NumPy
  # float32 would be neither, so it is refused, naming its type.
  with pytest.raises(TypeError, match='float32'):
    optax_paged.paged_adamw8bit(1e-3, device_budget=np.float32(0.5))
