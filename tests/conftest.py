"""Shared test settings: float32 matmuls, a subprocess runner."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter; returns the finished process."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  return subprocess.run(
      [sys.executable, '-c', textwrap.dedent(code)],
      capture_output=True,
      text=True,
      timeout=timeout,
      env=env,
  )


@pytest.fixture
def python_subprocess():
  return run_python


@pytest.fixture
def on_cpu():
  """JAX's default device is the CPU for the test.

  The TPU interpreter's tests compare with the CPU kernel bit for bit (or to
  stated ulps) as XLA:CPU rounds; on a GPU host the default backend would be
  XLA:GPU, which contracts the interpreter's arithmetic differently.
  """
  with jax.default_device(jax.devices('cpu')[0]):
    yield

# The multi-device suite needs forced host devices (or several GPUs) from
# the start: tests/multi_device_test.py runs it in a session of its own.
collect_ignore = (
    [] if os.environ.get('OPTAX_PAGED_MESH_SUITE') else ['multi_device']
)
# A script its test runs in a subprocess; importing it here (for doctests)
# would configure this process's devices.
collect_ignore.append('multi_process_worker.py')
collect_ignore.append('memory_pressure_worker.py')


def pytest_collection_finish(session):
  # Subprocess jobs of the selected tests (tests/background.py) start now
  # and run beside the other tests.
  if session.config.option.collectonly:
    return
  from tests import background

  selected = {}
  for item in session.items:
    jobs = getattr(getattr(item, 'module', None), 'BACKGROUND_JOBS', {})
    for key, (job, tests) in jobs.items():
      if getattr(item, 'originalname', item.name) in tests:
        selected.setdefault(key, (item.module.__name__, job))
  for key, (_, job) in sorted(selected.items(), key=lambda kv: kv[1][0]):
    background.submit(key, job)


def pytest_sessionfinish(session):
  if 'tests.background' in sys.modules:
    sys.modules['tests.background'].stop()
