"""Times one AdamW step on the GPU: optax_paged against optax.adamw.

308M parameters shaped like a llama's blocks (24 layers of four 1024x1024,
two 1024x2816 and one 2816x1024 matrices: 168 leaves), fp32 and bf16. In one
process, on the same parameters and gradients (two gradient sets, each larger
than L2, used in turn):

- ``optax.adamw``: ``update`` + ``optax.apply_updates`` (fp32 moments);
- ``paged_adamw8bit``: the same strict optax path;
- ``paged_adamw8bit``, fused: ``optax_paged.apply_gradients``;
- the same with ``stochastic_rounding=True`` (changes only bf16 parameters);
- ``paged_adamw8bit``, host tier: ``device_budget=0``, fused, every 8-bit
  buffer in host RAM streamed over the link;
- ``paged_adamw8bit`` (update + apply) with the gradients donated: no copy
  before the update writes over them;
- ``optax.adamw`` and ``paged_adamw8bit`` (update + apply) with the gradients
  made in the step, as in training: the given gradients times a traced
  scale, held apart by ``optimization_barrier`` as a backward pass's matmul
  outputs are. The update then writes over the dead gradients; given as
  arguments, they are copied first.

Every step is jitted with parameters and state donated and warmed up. A round
dispatches ``--steps`` steps back to back, as a training loop does, and waits
once (``jax.block_until_ready``); its time over the step count is one sample.
Configurations alternate over ``--rounds`` rounds; the table gives the median
per-step time, the bandwidth the step's minimum traffic implies, that time
against the traffic floor (the minimum traffic at 90% of the card's DRAM peak,
issue 26's yardstick; blank on a card not in ``PEAK_BYTES_PER_S``) and the
state memory on the device.

  python benchmarks/gpu_step.py                     # print the tables
  python benchmarks/gpu_step.py --write RESULTS.md  # also write this section
  python benchmarks/gpu_step.py --family            # Lion and AdEMAMix
  python benchmarks/gpu_step.py --tiers             # partial device budgets
"""

import argparse
import datetime
import pathlib
import statistics
import time
from collections.abc import Sequence

import cpu_step
import jax
import jax.numpy as jnp
import optax
from optax import contrib

import optax_paged

MARKS = ('<!-- gpu_step:begin -->', '<!-- gpu_step:end -->')
FAMILY_MARKS = ('<!-- gpu_family:begin -->', '<!-- gpu_family:end -->')
TIER_MARKS = ('<!-- gpu_tiers:begin -->', '<!-- gpu_tiers:end -->')
# Shares of the paged state on the device in the --tiers table.
DEVICE_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)
HYPER = dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)


MOMENTS = {'adamw': 2, 'lion': 1, 'ademamix': 3}
# DRAM peak of the cards the benchmarks run on, by jax's device_kind (the
# vendors' data sheets: H100 SXM5 80 GB HBM3, H200 SXM 141 GB HBM3e).
PEAK_BYTES_PER_S = {'NVIDIA H100 80GB HBM3': 3.35e12, 'NVIDIA H200': 4.8e12}
# The share of the peak that a streaming kernel can reach (a device-to-device
# copy: 90% on the H100, benchmarks/experiments/traffic_floor.cu).
FLOOR_SHARE_OF_PEAK = 0.9


def floor_seconds(nbytes: int, num_params: int,
                  device_kind: str) -> float | None:
  """The step's minimum traffic at 90% of the card's DRAM peak, or None.

  Args:
    nbytes: bytes a parameter the step must move (``traffic_bytes``).
    num_params: parameters in the step.
    device_kind: jax's name of the card; None for a card without a known
      peak.
  """
  peak = PEAK_BYTES_PER_S.get(device_kind)
  if peak is None:
    return None
  return nbytes * num_params / (FLOOR_SHARE_OF_PEAK * peak)


