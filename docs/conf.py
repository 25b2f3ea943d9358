"""Sphinx configuration: the API reference from the docstrings, the guides
from the README's sections (so the two never drift apart)."""

import pathlib

import optax_paged
from optax_paged._src import factories
from optax_paged._src import families
from optax_paged._src.family import VARIANTS

project = 'optax_paged'
release = optax_paged.__version__
extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',  # the docstrings' Google style, as optax's
    'myst_parser',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
exclude_patterns = ['_build', '_optimizer_list.rst']
# The optimizer list is included, so its file is scanned by name.
autosummary_generate = ['api.rst', '_optimizer_list.rst']
templates_path = ['_templates']
autodoc_typehints = 'description'
# Types beside the documented arguments (a class's fields are documented as
# its Attributes, not again as constructor parameters).
autodoc_typehints_description_target = 'documented_params'
# Aliases as the annotations name them (the factories and reference keep
# their annotations as strings), not expanded into long unions.
autodoc_type_aliases = {
    f'{module}.{alias}': f'optax.{alias}'
    for module in ('base', 'optax')
    for alias in ('ScalarOrSchedule', 'Params', 'Updates', 'OptState')
}
autodoc_member_order = 'bysource'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes sections as fields: NamedTuple fields are documented once.
napoleon_use_ivar = True


def _skip_tuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields, documented under Attributes, get no entries of
  their own ("Alias for field number 0")."""
  del app, what, name, options
  return True if type(obj).__name__ == '_tuplegetter' else skip


def setup(app):
  app.connect('autodoc-skip-member', _skip_tuple_fields)


myst_heading_anchors = 3
suppress_warnings = [
    # README sections start at ## or ### under each guide's title.
    'myst.header',
    # The README links files of the repository (benchmarks/RESULTS.md,
    # examples/...), which are not pages of this site.
    'myst.xref_missing',
]
html_theme = 'alabaster'
# A reference to one of our public names that does not resolve fails the
# build; references to other packages (jax, optax, numpy) are not resolved
# offline, and private helper types (optax_paged._src) have no pages.
nitpicky = True
nitpick_ignore_regex = [
    (r'py:.*', r'(?!optax_paged\b).*'),
    (r'py:.*', r'optax_paged\._src\..*'),
]

# api.rst includes the optimizer factories as the family table makes them,
# one section a family, so that a new optimizer needs no line here.
def _optimizer_list() -> str:
  lines = ['.. currentmodule:: optax_paged', '']
  listed = []
  for family in families.FAMILIES.values():
    names = [VARIANTS[key].factory_name(family) for key in family.variants]
    listed += names
    lines += [family.title, '~' * len(family.title), '',
              '.. autosummary::', '   :toctree: _autosummary', '']
    lines += [f'   {name}' for name in names] + ['']
  assert sorted(listed) == sorted(factories.FACTORIES), 'a factory unlisted'
  return '\n'.join(lines)


(pathlib.Path(__file__).parent / '_optimizer_list.rst').write_text(
    _optimizer_list())
