"""Runs the multi-device suite in a pytest session with 4 forced CPU devices.

The rest of the tests keep one device; forcing host devices must happen
before JAX starts, hence the separate session. It runs beside the rest of
the suite from the end of collection (tests/background.py).
"""

import os
import sys
from pathlib import Path

from tests import background

ROOT = Path(__file__).resolve().parent.parent


def _run_session():
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      OPTAX_PAGED_MESH_SUITE='1',
      XLA_FLAGS='--xla_force_host_platform_device_count=4',
  )
  return background.run(
      [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider',
       str(ROOT / 'tests' / 'multi_device')],
      timeout=900, env=env, cwd=ROOT)


BACKGROUND_JOBS = {
    'multi-device-suite': (_run_session,
                           ['test_multi_device_suite_on_four_cpu_devices']),
}


def test_multi_device_suite_on_four_cpu_devices():
  result = background.result('multi-device-suite', _run_session)
  tail = result.stdout[-6000:] + result.stderr[-3000:]
  assert result.returncode == 0, tail
  assert ' passed' in result.stdout, tail
  # Only the GPU-only tests (memory tiers) may skip on the CPU.
  skips = [line for line in result.stdout.splitlines()
           if line.startswith('SKIPPED')]
  assert all('GPUs only' in line for line in skips), tail
