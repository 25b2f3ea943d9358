"""Times one jitted optimizer step on CPU: the paged ones against optax.adamw.

The parameters are fp32 and shaped like the blocks of a small llama: per layer
four 1024x1024 attention projections, two 1024x2816 MLP input projections and
one 2816x1024 output projection (about 12.8M parameters in 7 leaves), 4 layers
by default (about 51.4M parameters in 28 leaves).

A step is ``jax.jit`` of ``tx.update`` followed by ``optax.apply_updates``,
with the parameters and the optimizer state donated. Both optimizers run in
the same process on the same parameters and gradients (rotating through three
gradient sets). After compiling and two warm-up steps each, they alternate
over several rounds (which one goes first alternates too) and every step is
timed on its own with ``time.perf_counter`` and ``jax.block_until_ready``.
The table reports median step times and the bytes of optimizer state: the
jax arrays of the state plus, for optax_paged, its registry buffers. Rows:
paged_adamw8bit strict, fused and with the gradients donated, and the fused
steps of the 4-bit optimizers (paged_adamw4bit, paged_lion4bit beside
optax.lion), each against the same run's optax.adamw.

Run it from the repository root:

  python benchmarks/cpu_step.py            # print the table
  python benchmarks/cpu_step.py --write    # also update benchmarks/RESULTS.md

RESULTS.md keeps one section per kind of CPU (``--section``, default
``cpu_step``), and ``OPTAX_PAGED_CPU_ISA=avx2`` times the path a CPU without
AVX-512 takes (``sse2``: one without AVX2) on any x86 CPU.
"""

import argparse
import dataclasses
import datetime
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_paged
from optax_paged._src import ffi

HIDDEN = 1024
INTERMEDIATE = 2816
NUM_GRAD_SETS = 3
WARMUP_STEPS = 2
RESULTS_PATH = pathlib.Path(__file__).with_name('RESULTS.md')
BEGIN_MARK = '<!-- cpu_step:begin -->'
END_MARK = '<!-- cpu_step:end -->'

Params = dict[str, dict[str, jax.Array]]
Step = Callable[[Params, Any, Params], tuple[Params, Any]]


@dataclasses.dataclass
class Result:
  """What one optimizer measured."""

  name: str
  times_s: list[float]
  state_bytes: int

  @property
  def median_ms(self) -> float:
    return 1e3 * statistics.median(self.times_s)


def layer_shapes(width: int = 1) -> dict[str, tuple[int, int]]:
  """Shapes of the weight matrices of one llama-like block (``width`` times
  wider)."""
  hidden, intermediate = HIDDEN * width, INTERMEDIATE * width
  return {
      'wq': (hidden, hidden),
      'wk': (hidden, hidden),
      'wv': (hidden, hidden),
      'wo': (hidden, hidden),
      'w_gate': (hidden, intermediate),
      'w_up': (hidden, intermediate),
      'w_down': (intermediate, hidden),
  }


def random_tree(key: jax.Array, layers: int, scale: float,
                width: int = 1) -> Params:
  """Normal(0, scale) fp32 arrays in the shape of a ``layers``-deep model."""
  tree = {}
  for i in range(layers):
    shapes = layer_shapes(width)
    keys = jax.random.split(jax.random.fold_in(key, i), len(shapes))
    tree[f'layer_{i}'] = {
        name: scale * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }
  return tree


