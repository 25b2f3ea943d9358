"""Subprocess jobs that run beside the suite instead of inside one test.

A test module lists its jobs in ``BACKGROUND_JOBS``: key -> (job, names of
the tests that read its result). When collection ends, tests/conftest.py
queues the jobs of the selected tests on one worker thread, in module
order, so that they run in their own processes (on the second core) while
the other tests run. A test reads its job's result with ``result(key,
job)``, which waits for the queued job, or runs the job then and there
when it was not queued (a test run on its own). Whatever is left when the
session ends is cancelled and its processes killed.
"""

import concurrent.futures
import functools
import os
import subprocess
import sys
import textwrap
import threading

_lock = threading.Lock()
_futures: dict[str, concurrent.futures.Future] = {}
_processes: set[subprocess.Popen] = set()
_executor = None


def submit(key, job) -> None:
  """Queues ``job()`` under ``key`` (once)."""
  global _executor
  with _lock:
    if key in _futures:
      return
    if _executor is None:
      _executor = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix='tests-background')
    _futures[key] = _executor.submit(job)


def result(key, job):
  """The result of the job queued under ``key``; runs ``job`` if none was."""
  with _lock:
    future = _futures.get(key)
    if future is None:
      future = _futures[key] = concurrent.futures.Future()
      future.set_running_or_notify_cancel()
      inline = True
    else:
      inline = False
  if inline:
    try:
      future.set_result(job())
    except BaseException as error:  # noqa: BLE001 - re-raised by result()
      future.set_exception(error)
  return future.result()


def run(args, *, timeout, **kwargs) -> subprocess.CompletedProcess:
  """subprocess.run(args, capture_output=True, text=True); stop() kills it."""
  process = subprocess.Popen(args, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **kwargs)
  with _lock:
    _processes.add(process)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except BaseException:
    process.kill()
    process.communicate()
    raise
  finally:
    with _lock:
      _processes.discard(process)
  return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def run_together(commands, envs, *, timeout,
                 **kwargs) -> list[subprocess.CompletedProcess]:
  """run() for processes that must run at once, one env each.

  Each is waited for up to ``timeout`` seconds in turn; when one does not
  finish, all are killed (as stop() kills them).
  """
  processes = []
  try:
    for args, env in zip(commands, envs, strict=True):
      process = subprocess.Popen(args, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env,
                                 **kwargs)
      with _lock:
        _processes.add(process)
      processes.append(process)
    results = []
    for args, process in zip(commands, processes, strict=True):
      stdout, stderr = process.communicate(timeout=timeout)
      results.append(subprocess.CompletedProcess(args, process.returncode,
                                                 stdout, stderr))
    return results
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
      with _lock:
        _processes.discard(process)


def run_python(code: str, timeout: float) -> subprocess.CompletedProcess:
  """conftest.run_python's fresh interpreter, killable by stop()."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  return run([sys.executable, '-c', textwrap.dedent(code)], timeout=timeout,
             env=env)


def python_job(code: str, timeout: float = 120):
  """A job for ``BACKGROUND_JOBS``: run_python(code, timeout)."""
  return functools.partial(run_python, code, timeout)


# XLA:CPU contracts a * b + c into fused multiply-adds where the CPU has
# them; capped at AVX it emits none, and Pallas' interpreted TPU kernels
# then round as the C++ kernel does, so they can be compared bit for bit.
NO_FMA = '--xla_cpu_max_isa=AVX'
IN_NO_FMA_SESSION = NO_FMA in os.environ.get('XLA_FLAGS', '')


def no_fma_pytest(test_file, selection: str, timeout: float = 600):
  """A job: pytest of ``test_file``'s tests that ``-k selection`` picks, in
  a process whose XLA:CPU emits no FMA (``IN_NO_FMA_SESSION`` there)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def job():
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=NO_FMA)
    return run([sys.executable, '-m', 'pytest', '-q', '-p',
                'no:cacheprovider', str(test_file), '-k', selection],
               timeout=timeout, env=env, cwd=root)

  return job


def assert_session_passed(key, job, passed: int) -> None:
  """``job``'s pytest (``no_fma_pytest``) exited 0 with ``passed`` passed."""
  done = result(key, job)
  tail = done.stdout[-6000:] + done.stderr[-3000:]
  assert done.returncode == 0, tail
  assert f'{passed} passed' in done.stdout, tail


def stop() -> None:
  """Cancels queued jobs and kills the running job's processes."""
  with _lock:
    if _executor is not None:
      _executor.shutdown(wait=False, cancel_futures=True)
    for process in list(_processes):
      process.kill()
