"""Two processes under jax.distributed on localhost, two CPU devices each.

With OPTAX_PAGED_WORKER_GPU=1 (scripts/gpu_check.sh mesh), one GPU each.
"""

import os
import socket
import sys
import tempfile
from pathlib import Path

from tests import background

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_workers():
  """Each worker's (exit status, stdout, stderr)."""
  on_gpu = os.environ.get('OPTAX_PAGED_WORKER_GPU') == '1'
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  if not on_gpu:
    env['JAX_PLATFORMS'] = 'cpu'

  def worker_env(i):
    return dict(env, CUDA_VISIBLE_DEVICES=str(i)) if on_gpu else env

  with tempfile.TemporaryDirectory(prefix='optax_paged_workers_') as path:
    port = _free_port()
    results = background.run_together(
        [[sys.executable, '-m', 'tests.multi_process_worker', str(i),
          str(port), path] for i in range(2)],
        [worker_env(i) for i in range(2)], timeout=240, cwd=ROOT)
  return [(r.returncode, r.stdout, r.stderr) for r in results]


# The two workers run beside the other tests (tests/background.py).
BACKGROUND_JOBS = {
    'two-processes': (
        _run_workers,
        ['test_two_processes_update_their_shards_and_resume_from_orbax']),
}


def test_two_processes_update_their_shards_and_resume_from_orbax():
  for code, out, err in background.result('two-processes', _run_workers):
    assert code == 0 and 'OK' in out, f'exit {code}\n{out}\n{err[-4000:]}'
