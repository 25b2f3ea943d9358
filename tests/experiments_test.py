"""The kernel patches kept in benchmarks/experiments/ still apply to ffi/.

A patch there waits for its GPU measurement (its README); one that a later
kernel change broke must be rebased or removed by that change, not found
broken by the session that comes to measure it.
"""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / 'benchmarks' / 'experiments').glob('*.patch'))


def test_the_readme_lists_exactly_the_patches_here():
  readme = (ROOT / 'benchmarks' / 'experiments' / 'README.md').read_text()
  listed = set(re.findall(r'^\| `([\w.-]+\.patch)` \|', readme, re.MULTILINE))
  assert listed == {patch.name for patch in PATCHES}, (
      'benchmarks/experiments/README.md\'s table and the patches there differ')


@pytest.mark.parametrize('patch', PATCHES, ids=lambda p: p.name)
def test_the_patch_applies_to_the_tree(patch):
  # `git apply` works outside a repository too (as `patch` does).
  done = subprocess.run(['git', 'apply', '--check', str(patch)], cwd=ROOT,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, (
      f'{patch.name} no longer applies: rebase it on the kernel change that '
      f'broke it, or remove it\n{done.stderr}')
