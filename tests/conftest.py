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

# The multi-device suite needs forced host devices (or several GPUs) from
# the start: tests/multi_device_test.py runs it in a session of its own.
collect_ignore = (
    [] if os.environ.get('OPTAX_PAGED_MESH_SUITE') else ['multi_device']
)
# A script its test runs in a subprocess; importing it here (for doctests)
# would configure this process's devices.
collect_ignore.append('multi_process_worker.py')
collect_ignore.append('memory_pressure_worker.py')
