"""What a row of the optimizer family table says (``families.py`` holds it).

A ``Family`` is one algorithm as users call it (AdamW, Adam, LAMB, ...): the
kernel it runs, its hyperparameters with their defaults, checks and
documentation, how they fill the kernel's hyperparameter slots, the
reference maths, its optax counterpart, and which storage ``Variant`` s it
is offered in. ``factories.py`` turns each (family, variant) pair into a
public factory function.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

# Hyperparameters by name, as the factory received them.
Values = dict[str, Any]
# (hyperparameters, count before the step, count after it) -> slot values.
SlotsFn = Callable[[Values, Any, Any], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
  """One argument of a family's factories after ``learning_rate``.

  Attributes:
    name: the argument's name.
    default: its default value.
    annotation: its type, as Python source evaluated in ``factories.py``.
    doc: its paragraph in the Args section.
    check: raises for a value the optimizer cannot run with (name, value).
    keyword_only: whether it follows the ``*`` of the signature.
  """

  name: str
  default: Any
  annotation: str
  doc: str
  check: Callable[[str, Any], None] | None = None
  keyword_only: bool = False

  def replace(self, **changes: Any) -> 'Hyperparameter':
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Variant:
  """A way of storing the state, shared by every family offering it.

  Attributes:
    key: the variant's name in a family's ``variants``.
    pattern: the factory's name, from the family's (``{}``).
    quantized: whether large leaves keep quantized moments.
    code_bits: bits of a quantized moment's codes (8 or 4).
    paged: whether the state lives in managed memory with a device budget.
  """

  key: str
  pattern: str
  quantized: bool
  code_bits: int
  paged: bool

  def factory_name(self, family: 'Family') -> str:
    return self.pattern.format(family.name)


VARIANTS = {
    variant.key: variant for variant in (
        Variant('8bit', '{}8bit', True, 8, False),
        Variant('paged_8bit', 'paged_{}8bit', True, 8, True),
        Variant('paged_32bit', 'paged_{}', False, 32, True),
        Variant('4bit', '{}4bit', True, 4, False),
        Variant('paged_4bit', 'paged_{}4bit', True, 4, True),
    )
}


@dataclasses.dataclass(frozen=True)
class Family:
  """One row of the family table.

  Attributes:
    name: the factories' stem (``adamw`` gives ``adamw8bit``, ...).
    kernel: the kernel table's optimizer (``ffi/optimizer_math.h``) whose
      update runs the step.
    title: the algorithm's name in prose.
    hyperparameters: the arguments after ``learning_rate``, in order.
    slots: the kernel's hyperparameter slots from the arguments.
    variants: the keys of ``VARIANTS`` it is offered in.
    state_name: the optimizer its states belong to (updates and
      checkpoints refuse a state of another); ``name`` when empty.
    state_words: what its state holds, in prose (``moments``).
    maths: the docstring paragraph giving the update.
    notes: further docstring paragraphs (options, differences from peers).
    references: the docstring's References section, without its title.
    example: the example call's arguments after the factory's name.
    optax: the optax counterpart as a dotted name (``optax.adamw``) taking
      the same arguments, or '' when there is none.
    initial_values: the value each moment starts from, from the arguments.
    spec: builds the ``transform.OptimizerSpec`` itself (a trust ratio
      around the kernel); None for the plain one from ``slots``.
    reference_update: the kernel's element update in ``jax.numpy``, for
      families whose ``name`` is their ``kernel``.
    check: raises for a combination of arguments (after each one's check).
  """

  name: str
  kernel: str
  title: str
  hyperparameters: tuple[Hyperparameter, ...]
  slots: SlotsFn
  variants: tuple[str, ...]
  state_name: str = ''
  state_words: str = 'moments'
  maths: str = ''
  notes: str = ''
  references: str = ''
  example: str = 'learning_rate=1e-3'
  optax: str = ''
  initial_values: Callable[[Values], tuple[Any, ...]] | None = None
  spec: Callable[[Values], Any] | None = None
  reference_update: Callable[..., Any] | None = None
  check: Callable[[Values], None] | None = None

  def factory_names(self) -> list[str]:
    return [VARIANTS[v].factory_name(self) for v in self.variants]

