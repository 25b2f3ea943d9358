"""The public optimizer factories, one per (family, variant) of the table.

Each factory is a real function, defined here from generated source, so
that ``inspect.signature``, ``help()``, Sphinx and doctests see its
arguments, defaults and docstring; its body hands the arguments to
``build``. The arguments are, in order: ``learning_rate``, the family's
positional hyperparameters, then after ``*`` its keyword-only ones and the
variant's options (``min_8bit_size`` and ``keep_32bit`` when quantized,
``device_budget`` when paged, ``master_weight_bits``).
"""

from collections.abc import Callable
from typing import Any  # noqa: F401 - named by the generated annotations

import optax

from optax_paged._src import base
from optax_paged._src import docstrings
from optax_paged._src import families
from optax_paged._src import hyperparam_checks
from optax_paged._src import master_weights
from optax_paged._src import optimizer_table
from optax_paged._src import reference
from optax_paged._src import tpu_transform
from optax_paged._src import transform
from optax_paged._src.family import VARIANTS
from optax_paged._src.family import Family
from optax_paged._src.family import Hyperparameter
from optax_paged._src.family import Variant

_VARIANT_OPTIONS = {
    'min_8bit_size': Hyperparameter('min_8bit_size', base.MIN_8BIT_SIZE, 'int',
                                    docstrings.MIN_8BIT_SIZE,
                                    keyword_only=True),
    'keep_32bit': Hyperparameter('keep_32bit', None, 'Any',
                                 docstrings.KEEP_32BIT, keyword_only=True),
    'master_weight_bits': Hyperparameter(
        'master_weight_bits', None, 'int | None',
        docstrings.MASTER_WEIGHT_BITS, keyword_only=True),
    'device_budget': Hyperparameter('device_budget', None,
                                    'int | float | str | None',
                                    docstrings.DEVICE_BUDGET,
                                    keyword_only=True),
}


def arguments(family: Family, variant: Variant) -> list[Hyperparameter]:
  """The factory's arguments after ``learning_rate``, in order."""
  options = []
  if variant.quantized:
    options += [_VARIANT_OPTIONS['min_8bit_size'],
                _VARIANT_OPTIONS['keep_32bit']]
  if variant.paged:
    options.append(_VARIANT_OPTIONS['device_budget'])
  options.append(_VARIANT_OPTIONS['master_weight_bits'])
  positional = [h for h in family.hyperparameters if not h.keyword_only]
  keyword = [h for h in family.hyperparameters if h.keyword_only]
  return positional + keyword + options


def build(family: Family, variant: Variant,
          values: dict[str, Any]) -> optax.GradientTransformationExtraArgs:
  """The transformation a factory returns, from its arguments by name."""
  hyperparam_checks.finite('learning_rate', values['learning_rate'])
  for argument in family.hyperparameters:
    if argument.check is not None:
      argument.check(argument.name, values[argument.name])
  values = {**values, 'master_weight_bits': master_weights.check_bits(
      'master_weight_bits', values['master_weight_bits'])}
  if family.check is not None:
    family.check(values)
  spec = families.spec_of(family, values)
  master_weight_bits = values['master_weight_bits']
  if master_weight_bits is not None and spec.trust_ratio is not None:
    raise ValueError(
        f'{variant.factory_name(family)}: master_weight_bits is not '
        f'available with a trust ratio ({family.title}): the update is '
        'scaled after the kernel, which keeps the master weights. Use '
        'float32 parameters for a float32 master.')
  tpu_mode = tpu_transform.selected()
  if tpu_mode is not None:
    return _tpu_transformation(spec, variant, values, tpu_mode)
  return transform.make_transformation(
      spec,
      quantize=variant.quantized,
      min_8bit_size=values.get('min_8bit_size', base.MIN_8BIT_SIZE),
      keep_32bit=values.get('keep_32bit'),
      weight_decay_mask=values.get('mask'),
      paged=variant.paged,
      device_budget=values.get('device_budget'),
      code_bits=variant.code_bits if variant.quantized else 8,
      master_weight_bits=master_weight_bits,
  )


def _tpu_transformation(spec: transform.OptimizerSpec, variant: Variant,
                        values: dict[str, Any],
                        mode: str) -> optax.GradientTransformationExtraArgs:
  """The TPU path (tpu_transform): Pallas kernels on a functional state;
  the pure-JAX reference where they do not run the optimizer."""
  code_bits = variant.code_bits if variant.quantized else 8
  min_8bit_size = values.get('min_8bit_size', base.MIN_8BIT_SIZE)
  if not tpu_transform.supports(spec, code_bits):
    return reference.reference_transformation(
        spec, quantize=variant.quantized, min_8bit_size=min_8bit_size,
        weight_decay_mask=values.get('mask'), code_bits=code_bits,
        master_weight_bits=values['master_weight_bits'])
  return tpu_transform.make_transformation(
      spec, mode=mode, quantize=variant.quantized,
      min_8bit_size=min_8bit_size, weight_decay_mask=values.get('mask'),
      paged=variant.paged, device_budget=values.get('device_budget'),
      keep_32bit=values.get('keep_32bit'),
      master_weight_bits=values['master_weight_bits'], code_bits=code_bits)


def _source(name: str, args: list[Hyperparameter]) -> str:
  """Source of ``_make``, which returns a ``def`` of ``name`` calling
  ``build`` with its arguments (``_d``: their defaults, in order)."""
  # Annotations kept as written ('base.ScalarOrSchedule'), so that the docs
  # show the alias (docs/conf.py's autodoc_type_aliases), not its expansion.
  lines = ['from __future__ import annotations',
           'def _make(_d, _family, _variant):', f'  def {name}(',
           '      learning_rate: base.ScalarOrSchedule,']
  starred = False
  for i, argument in enumerate(args):
    if argument.keyword_only and not starred:
      lines.append('      *,')
      starred = True
    lines.append(f'      {argument.name}: {argument.annotation} = _d[{i}],')
  lines.append('  ) -> optax.GradientTransformationExtraArgs:')
  names = ['learning_rate'] + [argument.name for argument in args]
  lines.append('    return build(_family, _variant, dict(' + ', '.join(
      f'{n}={n}' for n in names) + '))')
  lines.append(f'  return {name}')
  return '\n'.join(lines)


def make_factory(family: Family, variant: Variant) -> Callable[..., Any]:
  """The public factory of ``family``'s ``variant``."""
  if variant.code_bits == 4 and not optimizer_table.info(
      family.kernel).four_bit:
    raise ImportError(
        f'optax_paged: the family table offers {family.name} in 4 bits, but '
        f'the kernel {family.kernel!r} has no 4-bit states (kFourBitStates '
        'in ffi/optimizer_math.h).')
  name = variant.factory_name(family)
  args = arguments(family, variant)
  # Defined in this module's namespace: doctests collect the functions
  # whose globals are their module's.
  exec(_source(name, args), globals())  # noqa: S102 - our own source
  factory = globals().pop('_make')([a.default for a in args], family,
                                   variant)
  factory.__module__ = __name__
  factory.__qualname__ = name
  factory.__doc__ = docstrings.docstring(family, variant)
  return factory


def make_all(table: dict[str, Family]) -> dict[str, Callable[..., Any]]:
  """Every factory of ``table``, by name."""
  return {
      VARIANTS[key].factory_name(family): make_factory(family, VARIANTS[key])
      for family in table.values() for key in family.variants
  }


FACTORIES = make_all(families.FAMILIES)
globals().update(FACTORIES)