def traffic_bytes(name: str, itemsize: int) -> int:
  """Fewest bytes per parameter a step of ``name`` must move."""
  moments = next(n for key, n in MOMENTS.items() if key in name)
  made = 2 * itemsize if 'made' in name else 0  # read g, write g * scale
  if name.startswith('optax'):
    # Read g, p and the moments; write p and the moments (param dtype).
    return (3 + 2 * moments) * itemsize + made
  # Read g, read+write p, read+write one code per moment (half a byte at
  # 4 bits).
  fused = 3 * itemsize + (moments if '4bit' in name else 2 * moments)
  # Master weights: read and write the correction.
  fused += {'24-bit master': 2, '32-bit master': 4}.get(
      next((k for k in ('24-bit master', '32-bit master') if k in name), ''),
      0)
  if 'fused' in name or 'host' in name:
    return fused
  # Not fused: also write u, then read p and u and write p again.
  return fused + 3 * itemsize + made


class Runner:
  """One configuration's parameters, state and compiled step."""

  def __init__(self, name, tx, params, fused, stochastic_rounding=False,
               make_grads=False, device_share=None, donate_grads=False,
               own_step=False):
    self.name = name
    self.donate_grads = donate_grads
    self.params = jax.tree.map(jnp.copy, params)
    self.state = tx.init(self.params)
    if device_share is not None:
      total = optax_paged.memory_report(self.state).total_bytes
      optax_paged.set_device_budget(self.state, int(device_share * total))

    def step(g, s, p, scale):
      if make_grads:
        g = jax.lax.optimization_barrier(jax.tree.map(lambda x: x * scale, g))
      if own_step:  # a peer's fused step, (params, state, grads) -> (p, s)
        return tx.step(p, s, g)
      if fused:
        return optax_paged.apply_gradients(
            tx, g, s, p, stochastic_rounding=stochastic_rounding)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    # JAX gives each output the first donated argument of its shape.
    # Donated gradients come first, so that the new parameters take their
    # buffers and XLA may write over them (tests/gradient_copy_test.py);
    # otherwise the parameters come before the state, whose optax moments
    # share their shape.
    if donate_grads:
      jitted = jax.jit(step, donate_argnums=(0, 1, 2))
      self.step = lambda p, s, g, scale: jitted(g, s, p, scale)
    else:
      self.step = jax.jit(lambda p, s, g, scale: step(g, s, p, scale),
                          donate_argnums=(0, 1))
    self.scale = jnp.ones([], params_dtype(params))
    self.times = []
    self.dispatch_times = []  # host time to dispatch a step

  def run(self, grads, steps, timed):
    """``steps`` steps dispatched back to back, as a training loop runs them,
    then one wait; records the time per step."""
    if self.donate_grads:  # copies to give away, made before the clock
      grads = jax.block_until_ready([jax.tree.map(jnp.copy, grads[i % len(
          grads)]) for i in range(steps)])
    start = time.perf_counter()
    for i in range(steps):
      g = grads[i] if self.donate_grads else grads[i % len(grads)]
      self.params, self.state = self.step(self.params, self.state, g,
                                          self.scale)
    dispatched = time.perf_counter()
    jax.block_until_ready(self.params)
    if timed:
      self.times.append((time.perf_counter() - start) / steps)
      self.dispatch_times.append((dispatched - start) / steps)

  def device_state_bytes(self) -> int:
    arrays = [
        x for x in jax.tree.leaves(self.state) if isinstance(x, jax.Array)
    ]
    paged = sum(
        row.bytes for row in optax_paged.memory_report(self.state).rows
        if row.tier.startswith('device')
    )
    return sum(x.nbytes for x in arrays) + paged


def params_dtype(params):
  return jax.tree.leaves(params)[0].dtype


