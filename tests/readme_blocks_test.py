"""Every ```python block of the README and the docs guides runs as written.

The blocks of one file run in order in one namespace, as a reader pastes
them into one session; each file gets a namespace of its own, and all run in
one fresh interpreter on the CPU (a background job, tests/background.py), in
a temporary working directory. A block that cannot run here is marked in the
markdown by an HTML comment on the line before its fence,
``<!-- skip: needs a GPU -->``: it is still compiled, and its test is
reported as skipped with that reason. The blocks of docs/many_devices.md run
on 4 devices (and on one) in tests/readme_many_devices_test.py.
"""

import json
import os
import pathlib
import re
import sys
import tempfile
from typing import NamedTuple

import pytest

from tests import background

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ['README.md'] + sorted(
    str(path.relative_to(ROOT)) for path in (ROOT / 'docs').glob('*.md'))
# Files whose blocks another test runs, and where.
RUN_ELSEWHERE = {
    'docs/many_devices.md': 'tests/readme_many_devices_test.py, on 4 CPU '
                            'devices and on one',
}
# Files whose blocks do not run yet: expected to fail (strict, so that the
# entry goes once they run), with the reason.
DOES_NOT_RUN_YET: dict[str, str] = {}
_FENCE = re.compile(r'^```python\n(.*?)^```', re.S | re.M)
_SKIP = re.compile(r'<!--\s*skip:\s*(.*?)\s*-->')


class Block(NamedTuple):
  """One ```python block: where it starts, its code, its skip reason."""

  line: int  # the line of its opening fence, from 1
  code: str
  skip: str | None  # the reason in a <!-- skip: ... --> marker, or None


def python_blocks(text: str) -> list[Block]:
  """The ```python blocks of a markdown text, in order."""
  blocks = []
  for match in _FENCE.finditer(text):
    before = text[:match.start()].rstrip('\n').rsplit('\n', 1)[-1]
    marker = _SKIP.fullmatch(before.strip())
    blocks.append(Block(text.count('\n', 0, match.start()) + 1,
                        match.group(1), marker.group(1) if marker else None))
  return blocks


def file_blocks(name: str) -> list[Block]:
  return python_blocks((ROOT / name).read_text())


# Runs each file's blocks (a JSON object in argv: file -> [(line, code,
# skip)]) in a namespace of its own; prints, per file, None or the
# traceback of each block ('skipped' for a marked one).
_RUNNER = '''
import json, os, sys, tempfile, traceback
os.chdir(tempfile.mkdtemp(prefix='optax_paged_blocks_'))
results = {}
for name, blocks in json.loads(sys.argv[1]).items():
    namespace = {'__name__': '__main__'}
    results[name] = []
    for line, code, skip in blocks:
        if skip is not None:
            results[name].append('skipped')
            continue
        try:
            exec(compile(code, f'{name}:{line}', 'exec'), namespace)
            results[name].append(None)
        except BaseException:
            results[name].append(traceback.format_exc())
print('BLOCK RESULTS ' + json.dumps(results))
'''


def _run_blocks() -> tuple[int, str, dict]:
  """(exit status, stderr, file -> results) of every file run here."""
  blocks = {name: [list(block) for block in file_blocks(name)]
            for name in FILES if name not in RUN_ELSEWHERE}
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  with tempfile.TemporaryDirectory(prefix='optax_paged_blocks_') as tmp:
    env['TMPDIR'] = tmp  # what the blocks write goes with it
    result = background.run(
        [sys.executable, '-c', _RUNNER, json.dumps(blocks)],
        timeout=300, env=env, cwd=ROOT)
  lines = [line for line in result.stdout.splitlines()
           if line.startswith('BLOCK RESULTS ')]
  results = json.loads(lines[-1][len('BLOCK RESULTS '):]) if lines else {}
  return result.returncode, result.stderr, results


BACKGROUND_JOBS = {
    'readme-blocks': (_run_blocks, ['test_block_runs_as_written']),
}


def _cases():
  for name in FILES:
    if name in RUN_ELSEWHERE:
      continue
    for index, block in enumerate(file_blocks(name)):
      marks = ([pytest.mark.xfail(strict=True, reason=DOES_NOT_RUN_YET[name])]
               if name in DOES_NOT_RUN_YET else [])
      yield pytest.param(name, index, id=f'{name}:{block.line}', marks=marks)


@pytest.mark.parametrize('name,index', list(_cases()))
def test_block_runs_as_written(name, index):
  block = file_blocks(name)[index]
  compile(block.code, f'{name}:{block.line}', 'exec')
  if block.skip is not None:
    pytest.skip(f'{name}:{block.line} is marked: {block.skip}')
  code, stderr, results = background.result('readme-blocks', _run_blocks)
  assert code == 0 and name in results, stderr[-4000:]
  assert results[name][index] is None, results[name][index][-4000:]


def test_the_readme_and_the_guides_have_blocks():
  assert len(file_blocks('README.md')) >= 1
  counts = {name: len(file_blocks(name)) for name in FILES}
  for guide in ('docs/getting_started.md', 'docs/checkpoints.md',
                'docs/memory.md', 'docs/many_devices.md'):
    assert counts[guide] >= 1, counts


def test_blocks_run_elsewhere_are_those_of_their_file():
  from tests import readme_many_devices_test

  assert readme_many_devices_test._recipes() == [
      block.code for block in file_blocks('docs/many_devices.md')]
  assert not any(block.skip for block in file_blocks('docs/many_devices.md'))


def test_skip_markers_are_read():
  text = ('Text.\n\n```python\nx = 1\n```\n\n<!-- skip: needs a GPU -->\n'
          '```python\ny = x\n```\n```bash\nls\n```\n')
  assert python_blocks(text) == [Block(3, 'x = 1\n', None),
                                 Block(8, 'y = x\n', 'needs a GPU')]
