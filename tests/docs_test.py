"""The documentation site builds, warnings as errors (broken references)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_build_without_warnings(tmp_path):
  # In the test extra (CI installs it); a machine without a package index
  # (the GPU check) may lack it.
  pytest.importorskip('sphinx')
  pytest.importorskip('myst_parser')
  result = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
       'html', '-d', str(tmp_path / 'doctrees'), str(ROOT / 'docs'),
       str(tmp_path / 'html')],
      capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  api = (tmp_path / 'html' / '_autosummary' / 'optax_paged.adamw8bit.html')
  assert 'Nesterov' in api.read_text()
  guide = (tmp_path / 'html' / 'checkpoints.html').read_text()
  assert 'Orbax' in guide
