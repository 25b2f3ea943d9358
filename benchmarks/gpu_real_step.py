"""The optimizer inside a real training step: the LM example on a GPU.

For two configurations of the transformer of examples/train_lm.py (the GPU
configuration of its docstring and a larger one), times the whole jitted
training step (forward, backward, optimizer; parameters and state donated)
with ``optax.sgd`` (no optimizer state: the baseline), ``optax.adamw``,
``paged_adamw8bit`` through ``tx.update`` + ``optax.apply_updates`` (what
Flax's ``TrainState.apply_gradients`` runs) and ``paged_adamw8bit``'s fused
``apply_gradients``. The optimizer's share is its step's time less the sgd
step's. From each compiled step it counts the copies of whole buffers XLA
added (its entry computation's). With ``--no-command-buffers`` XLA builds no
command buffers (CUDA graphs; ``--xla_gpu_enable_command_buffer=``): the
difference is what they buy each optimizer (they leave no trace in the
compiled HLO text, so they are not counted).

  python benchmarks/gpu_real_step.py --write RESULTS.md
  python benchmarks/gpu_real_step.py --no-command-buffers --write RESULTS.md
  python benchmarks/gpu_real_step.py --smoke   # tiny, on any backend
"""

import argparse
import datetime
import os
import pathlib
import re
import statistics
import sys
import time

COMMAND_BUFFERS_OFF = '--xla_gpu_enable_command_buffer='
if '--no-command-buffers' in sys.argv:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                             + COMMAND_BUFFERS_OFF).strip()

import cpu_step  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import optax_paged  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent
                       / 'examples'))
from lm_model import Transformer  # noqa: E402
from lm_model import loss_fn  # noqa: E402

# (name, layers, width, heads, context, batch)
CONFIGS = (('train_lm GPU configuration', 8, 512, 8, 256, 64),
           ('larger', 24, 1024, 16, 512, 16))
VOCAB = 256
BATCHES = 4
OPTIMIZERS = ('optax.sgd', 'optax.adamw', 'paged_adamw8bit, update + apply',
              'paged_adamw8bit, fused')


def make_step(name: str, model, lr: float = 1e-4):
  """The jitted step and the optimizer it needs."""
  if name == 'optax.sgd':
    tx = optax.sgd(lr)
  elif name == 'optax.adamw':
    tx = optax.adamw(lr)
  else:
    tx = optax_paged.paged_adamw8bit(lr)

  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, tokens))(params)
    if name.endswith('fused'):
      params, state = optax_paged.apply_gradients(tx, grads, state, params)
    else:
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state, loss
  return tx, jax.jit(step, donate_argnums=(0, 1))


def entry_copies(compiled_text: str) -> int:
  """Copies in a compiled step's entry computation (outside fusions: whole
  buffers copied)."""
  entry = compiled_text[compiled_text.find('\nENTRY'):]
  entry = entry[:entry.find('\n}')]
  return len(re.findall(r'\scopy(?:-start)?\(', entry))


def measure(name: str, config, rounds: int, steps: int) -> dict:
  """Median step time over ``rounds`` of ``steps`` steps, after warm-up."""
  _, layers, width, heads, context, batch = config
  model = Transformer(VOCAB, context, layers, width, heads)
  params = model.init(jax.random.key(0), jnp.zeros((1, context), jnp.int32))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  tokens = [jax.random.randint(jax.random.key(i), (batch, context + 1), 0,
                               VOCAB) for i in range(BATCHES)]
  tx, step = make_step(name, model)
  state = tx.init(params)
  compiled = step.lower(params, state, tokens[0]).compile()
  copies = entry_copies(compiled.as_text())
  for i in range(3):
    params, state, loss = step(params, state, tokens[i % BATCHES])
  jax.block_until_ready(loss)
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for i in range(steps):
      params, state, loss = step(params, state, tokens[i % BATCHES])
    jax.block_until_ready((params, loss))
    times.append((time.perf_counter() - start) / steps)
  if name.startswith('paged'):
    optax_paged.release(state)
  return {'ms': statistics.median(times) * 1e3, 'params': num_params,
          'copies': copies}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--no-command-buffers', action='store_true')
  parser.add_argument('--smoke', action='store_true',
                      help='one tiny configuration, to check the machinery')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--write', type=pathlib.Path, default=None)
  args = parser.parse_args()
  setting = ('command buffers off (`XLA_FLAGS=' + COMMAND_BUFFERS_OFF + '`)'
             if args.no_command_buffers else "XLA's default command buffers")
  lines = [f'## The optimizer inside a real step, {setting}', '',
           '- date (UTC): '
           + datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M'),
           f'- device: {jax.devices()[0].device_kind}',
           f'- jax: {jax.__version__}',
           '- step: examples/train_lm.py\'s transformer (vocabulary '
           f'{VOCAB}), forward, backward and optimizer in one jitted step, '
           'parameters and state donated; median per-step time over '
           f'{args.rounds} rounds of {args.steps} steps after 3 warm-up '
           'steps; optimizer share: the step less the `optax.sgd` step', '']
  configs = (('smoke', 1, 32, 2, 16, 2),) if args.smoke else CONFIGS
  for config in configs:
    rows = {name: measure(name, config, args.rounds, args.steps)
            for name in OPTIMIZERS}
    base = rows['optax.sgd']['ms']
    adamw_share = rows['optax.adamw']['ms'] - base
    lines += [f'### {config[0]}: {config[1]} layers, width {config[2]}, '
              f'context {config[4]}, batch {config[5]}, '
              f"{rows['optax.sgd']['params']:,} parameters", '',
              '| step | median (ms) | optimizer (ms) | vs optax.adamw\'s '
              'optimizer | copies |',
              '|---|---:|---:|---:|---:|']
    for name, row in rows.items():
      share = row['ms'] - base
      ratio = (f'{share / adamw_share:.2f}x' if name != 'optax.sgd'
               and adamw_share > 0 else '')
      lines.append(f"| {name} | {row['ms']:.2f} | {share:.2f} | {ratio} | "
                   f"{row['copies']} |")
    lines.append('')
  section = '\n'.join(lines).rstrip()
  print(section)
  if args.write:
    key = 'off' if args.no_command_buffers else 'on'
    cpu_step.write_results(section, args.write, (
        f'<!-- gpu_real_step_{key}:begin -->',
        f'<!-- gpu_real_step_{key}:end -->'))


if __name__ == '__main__':
  main()
