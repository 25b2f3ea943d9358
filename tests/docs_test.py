"""The documentation site builds, warnings as errors (broken references)."""

import importlib.util
import pathlib
import sys
import tempfile

import pytest

from tests import background

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
    pages = {
        name: (out / 'html' / name).read_text()
        for name in ('_autosummary/optax_paged.adamw8bit.html',
                     'checkpoints.html')
        if (out / 'html' / name).exists()
    }
  return result.returncode, result.stderr, pages


# The build runs beside the other tests (tests/background.py).
BACKGROUND_JOBS = {
    'docs-build': (_build_docs, ['test_docs_build_without_warnings']),
}


def test_docs_build_without_warnings():
  # In the test extra (CI installs it); a machine without a package index
  # (the GPU check) may lack it.
  pytest.importorskip('sphinx')
  pytest.importorskip('myst_parser')
  code, stderr, pages = background.result('docs-build', _build_docs)
  assert code == 0, stderr[-5000:]
  assert 'Nesterov' in pages['_autosummary/optax_paged.adamw8bit.html']
  assert 'Orbax' in pages['checkpoints.html']
