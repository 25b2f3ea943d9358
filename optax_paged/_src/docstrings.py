"""The factories' docstrings, composed from the family table.

Each paragraph is written once: a family's maths and notes in its row, a
storage variant's description and the options every factory shares here.
"""

import textwrap

from optax_paged._src import base
from optax_paged._src import optimizer_table
from optax_paged._src.family import Family
from optax_paged._src.family import Variant

LEARNING_RATE = 'a scalar or an optax schedule of the step count.'
MIN_8BIT_SIZE = (
    'leaves with fewer elements keep fp32 state (4096, as bitsandbytes).')
KEEP_32BIT = (
    'parameters whose state stays fp32 whatever their size (e.g. '
    'embeddings): a tree of booleans with the structure of the parameters '
    '(or a prefix of it), or a callable returning one given the parameters.')
DEVICE_BUDGET = (
    'GPU bytes the state may occupy (an int), a fraction of the GPU memory '
    'free at init (a float in [0, 1]), None for half of it, or ``\'auto\'`` '
    "(an ``AutoBudget``) for what fits next to XLA's next step (see "
    '``set_device_budget``). 0 keeps every buffer in host RAM.')
MASTER_WEIGHT_BITS = (
    'None, or 24 or 32 to keep float32 master weights of bfloat16 and '
    'float16 parameters in the state: an 8-bit (24) or 16-bit (32) '
    'correction a parameter, from which the step rebuilds the master, '
    'updates it in float32 and writes back its rounding; 32 keeps a '
    "bfloat16 parameter's float32 master exactly. float32 leaves need "
    'none. See the guide "Training in bf16 at fp32 quality".')

EIGHT_BIT = (
    'Between steps the state is stored blockwise in 8 bits: one uint8 code '
    "per element on bitsandbytes' dynamic tree map (the signed map for "
    'moments that can be negative, the unsigned one for the others) and one '
    'fp32 absmax per block of 256 elements, {bytes} bytes a parameter '
    'instead of {fp32_bytes}; each step decodes it, updates in fp32 and '
    're-encodes it.')
FOUR_BIT = (
    'Between steps the state is stored blockwise in 4 bits: one code per '
    'element, two a byte, and one fp32 absmax per block of 128 elements, '
    '{bytes} bytes a parameter instead of {fp32_bytes}. Signed moments use '
    "bitsandbytes' ``create_dynamic_map(True, 3, 4)``, unsigned ones a "
    'linear map without zero (``1/16, 2/16, ..., 1``), so that a small '
    'second moment is never decoded as zero: the maps of Li et al. (2023) '
    "as torchao's ``AdamW4bit`` ships them.")
STOCHASTIC_FOUR_BIT = (
    'The signed codes are rounded stochastically, up with probability equal '
    "to the value's fraction of the gap between its two neighbouring "
    'entries: rounded to nearest, a momentum that moves by 1% of a gradient '
    'a step would never leave its code. The random bits are a hash of the '
    "step, the leaf and the element's index, so a step is reproducible and "
    'a mesh draws what one device draws.')
SMALL_LEAVES = (
    'Leaves with fewer than ``min_8bit_size`` elements, and those '
    '``keep_32bit`` selects, keep fp32 state.')
IN_PLACE = (
    'The state is owned by the state registry and updated in place by one '
    'fused kernel call per dtype group; it is not a leaf of the returned '
    'state.')
PAGED = (
    'The state lives in paged memory: on a GPU, CUDA managed memory, each '
    'leaf in one of two tiers: on the device (HBM speed) while '
    '``device_budget`` lasts, in host RAM beyond it, where the kernel '
    "streams it over the link in place. The budget never exceeds the GPU's "
    'free memory; ``optax_paged.set_device_budget`` changes it between '
    'steps and ``optax_paged.memory_report`` shows where every buffer is. '
    'On the CPU every tier is plain host memory.')
FP32 = 'The state is fp32, {fp32_bytes} bytes a parameter.'
EQUALS_OPTAX = 'The results equal ``{optax}``\'s to float rounding.'
FOUR_BIT_REFERENCE = (
    'Li, Chen & Zhu, `Memory Efficient Optimizers with 4-bit States '
    '<https://arxiv.org/abs/2309.01507>`_, 2023.')
RETURNS = ('An ``optax.GradientTransformationExtraArgs``; ``update`` needs '
           '``params``.')
