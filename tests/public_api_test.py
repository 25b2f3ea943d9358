"""Every public name imports and is what it claims to be."""

import importlib
import pathlib
import re

import optax
import pytest

import optax_paged
from optax_paged._src import factories


def test_every_public_name_imports():
  for name in optax_paged.__all__:
    assert getattr(optax_paged, name) is not None, name


def test_factories_return_optax_transformations():
  for factory in (optax_paged.paged_adamw8bit, optax_paged.adamw8bit,
                  optax_paged.reference.adamw8bit):
    assert isinstance(factory(1e-3), optax.GradientTransformationExtraArgs)


def test_every_public_name_is_in_the_api_reference():
  # The 4-bit factories were exported for a session without a page; the
  # reference lists names by hand, so this keeps it whole.
  api = (pathlib.Path(__file__).resolve().parent.parent / 'docs' / 'api.rst'
         ).read_text()
  # The optimizers' list is made from the family table (docs/conf.py).
  listed = set(re.findall(r'^   (\w+)$', api, re.MULTILINE)) | set(
      factories.FACTORIES)
  missing = sorted(set(optax_paged.__all__) - listed)
  assert not missing, missing


@pytest.mark.parametrize('name', sorted(optax_paged._DEPRECATED))
def test_names_of_earlier_releases_import_with_a_warning(name):
  assert name not in optax_paged.__all__
  with pytest.warns(DeprecationWarning, match=f'optax_paged.{name} is '):
    value = getattr(optax_paged, name)
  where, _ = optax_paged._DEPRECATED[name]
  module, attribute = where.split(':')
  assert value is getattr(importlib.import_module(module), attribute)


def test_the_old_state_class_name_still_unpickles():
  # Pickles of earlier releases name the class PagedOptimizerState.
  from optax_paged._src import transform
  assert transform.PagedOptimizerState is optax_paged.OptimizerState


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match='no attribute'):
    optax_paged.adamw9bit  # noqa: B018 - the lookup is the point
