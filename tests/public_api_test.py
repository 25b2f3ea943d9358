"""Every public name imports and is what it claims to be."""

import optax

import optax_paged


def test_every_public_name_imports():
  for name in optax_paged.__all__:
    assert getattr(optax_paged, name) is not None, name


def test_factories_return_optax_transformations():
  for factory in (optax_paged.paged_adamw8bit, optax_paged.adamw8bit,
                  optax_paged.reference.adamw8bit):
    assert isinstance(factory(1e-3), optax.GradientTransformationExtraArgs)