EXAMPLE = """\
>>> import jax.numpy as jnp, optax, optax_paged
>>> params = {{'w': jnp.ones((64, 64))}}
>>> tx = optax_paged.{name}({arguments})
>>> state = tx.init(params)
>>> grads = {{'w': jnp.full((64, 64), 0.1)}}
>>> updates, state = tx.update(grads, state, params)
>>> params = optax.apply_updates(params, updates)"""


def _fill(text: str, indent: str = '') -> str:
  """``text``'s paragraphs (and bullet lists) wrapped to 76 columns."""
  out = []
  for paragraph in textwrap.dedent(text).strip().split('\n\n'):
    lines = paragraph.split('\n')
    if lines[0].startswith('- '):
      items = '\n'.join(lines).split('\n- ')
      out.append('\n'.join(
          textwrap.fill(' '.join(item.removeprefix('- ').split()), 76,
                        initial_indent=indent + '- ',
                        subsequent_indent=indent + '  ',
                        break_on_hyphens=False)
          for item in items))
    else:
      out.append(textwrap.fill(' '.join(paragraph.split()), 76,
                               initial_indent=indent, subsequent_indent=indent,
                               break_on_hyphens=False))
  return '\n\n'.join(out)


def _arg(name: str, doc: str) -> str:
  return textwrap.fill(f'{name}: {" ".join(doc.split())}', 76,
                       initial_indent='  ', subsequent_indent='    ',
                       break_on_hyphens=False)


def _bytes(value: float) -> str:
  return f'{value:.3g}'


def summary(family: Family, variant: Variant) -> str:
  """The docstring's first line."""
  if not variant.quantized:
    return f'{family.title} with fp32 state in paged memory.'
  where = ', in paged memory' if variant.paged else ''
  return (f'{family.title} with its {family.state_words} stored blockwise '
          f'in {variant.code_bits} bits{where}.')


def storage(family: Family, variant: Variant) -> str:
  """The paragraphs on how ``variant`` stores ``family``'s state."""
  row = optimizer_table.info(family.kernel)
  moments = row.num_moments
  fp32_bytes = 4 * moments
  paragraphs = []
  if variant.quantized:
    block = base.block_size(variant.code_bits)
    per_parameter = moments * (variant.code_bits / 8 + 4 / block)
    text = EIGHT_BIT if variant.code_bits == 8 else FOUR_BIT
    paragraphs.append(text.format(bytes=_bytes(per_parameter),
                                  fp32_bytes=fp32_bytes))
    if variant.code_bits == 4 and row.stochastic_four_bit:
      paragraphs.append(STOCHASTIC_FOUR_BIT)
    paragraphs.append(f'{SMALL_LEAVES} {IN_PLACE}')
  else:
    fp32 = FP32.format(fp32_bytes=fp32_bytes)
    if family.optax:
      fp32 = f'{fp32} {EQUALS_OPTAX.format(optax=family.optax)}'
    paragraphs.append(f'{fp32} {IN_PLACE}')
  if variant.paged:
    paragraphs.append(PAGED)
  return '\n\n'.join(paragraphs)


def docstring(family: Family, variant: Variant) -> str:
  """The whole docstring of ``family``'s ``variant`` factory."""
  parts = [summary(family, variant)]
  for text in (family.maths, family.notes, storage(family, variant)):
    if text:
      parts.append(_fill(text))
  args = [_arg('learning_rate', LEARNING_RATE)]
  args += [_arg(h.name, h.doc.format(optax=family.optax or 'optax.adamw'))
           for h in family.hyperparameters]
  if variant.quantized:
    args += [_arg('min_8bit_size', MIN_8BIT_SIZE),
             _arg('keep_32bit', KEEP_32BIT)]
  if variant.paged:
    args.append(_arg('device_budget', DEVICE_BUDGET))
  args.append(_arg('master_weight_bits', MASTER_WEIGHT_BITS))
  parts.append('Args:\n' + '\n'.join(args))
  parts.append('Returns:\n' + _fill(RETURNS, '  '))
  example = EXAMPLE.format(name=variant.factory_name(family),
                           arguments=family.example)
  parts.append('Example:\n' + textwrap.indent(example, '  '))
  references = [family.references] if family.references else []
  if variant.code_bits == 4:
    references.append(FOUR_BIT_REFERENCE)
  if references:
    parts.append('References:\n' + textwrap.indent('\n'.join(references),
                                                    '  '))
  return '\n\n'.join(parts)
