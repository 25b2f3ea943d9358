"""Sphinx configuration: the API reference from the docstrings, the guides
from the README's sections (so the two never drift apart)."""

import pathlib

import optax_paged
from optax_paged._src import factories

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
autodoc_member_order = 'bysource'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes sections as fields: NamedTuple fields are documented once.
napoleon_use_ivar = True
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
# so that a new optimizer needs no line here.
(pathlib.Path(__file__).parent / '_optimizer_list.rst').write_text(
    '.. currentmodule:: optax_paged\n\n'
    '.. autosummary::\n   :toctree: _autosummary\n\n'
    + ''.join(f'   {name}\n' for name in factories.FACTORIES))
