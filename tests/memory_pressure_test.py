"""GPU: a memory spike mid-run, with fixed and automatic budgets.

Each run is a fresh process (tests/memory_pressure_worker.py). A first run
measures what XLA can still get after two steps, what a step allocates and
the paged state's size; the spike (a live array) is then sized so that the
next step lacks half the state's size: it fails with the state on the device
and fits with the state in the host tier. Every allocation stays within the
GPU's free memory: the spike is XLA's own, and the registry never places
more managed memory on the device than is free.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from optax_paged._src import ffi

pytestmark = pytest.mark.skipif(
    not ffi.has_cuda_backend(), reason='needs a CUDA GPU and the CUDA build')

WORKER = pathlib.Path(__file__).with_name('memory_pressure_worker.py')
ROOT = WORKER.parent.parent


def _run(mode: str, spike: tuple[int, int]) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, str(WORKER), mode,
                         f'{spike[0]}:{spike[1]}'],
                        capture_output=True, text=True, timeout=240, env=env,
                        check=False)
  lines = [x for x in done.stdout.splitlines() if x.startswith('{')]
  assert lines, done.stderr[-3000:]
  return json.loads(lines[-1])


@pytest.fixture(scope='module')
def measured():
  run = _run('measure', (0, 0))
  assert run['status'] == 'ok', run
  return run


# Issue 11, open. On an H100 (2026-11-26) no spike sized from a measuring run
# separated the two cases: XLA's pool grows in regions of doubling size,
# capped by its limit, not by the device's free memory, backing off only
# once, so a large spike either takes all the free memory (no placement of
# the state then leaves the next step room) or fails itself
# (benchmarks/NOTES.md). Strict: a pass is reported, to lift the mark.
_OPEN = pytest.mark.xfail(strict=True, reason=(
    "issue 11: XLA's pool growth defeats the spike's sizing"))


@_OPEN
def test_a_spike_kills_optax_and_a_fixed_budget_but_not_a_guarded_step(
    measured):
  # The idle pool filled, then the device left with half the state's size
  # less than the step's temporaries (one buffer).
  spike = (measured['idle'], measured['free'] - measured['temporaries']
           + measured['state_bytes'] // 2)
  fixed = _run('fixed', spike)
  assert fixed['status'] == 'oom', fixed
  adamw = _run('optax', spike)
  assert adamw['status'] == 'oom', adamw
  guarded = _run('guarded', spike)
  assert guarded['status'] == 'ok', guarded
  # No lost update: the same parameters as the run without a spike.
  assert guarded['digest'] == measured['digest']
  # State moved out for the spike and no more: the initial placement of
  # every buffer, then at most one move out and one back for each.
  leaves = 48
  assert leaves < guarded['moves'] <= 3 * leaves, guarded
  assert guarded['tiers'].get('host', 0) > 0, guarded


@_OPEN
def test_retry_turns_an_out_of_memory_step_into_a_slower_one(measured):
  # Without donation the new parameters are outputs of their own too.
  spike = (measured['idle'], measured['free']
           - measured['temporaries_without_donation']
           - measured['outputs_without_donation']
           + measured['state_bytes'] // 2)
  run = _run('retry', spike)
  assert run['status'] == 'ok', run
  assert run['retries'] == 1, run
  assert run['digest'] == measured['digest']
