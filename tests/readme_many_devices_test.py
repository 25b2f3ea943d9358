"""The recipes of the guide "Many devices" (docs/many_devices.md) run as
written, on 4 CPU devices."""

import functools
import json
import os
import sys
from pathlib import Path

import pytest

from tests import background
from tests.readme_blocks_test import file_blocks

ROOT = Path(__file__).resolve().parent.parent

# Runs each recipe (a JSON list in argv) as a script of its own (a fresh
# namespace, named __main__) in one interpreter, so that the recipes share
# one start of JAX; a recipe that raises gives its traceback and the next
# runs.
_RUNNER = '''
import json, sys, traceback
results = []
for code in json.loads(sys.argv[1]):
    try:
        exec(compile(code, '<recipe>', 'exec'), {'__name__': '__main__'})
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc())
print('RECIPE RESULTS ' + json.dumps(results))
'''


def _recipes() -> list[str]:
  return [block.code for block in file_blocks('docs/many_devices.md')]


def _run_recipes(xla_flags: str) -> tuple[int, str, list]:
  """(exit status, stderr, one traceback or None a recipe) on the CPU."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  result = background.run(
      [sys.executable, '-c', _RUNNER, json.dumps(_recipes())],
      timeout=600, env=env, cwd=ROOT)
  lines = [line for line in result.stdout.splitlines()
           if line.startswith('RECIPE RESULTS ')]
  results = json.loads(lines[-1][len('RECIPE RESULTS '):]) if lines else []
  return result.returncode, result.stderr, results


FOUR_DEVICES = '--xla_force_host_platform_device_count=4'
# The recipes on 4 CPU devices here, on one in tests/one_device_mesh_test.py.
JOBS = {
    FOUR_DEVICES: ('readme-recipes-4-devices', 'test_recipe_runs_as_written'),
    '': ('readme-recipes-1-device', 'test_readme_recipe_runs_on_one_device'),
}


def background_job(xla_flags: str) -> dict:
  """BACKGROUND_JOBS' entry for the recipes under ``xla_flags``."""
  key, test = JOBS[xla_flags]
  return {key: (functools.partial(_run_recipes, xla_flags), [test])}


BACKGROUND_JOBS = background_job(FOUR_DEVICES)


def assert_recipe_ran(index: int, xla_flags: str) -> None:
  key, _ = JOBS[xla_flags]
  code, stderr, results = background.result(
      key, functools.partial(_run_recipes, xla_flags))
  assert code == 0 and len(results) == len(_recipes()), stderr[-4000:]
  assert results[index] is None, results[index][-4000:]


def test_the_section_has_recipes():
  assert len(_recipes()) >= 3


@pytest.mark.parametrize('index', range(len(_recipes())))
def test_recipe_runs_as_written(index):
  assert_recipe_ran(index, FOUR_DEVICES)
