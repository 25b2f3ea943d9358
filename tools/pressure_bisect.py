"""The largest memory spike each optimizer setup survives, by bisection.

Each probe is a fresh process of tests/memory_pressure_worker.py: a model
of PRESSURE_LEAVES x (4096 x 4096) fp32 parameters trains two steps, then
arrays fill the idle part of XLA's pool and one more array of the probed
size stays alive for three steps. A probe survives when every step runs.
For each mode (``fixed``: paged_adamw8bit with all state on the device;
``guarded``: an automatic budget and memory_guarded; ``optax``:
optax.adamw) this finds the largest surviving spike to ``--resolution``.
The claim to check: the guarded step survives spikes that kill the other
two, at a raised XLA_PYTHON_CLIENT_MEM_FRACTION with a state larger than
the memory outside it (benchmarks/NOTES.md).

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python tools/pressure_bisect.py \\
      --leaves 180 --modes fixed guarded optax
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / 'tests' / 'memory_pressure_worker.py'
GIB = 1 << 30


def run(mode: str, pieces: int, block: int, leaves: int) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), PRESSURE_LEAVES=str(leaves))
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  done = subprocess.run([sys.executable, str(WORKER), mode,
                         f'{pieces}:{block}'], capture_output=True,
                        text=True, timeout=300, env=env, check=False)
  lines = [x for x in done.stdout.splitlines() if x.startswith('{')]
  if not lines:
    return {'status': 'error', 'error': done.stderr.strip()[-300:]}
  return json.loads(lines[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--leaves', type=int, default=180)
  parser.add_argument('--modes', nargs='+',
                      default=['fixed', 'guarded', 'optax'])
  parser.add_argument('--resolution', type=float, default=1.0,
                      help='GiB')
  args = parser.parse_args()
  measured = run('measure', 0, 0, args.leaves)
  print(json.dumps({k: measured.get(k) for k in (
      'status', 'gpu', 'idle', 'free', 'temporaries', 'state_bytes',
      'error')}),
        flush=True)
  if measured.get('status') != 'ok':
    return
  step = int(args.resolution * GIB)
  for mode in args.modes:
    lo, hi = 0, measured['free'] // step  # in steps of the resolution
    best, worst = None, None
    while lo <= hi:
      mid = (lo + hi) // 2
      result = run(mode, measured['idle'], mid * step, args.leaves)
      ok = result.get('status') == 'ok'
      print(f'{mode:8s} spike {mid * step / GIB:6.1f} GiB: '
            f"{result.get('status')} {result.get('error', '')[:90]}",
            flush=True)
      if ok:
        best, lo = (mid * step, result), mid + 1
      else:
        worst, hi = (mid * step, result), mid - 1
    print(json.dumps({
        'mode': mode,
        'largest_surviving_gib': None if best is None else best[0] / GIB,
        'smallest_killing_gib': None if worst is None else worst[0] / GIB,
        'moves': None if best is None else best[1].get('moves'),
        'step_ms': None if best is None else best[1].get('step_ms'),
    }), flush=True)


if __name__ == '__main__':
  main()
