"""The documentation site builds, warnings as errors (broken references),
and every public name has a page with an example."""

import html
import importlib.util
import inspect
import pathlib
import re
import sys
import tempfile

import pytest

import optax_paged
from optax_paged._src import factories
from tests import background

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Public names with a page besides optax_paged.__all__: the Flax train state,
# imported on its own so that optax_paged does not need Flax.
EXTRA_PAGES = ('train_state.FusedTrainState',)
PAGES = ('api.html', 'checkpoints.html', 'examples.html')


def _build_docs():
  """Sphinx's exit status and stderr, and the text of the pages read below."""
  if not all(importlib.util.find_spec(m) for m in ('sphinx', 'myst_parser')):
    return None  # the test skips
  with tempfile.TemporaryDirectory(prefix='optax_paged_docs_') as out:
    out = pathlib.Path(out)
    result = background.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
         'html', '-d', str(out / 'doctrees'), str(ROOT / 'docs'),
         str(out / 'html')],
        timeout=300)
    html = out / 'html'
    pages = {str(path.relative_to(html)): path.read_text()
             for path in html.glob('_autosummary/*.html')}
    pages.update((name, (html / name).read_text()) for name in PAGES
                 if (html / name).exists())
    images = sorted(path.name for path in html.glob('_images/*'))
  return result.returncode, result.stderr, pages, images


# The build runs beside the other tests (tests/background.py).
BACKGROUND_JOBS = {
    'docs-build': (_build_docs, ['test_docs_build_without_warnings',
                                 'test_every_public_name_has_a_page',
                                 'test_types_render_as_their_aliases',
                                 'test_reference_page_documents_its_members',
                                 'test_api_index_is_grouped',
                                 'test_examples_page_shows_the_examples']),
}


def _built():
  # In the test extra (CI installs it); a machine without a package index
  # (the GPU check) may lack it.
  pytest.importorskip('sphinx')
  pytest.importorskip('myst_parser')
  code, stderr, pages, images = background.result('docs-build', _build_docs)
  assert code == 0, stderr[-5000:]
  return pages, images


def _text(page: str) -> str:
  """A page's text: markup removed, entities decoded, whitespace collapsed."""
  return ' '.join(html.unescape(re.sub(r'<[^>]+>', '', page)).split())


def test_docs_build_without_warnings():
  pages, _ = _built()
  assert 'Nesterov' in pages['_autosummary/optax_paged.adamw8bit.html']
  assert 'Orbax' in pages['checkpoints.html']


@pytest.mark.parametrize('name', sorted(optax_paged.__all__) +
                         list(EXTRA_PAGES))
def test_every_public_name_has_a_page(name):
  pages, _ = _built()
  page = pages.get(f'_autosummary/optax_paged.{name}.html')
  assert page is not None, f'no page for optax_paged.{name} (docs/api.rst)'
  # napoleon renders a docstring's "Example:" section as this rubric.
  assert 'rubric">Example' in page, f'optax_paged.{name} has no example'


def test_types_render_as_their_aliases():
  pages, _ = _built()
  expanded = 'number | bool | int | float | complex'
  for name, alias in [('adamw8bit', 'optax.ScalarOrSchedule'),
                      ('paged_lion8bit', 'optax.ScalarOrSchedule'),
                      ('apply_gradients', 'optax.Params'),
                      ('load_state_dict', 'optax.OptState'),
                      ('AccumulateGradientsState', 'optax.Updates'),
                      ('reference', 'optax.ScalarOrSchedule')]:
    text = _text(pages[f'_autosummary/optax_paged.{name}.html'])
    assert alias in text, name
    assert expanded not in text, name


def test_reference_page_documents_its_members():
  pages, _ = _built()
  text = _text(pages['_autosummary/optax_paged.reference.html'])
  for member in ('adamw8bit', 'reference_transformation', 'spec',
                 'ReferenceState', 'QuantizedMoment', 'FourBitMoment'):
    assert f'optax_paged.reference.{member}' in text, member


def test_api_index_is_grouped():
  pages, _ = _built()
  text = _text(pages['api.html'])
  sections = ['Optimizers', 'AdamW', 'Lion', 'LARS', 'Steps and wrappers',
              'State and memory', 'Checkpoints', 'Train states',
              'Quantization and the reference', 'Utilities']
  positions = [text.find(f'{section}¶') for section in sections]
  assert -1 not in positions, dict(zip(sections, positions, strict=True))
  assert positions == sorted(positions)


def test_examples_page_shows_the_examples():
  pages, images = _built()
  text = _text(pages['examples.html'])
  for script in sorted((ROOT / 'examples').glob('*.py')):
    assert script.name in text, script.name
    # The source itself, not only its name.
    assert script.read_text().splitlines()[0].strip('"') in text, script.name
  tracked = sorted(p.name for p in (ROOT / 'examples').glob('*.png'))
  for png in tracked:
    assert any(image.startswith(png[:-4]) for image in images), png


def test_every_factory_argument_is_documented():
  for name, factory in factories.FACTORIES.items():
    for argument in inspect.signature(factory).parameters:
      assert f'\n  {argument}: ' in factory.__doc__, (name, argument)