def adamw_runners(params):
  """optax.adamw against paged_adamw8bit: strict, fused and host tier."""
  return [
      Runner('optax.adamw', optax.adamw(**HYPER), params, False),
      Runner('paged_adamw8bit', optax_paged.paged_adamw8bit(
          **HYPER, device_budget=1.0), params, False),
      Runner('paged_adamw8bit, fused', optax_paged.paged_adamw8bit(
          **HYPER, device_budget=1.0), params, True),
      Runner('paged_adamw4bit, fused', optax_paged.paged_adamw4bit(
          **HYPER, device_budget=1.0), params, True),
      Runner('paged_adamw8bit, fused, stochastic rounding',
             optax_paged.paged_adamw8bit(**HYPER, device_budget=1.0), params,
             True, stochastic_rounding=True),
      Runner('paged_adamw8bit, host tier, fused', optax_paged.paged_adamw8bit(
          **HYPER, device_budget=0), params, True),
      *master_runners(params),
      Runner('paged_adamw4bit, host tier, fused', optax_paged.paged_adamw4bit(
          **HYPER, device_budget=0), params, True),
      Runner('paged_adamw8bit, grads donated', optax_paged.paged_adamw8bit(
          **HYPER, device_budget=1.0), params, False, donate_grads=True),
      Runner('optax.adamw, grads made in the step', optax.adamw(**HYPER),
             params, False, make_grads=True),
      Runner('paged_adamw8bit, grads made in the step',
             optax_paged.paged_adamw8bit(**HYPER, device_budget=1.0), params,
             False, make_grads=True),
  ]


def master_runners(params):
  """Fused steps with master weights (16-bit parameters only), and
  flashoptim-jax's fused ``flash_adamw`` with and without its 24-bit master
  where that package is installed (it is not a dependency)."""
  if params_dtype(params) == jnp.float32:
    return []
  runners = [
      Runner(f'{factory.__name__}, fused, {bits}-bit master',
             factory(**HYPER, device_budget=1.0, master_weight_bits=bits),
             params, True)
      for factory, bits in ((optax_paged.paged_adamw8bit, 24),
                            (optax_paged.paged_adamw8bit, 32),
                            (optax_paged.paged_adamw4bit, 24))
  ]
  try:
    import flashoptim_jax  # noqa: PLC0415
  except ImportError as error:
    print(f'flashoptim-jax is not importable ({error}): its rows are left out')
    return runners
  for bits, label in ((24, '24-bit master'), (None, 'no master')):
    runners.append(Runner(
        f'flashoptim-jax flash_adamw, fused, {label}',
        flashoptim_jax.flash_adamw(**HYPER, master_weight_bits=bits),
        params, True, own_step=True))
  return runners


def family_runners(params):
  """Lion (8 and 4 bits) and AdEMAMix against their optax counterparts."""
  lr = HYPER['learning_rate']
  return [
      Runner('optax.lion', optax.lion(lr), params, False),
      Runner('lion8bit', optax_paged.lion8bit(lr), params, False),
      Runner('lion8bit, fused', optax_paged.lion8bit(lr), params, True),
      Runner('lion4bit, fused', optax_paged.lion4bit(lr), params, True),
      Runner('optax.contrib.ademamix', contrib.ademamix(lr), params, False),
      Runner('ademamix8bit', optax_paged.ademamix8bit(lr), params, False),
      Runner('ademamix8bit, fused', optax_paged.ademamix8bit(lr), params,
             True),
  ]


def tier_runners(params):
  """The fused step with a share of its state on the device, the rest on
  the host, against optax.adamw."""
  runners = [Runner('optax.adamw', optax.adamw(**HYPER), params, False)]
  for share in DEVICE_SHARES:
    runners.append(Runner(
        f'paged_adamw8bit, fused, {share:.0%} of the state on the device',
        optax_paged.paged_adamw8bit(**HYPER, device_budget=1.0), params, True,
        device_share=share))
  return runners