def make_step(tx: optax.GradientTransformation, fused: bool,
              donate_grads: bool = False) -> Step:
  """One jitted step, donating the parameters and the state (and the
  gradients if asked): update + apply (the strict optax path), or
  optax_paged.apply_gradients (fused)."""

  def step(grads, state, params):
    if fused:
      return optax_paged.apply_gradients(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # JAX gives each output the first donated argument of its shape. Donated
  # gradients come first, so that the new parameters take their buffers and
  # XLA may write over them (tests/gradient_copy_test.py); otherwise the
  # parameters come before the state, whose optax moments share their shape.
  if donate_grads:
    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    return lambda params, state, grads: jitted(grads, state, params)
  return jax.jit(lambda params, state, grads: step(grads, state, params),
                 donate_argnums=(0, 1))


class Runner:
  """One optimizer's parameters, state and compiled step."""

  def __init__(self, name: str, tx: optax.GradientTransformation,
               params: Params, grads: Sequence[Params], fused: bool = False,
               donate_grads: bool = False):
    self.name = name
    self.grads = grads
    self.donate_grads = donate_grads
    self.params = jax.tree.map(jnp.copy, params)
    self.state = tx.init(self.params)
    self.step_fn = make_step(tx, fused, donate_grads)
    self.calls = 0
    self.times_s: list[float] = []

  def step(self) -> float:
    """Runs one step; returns its wall time in seconds."""
    grads = self.grads[self.calls % len(self.grads)]
    if self.donate_grads:  # a fresh copy to give away, made before timing
      grads = jax.block_until_ready(jax.tree.map(jnp.copy, grads))
    self.calls += 1
    start = time.perf_counter()
    self.params, self.state = self.step_fn(self.params, self.state, grads)
    jax.block_until_ready((self.params, self.state))
    return time.perf_counter() - start

  def warm_up(self) -> None:
    for _ in range(1 + WARMUP_STEPS):  # The first call compiles.
      self.step()

  def timed_steps(self, steps: int) -> None:
    self.times_s.extend(self.step() for _ in range(steps))

  def result(self) -> Result:
    return Result(self.name, self.times_s, optax_paged.state_nbytes(self.state))


def benchmark(layers: int, rounds: int, steps_per_round: int,
              lr: float) -> tuple[list[Result], int, int]:
  """Results for both optimizers, the parameter count and the leaf count."""
  key = jax.random.key(0)
  params = random_tree(key, layers, 0.02)
  grads = [
      random_tree(jax.random.fold_in(key, 1 + i), layers, 1e-3)
      for i in range(NUM_GRAD_SETS)
  ]
  hyper = dict(learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
  lion_hyper = dict(learning_rate=lr / 10, b1=0.9, b2=0.99, weight_decay=1e-3)
  runners = [
      Runner('optax.adamw', optax.adamw(**hyper), params, grads),
      Runner('optax_paged.paged_adamw8bit',
             optax_paged.paged_adamw8bit(**hyper), params, grads),
      Runner('optax_paged.paged_adamw8bit, fused step',
             optax_paged.paged_adamw8bit(**hyper), params, grads, fused=True),
      Runner('optax.adamw, gradients donated', optax.adamw(**hyper), params,
             grads, donate_grads=True),
      Runner('optax_paged.paged_adamw8bit, gradients donated',
             optax_paged.paged_adamw8bit(**hyper), params, grads,
             donate_grads=True),
      Runner('optax_paged.paged_adamw4bit, fused step',
             optax_paged.paged_adamw4bit(**hyper), params, grads, fused=True),
      Runner('optax.lion', optax.lion(**lion_hyper), params, grads),
      Runner('optax_paged.paged_lion4bit, fused step',
             optax_paged.paged_lion4bit(**lion_hyper), params, grads,
             fused=True),
  ]
  for runner in runners:
    runner.warm_up()
  for r in range(rounds):
    for runner in runners if r % 2 == 0 else runners[::-1]:
      runner.timed_steps(steps_per_round)
  leaves = jax.tree.leaves(params)
  return [runner.result() for runner in runners], sum(
      leaf.size for leaf in leaves), len(leaves)


def cpu_model() -> str:
  """The model name, with family and model (virtual machines often show a
  bare 'AMD EPYC')."""
  return (f"{cpuinfo('model name')} (family {cpuinfo('cpu family')}, "
          f"model {cpuinfo('model')})")


def cpuinfo(field: str) -> str:
  """The first value of ``field`` in /proc/cpuinfo, or 'unknown'."""
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.split(':', 1)[0].strip() == field:
        return line.split(':', 1)[1].strip()
  return 'unknown'


def instruction_sets() -> str:
  """The instruction sets the CPU kernel uses here, its 8-bit codec (as
  UseGathers in ffi/cpu_codec.cc chooses) and 4-bit codec (CpuFourBitCodec),
  and the cap if one is set."""
  extension = ffi.extension()
  avx2, avx512 = extension.has_avx2(), extension.testing.has_avx512()
  used = [name for name, on in (('AVX2', avx2), ('AVX-512', avx512)) if on]
  if avx512 and cpuinfo('vendor_id') == 'GenuineIntel':
    codec = 'gathers'
  else:
    codec = 'table loads, no gathers' if avx2 else 'scalar'
  four_bit = used[-1] + ' permutes' if used else 'scalar'
  cap = os.environ.get('OPTAX_PAGED_CPU_ISA')
  capped = f' (capped: OPTAX_PAGED_CPU_ISA={cap})' if cap else ''
  return (', '.join(used) or 'x86-64 baseline') + (
      f'; codec: {codec}; 4-bit codec: {four_bit}{capped}')


def facts(num_params: int, num_leaves: int) -> list[tuple[str, str]]:
  """The run's conditions, as (label, value) pairs."""
  now = datetime.datetime.now(datetime.UTC)
  return [
      ('date (UTC)', now.strftime('%Y-%m-%d %H:%M')),
      ('CPU', cpu_model()),
      ('cores (os.cpu_count)', str(os.cpu_count())),
      ('kernel instruction sets', instruction_sets()),
      ('jax', jax.__version__),
      ('backend', jax.default_backend()),
      ('parameters', f'{num_params:,} fp32 in {num_leaves} leaves'),
  ]


def table(results: Sequence[Result], num_params: int) -> str:
  """A markdown table of the results, relative to optax.adamw (the first)."""
  baseline = results[0].median_ms
  rows = [
      '| optimizer | median step (ms) | min-max (ms) | vs optax.adamw '
      '| state bytes | bytes / param |',
      '|---|---:|---:|---:|---:|---:|',
  ]
  for r in results:
    rows.append(
        f'| {r.name} | {r.median_ms:.1f} '
        f'| {1e3 * min(r.times_s):.1f}-{1e3 * max(r.times_s):.1f} '
        f'| {r.median_ms / baseline:.2f}x '
        f'| {r.state_bytes:,} | {r.state_bytes / num_params:.3f} |'
    )
  return '\n'.join(rows)


def report(results: Sequence[Result], num_params: int, num_leaves: int,
           rounds: int, steps_per_round: int) -> str:
  """The facts, the method and the table, as markdown."""
  cap = os.environ.get('OPTAX_PAGED_CPU_ISA')
  lines = [f'## CPU: one jitted optimizer step, {cpu_model()}'
           + (f', OPTAX_PAGED_CPU_ISA={cap}' if cap else ''), '']
  lines += [f'- {label}: {value}' for label, value in
            facts(num_params, num_leaves)]
  lines += [
      f'- timing: median of {rounds} interleaved rounds x {steps_per_round} '
      f'steps per optimizer, after compile + {WARMUP_STEPS} warm-up steps; '
      'params and state donated',
      '',
      table(results, num_params),
  ]
  return '\n'.join(lines)


def write_results(section: str, path: pathlib.Path = RESULTS_PATH,
                  marks: tuple[str, str] = (BEGIN_MARK, END_MARK)) -> None:
  """Replaces (or appends) the section between ``marks`` of ``path``."""
  begin_mark, end_mark = marks
  text = path.read_text() if path.exists() else '# Benchmark results\n'
  block = f'{begin_mark}\n{section}\n{end_mark}'
  begin, end = text.find(begin_mark), text.find(end_mark)
  if begin != -1 and end > begin:
    text = text[:begin] + block + text[end + len(end_mark):]
  else:
    text = text.rstrip('\n') + '\n\n' + block + '\n'
  path.write_text(text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps-per-round', type=int, default=3)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--write', action='store_true',
                      help=f'write the results into {RESULTS_PATH.name}')
  parser.add_argument('--section', default='cpu_step',
                      help='the section of RESULTS.md to write (one per '
                      'kind of CPU)')
  args = parser.parse_args()
  results, num_params, num_leaves = benchmark(
      args.layers, args.rounds, args.steps_per_round, args.lr)
  section = report(results, num_params, num_leaves, args.rounds,
                   args.steps_per_round)
  print(section)
  if args.write:
    write_results(section, marks=(f'<!-- {args.section}:begin -->',
                                  f'<!-- {args.section}:end -->'))
    print(f'\nwrote {RESULTS_PATH}')


if __name__ == '__main__':
  main()
