"""Each profiled fused kernel's DRAM throughput against issue 26's target.

  python tools/ncu_targets.py [--strict] NCU_OUTPUT.txt...

Reads the text that ``ncu --section SpeedOfLight`` printed for one
``UpdateKernel`` launch a file (``scripts/gpu_check.sh profile`` writes them
as ``$OUT/ncu_fused_*.txt``) and prints a table: the kernel, its duration,
how busy its schedulers' issue slots were, its DRAM throughput and the
target it is held to.

The issue column says which limit a kernel short of its target meets: the
instructions issued per scheduler over the SM's active cycles (from the
InstructionStats section, which ``scripts/ncu_fused.sh`` collects; blank
without it). A kernel whose issue slots are busy most cycles (the bf16
kernels: 65-76% on the H100, December 2026, with 8 warps or fewer a
scheduler) is bound by its instruction count, and a card with more bandwidth
per SM (the H200) asks proportionally fewer instructions a byte of it; one
with idle issue slots and DRAM short of its target (fp32: 45%) waits on
memory latency (too few bytes in flight). "issue at target" scales the
issue column to the target's throughput (the same instructions a byte, the
same clock): above 100% the target cannot be met without fewer
instructions, whatever the launch shape. The targets (percent of
the card's DRAM bandwidth, the same on every card): 85 for 8- and 4-bit
AdamW on float32 and bfloat16 parameters; 80 for Lion (8- and 4-bit),
AdEMAMix and any kernel that keeps master weights; other kernels are listed
without one. ``--strict`` exits 1 when a target is missed (the default only
reports, so that the profile step of the GPU check does not fail on a
kernel still short of its target).
"""

import argparse
import dataclasses
import pathlib
import re
import sys

KERNEL = re.compile(r'UpdateKernel<([^>]*)>')
METRIC = re.compile(r'^\s+(DRAM Throughput|Duration|SM Active Cycles|'
                    r'Avg\. Issued Instructions Per Scheduler)\s+(\S+)\s+'
                    r'([\d.,]+)\s*$')
ADAMW_TARGET = 85.0
OTHER_TARGET = 80.0


@dataclasses.dataclass(frozen=True)
class Launch:
  """One profiled launch: its kernel's template arguments and metrics."""

  optimizer: str
  dtype: str
  four_bit: bool
  correction_bits: int
  dram_percent: float
  duration_ms: float
  # Percent of the SM's active cycles in which a scheduler issued; None
  # where the report lacks the InstructionStats section.
  issue_percent: float | None = None

  @property
  def name(self) -> str:
    bits = '4-bit' if self.four_bit else '8-bit'
    master = (f', {24 if self.correction_bits == 8 else 32}-bit master'
              if self.correction_bits else '')
    return f'{self.optimizer} {bits}, {self.dtype}{master}'

  def issue_at(self, dram_percent: float | None) -> float | None:
    """The issue slots busy at ``dram_percent``, the instructions a byte kept.

    Args:
      dram_percent: a DRAM throughput in percent of the card's peak, or None.

    Returns:
      The percent, or None where either input or the measured DRAM
      throughput is missing or zero.
    """
    if (dram_percent is None or self.issue_percent is None or
        self.dram_percent <= 0):
      return None
    return self.issue_percent * dram_percent / self.dram_percent

  @property
  def target(self) -> float | None:
    if self.correction_bits or self.optimizer in ('Lion', 'AdEMAMix'):
      return OTHER_TARGET
    if self.optimizer == 'AdamW' and self.dtype in ('float', 'BFloat16'):
      return ADAMW_TARGET
    return None


def parse(text: str) -> Launch:
  """The launch that ``text`` (one ncu report) profiled.

  Raises:
    ValueError: when the text holds no UpdateKernel launch or lacks its DRAM
      throughput or duration (an ncu run that failed).
  """
  kernel = KERNEL.search(text)
  if kernel is None:
    raise ValueError('no UpdateKernel launch in the ncu output')
  arguments = [a.strip() for a in kernel.group(1).split(',')]
  metrics = {}
  for line in text.splitlines():
    match = METRIC.match(line)
    if match and match.group(1) not in metrics:
      value = float(match.group(3).replace(',', ''))
      unit = match.group(2)
      if match.group(1) == 'Duration':
        value *= {'ms': 1.0, 'us': 1e-3, 'usecond': 1e-3, 'msecond': 1.0,
                  's': 1e3, 'second': 1e3}.get(unit, float('nan'))
      metrics[match.group(1)] = value
  missing = {'DRAM Throughput', 'Duration'} - metrics.keys()
  if missing:
    raise ValueError(f'the ncu output lacks {sorted(missing)}')
  issued = metrics.get('Avg. Issued Instructions Per Scheduler')
  active = metrics.get('SM Active Cycles')
  return Launch(
      optimizer=arguments[0],
      dtype=arguments[1],
      four_bit=len(arguments) > 3 and arguments[3] == '1',
      correction_bits=int(arguments[4]) if len(arguments) > 4 else 0,
      dram_percent=metrics['DRAM Throughput'],
      duration_ms=metrics['Duration'],
      issue_percent=(100.0 * issued / active if issued is not None and active
                     else None))


def table(launches: list[tuple[str, Launch | str]]) -> tuple[str, int]:
  """The report's lines and the number of targets missed."""
  lines = ['| file | kernel | duration (ms) | issue slots busy | '
           'DRAM throughput | target | issue at target | |',
           '|---|---|---:|---:|---:|---:|---:|---|']
  missed = 0
  for path, launch in launches:
    if isinstance(launch, str):
      lines.append(f'| {path} | | | | | | | not read: {launch} |')
      continue
    target = launch.target
    if target is None:
      verdict, target_text = 'no target', '-'
    elif launch.dram_percent >= target:
      verdict, target_text = 'met', f'>= {target:.0f}%'
    else:
      verdict, target_text = 'MISSED', f'>= {target:.0f}%'
      missed += 1
    issue = ('' if launch.issue_percent is None
             else f'{launch.issue_percent:.1f}%')
    needed = launch.issue_at(target)
    needed_text = '' if needed is None else f'{needed:.0f}%'
    lines.append(f'| {path} | {launch.name} | {launch.duration_ms:.2f} | '
                 f'{issue} | {launch.dram_percent:.1f}% | {target_text} | '
                 f'{needed_text} | {verdict} |')
  return '\n'.join(lines), missed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('files', nargs='+', type=pathlib.Path)
  parser.add_argument('--strict', action='store_true',
                      help='exit 1 when a target is missed')
  args = parser.parse_args()
  launches = []
  for path in args.files:
    try:
      launches.append((path.name, parse(path.read_text())))
    except (OSError, ValueError) as error:
      launches.append((path.name, str(error)))
  report, missed = table(launches)
  print(report)
  print(f'{missed} target(s) missed')
  unread = sum(isinstance(launch, str) for _, launch in launches)
  sys.exit(1 if args.strict and (missed or unread) else 0)


if __name__ == '__main__':
  main()
