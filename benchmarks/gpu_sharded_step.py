"""Times the optimizer step of a model sharded over 1, 2, ... GPUs.

The 308M llama-like model of ``gpu_step.py`` (168 fp32 leaves):

- FSDP: every leaf split along its first dimension over a ``fsdp`` mesh axis
  of 1, 2, 4, ... GPUs (every size up to the device count), against the same
  model on one GPU without a mesh; per-device state bytes and step time,
  with ``optax.adamw`` sharded the same way as the peer. Each device updates
  its own shard: the step has no communication, so its device time falls
  as 1/N, until the host's per-array dispatch cost sets the pace (the host
  dispatch column); a model twice as wide (4x the parameters in the same
  168 leaves) shows the scaling once the devices have more to do.
- ZeRO-1: parameters replicated over every GPU (data parallel) with the
  state replicated (the default) or split by ``shard_state_over('data')``;
  the latter adds one all-gather of the updated parameters.

Steps are the fused ``apply_gradients`` and update + ``apply_updates``,
jitted with parameters and state donated; gradients are given, sharded like
the parameters. A round dispatches ``--steps`` steps and waits once; the
table gives the median per-step time over interleaved rounds.

  python benchmarks/gpu_sharded_step.py [--write RESULTS.md]
"""

import argparse
import datetime
import pathlib
import statistics
import time

import cpu_step
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged

MARKS = ('<!-- gpu_sharded:begin -->', '<!-- gpu_sharded:end -->')
HYPER = dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)


class Runner:
  """One configuration: its placed parameters, state and compiled step."""

  def __init__(self, name, tx, params, grads, sharding, fused):
    self.name = name
    # A copy first: device_put may share the caller's buffers, which the
    # donated step would delete.
    def place(tree):
      copy = jax.tree.map(jnp.copy, tree)
      return jax.device_put(copy, sharding) if sharding else copy

    self.params = place(params)
    self.grads = [place(g) for g in grads]
    self.state = tx.init(self.params) if tx is not None else ()

    def step(p, s, g):
      if tx is None:  # the floor: p - lr g in XLA, one pass, no state
        return jax.tree.map(lambda p, g: p - 1e-4 * g, p, g), s
      if fused:
        return optax_paged.apply_gradients(tx, g, s, p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.times = []
    self.dispatch = []

  def run(self, steps, timed):
    start = time.perf_counter()
    for i in range(steps):
      self.params, self.state = self.step(
          self.params, self.state, self.grads[i % len(self.grads)])
    dispatched = time.perf_counter()
    jax.block_until_ready(self.params)
    if timed:
      self.times.append((time.perf_counter() - start) / steps)
      # Host time to hand the steps to the devices: when it nears the step
      # time, the host, not the GPUs, sets the pace.
      self.dispatch.append((dispatched - start) / steps)

  def state_bytes_per_device(self) -> int:
    """The most state bytes any one device holds (optax states included)."""
    per_device = optax_paged.memory_report(self.state).per_device
    paged = max((sum(t.values()) for t in per_device.values()), default=0)
    arrays = sum(
        max((s.data.nbytes for s in x.addressable_shards), default=0)
        for x in jax.tree.leaves(self.state) if isinstance(x, jax.Array))
    return paged + arrays

  def release(self):
    if self.state != ():
      optax_paged.release(self.state)
    self.params = self.grads = self.state = None


def _mesh(n, name):
  return jax.make_mesh((n,), (name,), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])


def _measure(runners, rounds, steps):
  for runner in runners:
    runner.run(3, timed=False)
  for r in range(rounds):
    for runner in runners if r % 2 == 0 else runners[::-1]:
      runner.run(steps, timed=True)


def _rows(runners):
  """One row per runner, compared with the first runner of its optimizer."""
  rows, baselines = [], {}
  for r in runners:
    family = r.name.split(',')[0]
    median = statistics.median(r.times)
    nbytes = r.state_bytes_per_device()
    base, base_bytes = baselines.setdefault(family, (median, nbytes))
    rows.append(
        f'| {r.name} | {1e3 * median:.2f} '
        f'| {1e3 * statistics.median(r.dispatch):.2f} | {median / base:.2f}x '
        f'| {nbytes / 2**20:.0f} '
        f'| {nbytes / base_bytes if base_bytes else 0:.3f} |')
  return rows


HEADER = ['| configuration | median step (ms) | host dispatch (ms) '
          '| vs first row of its optimizer | state per device (MiB) '
          '| vs first row |',
          '|---|---:|---:|---:|---:|---:|']


