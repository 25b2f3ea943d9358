"""The README's "Many devices" recipes run as written, on 4 CPU devices."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _recipes() -> list[str]:
  text = (ROOT / 'README.md').read_text()
  section = text[text.index('## Many devices'):text.index('## How it works')]
  return re.findall(r'```python\n(.*?)```', section, flags=re.S)


def test_the_section_has_recipes():
  assert len(_recipes()) >= 3


@pytest.mark.parametrize('index', range(len(_recipes())))
def test_recipe_runs_as_written(index):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run(
      [sys.executable, '-c', _recipes()[index]], capture_output=True,
      text=True, timeout=300, env=env, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-4000:]
