"""The README's "Many devices" recipes run as written, on 4 CPU devices."""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs each recipe read from stdin as a script of its own (a fresh
# namespace, named __main__) in one interpreter, so that the recipes share
# one start of JAX; a recipe that raises gives its traceback and the next
# runs.
_RUNNER = '''
import json, sys, traceback
results = []
for code in json.loads(sys.stdin.read()):
    try:
        exec(compile(code, '<recipe>', 'exec'), {'__name__': '__main__'})
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc())
print('RECIPE RESULTS ' + json.dumps(results))
'''


def _recipes() -> list[str]:
  text = (ROOT / 'README.md').read_text()
  section = text[text.index('## Many devices'):text.index('## How it works')]
  return re.findall(r'```python\n(.*?)```', section, flags=re.S)


@functools.cache
def run_recipes(xla_flags: str) -> tuple[int, str, list]:
  """(exit status, stderr, one traceback or None a recipe) on the CPU."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  result = subprocess.run(
      [sys.executable, '-c', _RUNNER], input=json.dumps(_recipes()),
      capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  lines = [line for line in result.stdout.splitlines()
           if line.startswith('RECIPE RESULTS ')]
  results = json.loads(lines[-1][len('RECIPE RESULTS '):]) if lines else []
  return result.returncode, result.stderr, results


def assert_recipe_ran(index: int, xla_flags: str) -> None:
  code, stderr, results = run_recipes(xla_flags)
  assert code == 0 and len(results) == len(_recipes()), stderr[-4000:]
  assert results[index] is None, results[index][-4000:]


def test_the_section_has_recipes():
  assert len(_recipes()) >= 3


@pytest.mark.parametrize('index', range(len(_recipes())))
def test_recipe_runs_as_written(index):
  assert_recipe_ran(index, '--xla_force_host_platform_device_count=4')