def _fsdp_runners(params, grads, sizes, fused, peers):
  """adamw8bit (and optax.adamw when ``peers``) on one GPU, then FSDP."""
  optimizers = [('adamw8bit', lambda: optax_paged.adamw8bit(**HYPER))]
  if peers:
    optimizers.append(('optax.adamw', lambda: optax.adamw(**HYPER)))
  if fused:
    # What XLA needs for the simplest step over the same sharded arrays:
    # how far the runtime lets a step of these arrays scale.
    optimizers.append(('p - lr g in XLA (floor)', lambda: None))
  runners = []
  for name, make in optimizers:
    runners.append(Runner(f'{name}, one GPU, no mesh', make(), params, grads,
                          None, fused))
    for n in sizes:
      runners.append(Runner(
          f'{name}, FSDP over {n} GPU{"s" if n > 1 else ""}', make(), params,
          grads, NamedSharding(_mesh(n, 'fsdp'), P('fsdp')), fused))
  return runners


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=24)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--no-zero', dest='zero', action='store_false',
                      help='skip the ZeRO-1 tables')
  parser.add_argument('--large-width', type=int, default=2,
                      help='width factor of the larger model (1: skip it)')
  parser.add_argument('--write', type=pathlib.Path, default=None)
  args = parser.parse_args()
  count = jax.device_count()
  sizes = [n for n in (1, 2, 4, 8) if n <= count]
  key = jax.random.key(0)
  params = cpu_step.random_tree(key, args.layers, 0.02)
  grads = [cpu_step.random_tree(jax.random.fold_in(key, i + 1), args.layers,
                                1e-3) for i in range(2)]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  now = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M')
  lines = [f'## GPU: sharded AdamW step, {num_params / 1e6:.0f}M parameters, '
           f'{count} GPUs', '',
           f'- date (UTC): {now}',
           f'- GPUs: {count} x {jax.devices()[0].device_kind}',
           f'- jax: {jax.__version__}',
           f'- timing: median per-step time over {args.rounds} interleaved '
           f'rounds of {args.steps} steps, after 3 warm-up steps; params and '
           'state donated; adamw8bit (fp32 parameters)']
  for fused in (True, False):
    mode = 'fused apply_gradients' if fused else 'update + apply_updates'
    # optax.adamw has no fused step: its peer rows go with update + apply.
    runners = _fsdp_runners(params, grads, sizes, fused, peers=not fused)
    _measure(runners, args.rounds, args.steps)
    lines += ['', f'### FSDP, {mode}', '', *HEADER, *_rows(runners)]
    for runner in runners:
      runner.release()
  for n in sizes[1:] if args.zero else ():
    replicated = NamedSharding(_mesh(n, 'data'), P())
    for fused in (True, False):
      mode = 'fused apply_gradients' if fused else 'update + apply_updates'
      runners = [
          Runner(f'data parallel over {n}, adamw8bit, state replicated',
                 optax_paged.adamw8bit(**HYPER), params, grads, replicated,
                 fused),
          Runner(f'data parallel over {n}, adamw8bit, ZeRO-1 state',
                 optax_paged.shard_state_over(
                     optax_paged.adamw8bit(**HYPER), 'data'),
                 params, grads, replicated, fused),
      ]
      _measure(runners, args.rounds, args.steps)
      lines += ['', f'### ZeRO-1 over {n} GPUs, {mode}', '', *HEADER,
                *_rows(runners)]
      for runner in runners:
        runner.release()
  if args.large_width > 1 and count > 1:
    # The same 168 leaves, each large_width**2 times larger: per-call host
    # costs stay, device work grows.
    del params, grads
    big = cpu_step.random_tree(key, args.layers, 0.02, args.large_width)
    big_grads = [cpu_step.random_tree(jax.random.fold_in(key, 9),
                                      args.layers, 1e-3, args.large_width)]
    big_params = sum(x.size for x in jax.tree.leaves(big))
    ours = _fsdp_runners(big, big_grads, sizes[1:], True, peers=False)
    peers = _fsdp_runners(big, big_grads, sizes[-1:], False, peers=True)
    for runner in peers[:-2]:  # adamw8bit's update + apply rows: not timed
      runner.release()
    runners = ours + peers[-2:]
    _measure(runners, args.rounds, args.steps)
    lines += ['', f'### FSDP, {big_params / 1e9:.2f}B parameters in the same '
              f'{len(jax.tree.leaves(big))} leaves (fused for adamw8bit, '
              'update + apply_updates for optax.adamw)', '', *HEADER,
              *_rows(runners)]
    for runner in runners:
      runner.release()
  section = '\n'.join(lines)
  print(section)
  if args.write:
    cpu_step.write_results(section, args.write, MARKS)


if __name__ == '__main__':
  main()
