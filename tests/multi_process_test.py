"""Two processes under jax.distributed on localhost, two CPU devices each.

With OPTAX_PAGED_WORKER_GPU=1 (scripts/gpu_check.sh mesh), one GPU each.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_update_their_shards_and_resume_from_orbax(tmp_path):
  port = _free_port()
  on_gpu = os.environ.get('OPTAX_PAGED_WORKER_GPU') == '1'
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  if not on_gpu:
    env['JAX_PLATFORMS'] = 'cpu'

  def worker_env(i):
    return dict(env, CUDA_VISIBLE_DEVICES=str(i)) if on_gpu else env

  workers = [
      subprocess.Popen(
          [sys.executable, '-m', 'tests.multi_process_worker', str(i),
           str(port), str(tmp_path)],
          cwd=ROOT, env=worker_env(i), stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  outputs = []
  try:
    for worker in workers:
      out, err = worker.communicate(timeout=240)
      outputs.append((worker.returncode, out, err))
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  for code, out, err in outputs:
    assert code == 0 and 'OK' in out, f'exit {code}\n{out}\n{err[-4000:]}'