def run_dtype(dtype, layers: int, rounds: int, steps: int, make_runners):
  key = jax.random.key(0)
  params = jax.tree.map(lambda x: x.astype(dtype),
                        cpu_step.random_tree(key, layers, 0.02))
  grads = [
      jax.tree.map(lambda x: x.astype(dtype),
                   cpu_step.random_tree(jax.random.fold_in(key, i + 1),
                                        layers, 1e-3))
      for i in range(2)
  ]
  runners = make_runners(params)
  for runner in runners:
    runner.run(grads, 3, timed=False)
  for r in range(rounds):
    for runner in runners if r % 2 == 0 else runners[::-1]:
      runner.run(grads, steps, timed=True)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  num_leaves = len(jax.tree.leaves(params))
  return runners, num_params, num_leaves


def table(runners: Sequence[Runner], num_params: int, itemsize: int,
          device_kind: str) -> str:
  rows = [
      '| step | median (ms) | vs optax | min traffic (B/param) '
      '| achieved (GB/s) | vs floor | state on device (MiB) '
      '| host dispatch (ms) |',
      '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in runners:
    median = statistics.median(r.times)
    if r.name.startswith('optax'):
      baseline = median  # later rows compare with this counterpart
    nbytes = traffic_bytes(r.name, itemsize)
    floor = floor_seconds(nbytes, num_params, device_kind)
    vs_floor = '' if floor is None else f'{median / floor:.2f}x'
    rows.append(
        f'| {r.name} | {1e3 * median:.2f} | {median / baseline:.2f}x '
        f'| {nbytes} | {nbytes * num_params / median / 1e9:.0f} '
        f'| {vs_floor} | {r.device_state_bytes() / 2**20:.0f} '
        f'| {1e3 * statistics.median(r.dispatch_times):.2f} |'
    )
  return '\n'.join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=24)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--family', action='store_true',
                      help='Lion and AdEMAMix instead of AdamW')
  parser.add_argument('--tiers', action='store_true',
                      help='the fused step at partial device budgets')
  parser.add_argument('--dtypes', default='float32,bfloat16',
                      help='the AdamW tables to run (comma-separated)')
  parser.add_argument('--write', type=pathlib.Path, default=None,
                      help='a RESULTS.md to write this section into')
  args = parser.parse_args()
  device = jax.devices()[0]
  now = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M')
  lines = ['## GPU: one AdamW step, 308M parameters', '',
           f'- date (UTC): {now}', f'- GPU: {device.device_kind}',
           f'- jax: {jax.__version__}',
           f'- timing: median per-step time over {args.rounds} interleaved '
           f'rounds of {args.steps} steps dispatched back to back, after 3 '
           'warm-up steps; params and state donated',
           '- host dispatch: the host\'s time to dispatch a step; where it '
           'nears the median, the row is bound by the host, not the GPU']
  marks = MARKS
  if args.family:
    lines[0] = '## GPU: Lion and AdEMAMix steps, 308M parameters'
    make_runners, dtypes, marks = family_runners, (jnp.float32,), FAMILY_MARKS
  elif args.tiers:
    lines[0] = ('## GPU: the fused AdamW step across the tiers, 308M '
                'parameters')
    make_runners, dtypes, marks = tier_runners, (jnp.float32,), TIER_MARKS
  else:
    make_runners = adamw_runners
    dtypes = tuple(jnp.dtype(name) for name in args.dtypes.split(','))
  for dtype in dtypes:
    runners, num_params, num_leaves = run_dtype(
        dtype, args.layers, args.rounds, args.steps, make_runners)
    lines += ['', f'### {jnp.dtype(dtype).name} parameters and gradients '
              f'({num_params:,} in {num_leaves} leaves)', '',
              table(runners, num_params, jnp.dtype(dtype).itemsize,
                    device.device_kind)]
    del runners
  section = '\n'.join(lines)
  print(section)
  if args.write:
    cpu_step.write_results(section, args.write, marks)


if __name__ == '__main__':
  main()
