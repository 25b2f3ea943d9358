"""Which build of a kernel A/B beats the baseline, by its ncu reports.

  python tools/ab_winner.py [--margin 0.02] DIR BASELINE BUILD...

Reads the reports ``scripts/gpu_kernel_ab.sh`` writes,
``DIR/ncu_<build>_<run>.txt`` (one fused launch each,
``scripts/ncu_fused.sh``), pairs each build's runs
with the baseline's, and prints the build that wins, or nothing: a build wins
when none of its kernels takes more than ``1 + margin`` times the baseline's
duration and their durations' geometric mean is at most ``1 - margin`` times
the baseline's; of several, the one with the lowest mean. A run missing from
either side, or a report ncu did not finish, disqualifies the build (an A/B
that lost a kernel decides nothing). The table of ratios goes to stderr.

``gpu_kernel_ab.sh`` with ``AB_SUITE=1`` runs the GPU suite on the winner's
wheel in the same device call, so that a winning kernel change can land from
one call (the device machine goes back 30 s after a call).
"""

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ncu_targets  # noqa: E402


def durations(folder: pathlib.Path, build: str) -> dict[str, float | None]:
  """Each run's kernel duration in ms (None where ncu did not finish)."""
  found = {}
  for path in sorted(folder.glob(f'ncu_{build}_*.txt')):
    run = path.stem[len(f'ncu_{build}_'):]
    try:
      found[run] = ncu_targets.parse(path.read_text()).duration_ms
    except ValueError:
      found[run] = None
  return found


def ratios(baseline: dict[str, float | None],
           build: dict[str, float | None]) -> dict[str, float] | None:
  """Each run's duration over the baseline's, or None if a run is missing."""
  if not baseline or set(baseline) != set(build):
    return None
  if any(baseline[run] is None or build[run] is None for run in baseline):
    return None
  return {run: build[run] / baseline[run] for run in baseline}


def winner(folder: pathlib.Path, baseline: str, builds: list[str],
           margin: float) -> tuple[str | None, list[str]]:
  """The winning build (or None) and one report line a build."""
  base = durations(folder, baseline)
  best, best_mean, lines = None, math.inf, []
  for build in builds:
    found = ratios(base, durations(folder, build))
    if found is None:
      lines.append(f'{build}: runs missing or unfinished against {baseline}')
      continue
    mean = math.exp(sum(math.log(r) for r in found.values()) / len(found))
    wins = mean <= 1 - margin and max(found.values()) <= 1 + margin
    lines.append(f'{build}: geometric mean {mean:.3f} of {baseline}; ' +
                 ', '.join(f'{run} {r:.3f}' for run, r in sorted(found.items()))
                 + (' (wins)' if wins else ''))
    if wins and mean < best_mean:
      best, best_mean = build, mean
  return best, lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('folder', type=pathlib.Path)
  parser.add_argument('baseline')
  parser.add_argument('builds', nargs='+')
  parser.add_argument('--margin', type=float, default=0.02)
  args = parser.parse_args()
  if not durations(args.folder, args.baseline):
    parser.error(f'no ncu report of {args.baseline} in {args.folder} '
                 f'(ncu_{args.baseline}_*.txt)')
  best, lines = winner(args.folder, args.baseline, args.builds, args.margin)
  print('\n'.join(lines), file=sys.stderr)
  if best is not None:
    print(best)


if __name__ == '__main__':
  main()
