"""Train a small transformer language model with 8-bit, 4-bit and fp32 AdamW.

A decoder-only transformer (``flax.linen``: token embedding, learned
positions, pre-LayerNorm blocks of causal self-attention and an MLP, a final
LayerNorm and an output projection) learns to predict the next character of
text that ships with Python: by default the docstrings of some standard-library
modules and of their members (0.3 MB), or with ``--text stdlib-source`` the
standard library's source code (about 12 MB, which a GPU-sized model does not
memorise). The last 10% of the text is held out.

The same model, from the same initialisation, is trained three times on the
same batches with the same hyperparameters: with
``optax_paged.paged_adamw8bit``, ``optax_paged.paged_adamw4bit`` and
``optax.adamw``, all after
``optax.clip_by_global_norm(1.0)`` and with a warmup-cosine learning rate.
At the end it prints, per optimizer, the final training loss (mean of the last
20 steps), the held-out loss, the mean step time (the first step, which
compiles, left out) and the optimizer state size, and saves the loss curves
to a PNG: by default in the system's temporary folder
(``train_lm_<family>_<precision>.png``, so that running the example leaves
the checkout as it was); ``--plot PATH`` writes them elsewhere, e.g.
``--plot examples/train_lm_loss.png`` over the figure the docs show. The
curves should fall together while the 8-bit state takes about a quarter of
the memory and the 4-bit state an eighth.

Run it from the repository root (1.5 to 2 minutes on a 2-core CPU):

  python examples/train_lm.py
  python examples/train_lm.py --steps 200  # quicker

``--family lion`` trains ``paged_lion8bit``, ``paged_lion4bit`` and
``optax.lion`` instead (a tenth of the learning rate, ten times the weight
decay).

``--precision bf16`` compares parameter precisions instead, with the
family's 8-bit optimizer (the guide "Training in bf16 at fp32 quality"):
fp32 parameters; bf16 parameters; bf16 with stochastic rounding; bf16 with
24-bit and 32-bit master weights; and the 4-bit optimizer with 24-bit master
weights. The bf16 runs take the fused step (the gradients clipped first).

A larger configuration on a GPU (the state of both optimizers is allocated
at once, so let XLA allocate on demand rather than take most of the memory):

  XLA_PYTHON_CLIENT_PREALLOCATE=false python examples/train_lm.py \\
      --text stdlib-source --layers 8 --width 512 --heads 8 --context 256 \\
      --batch 64 --steps 3000 --plot /tmp/train_lm_gpu.png
"""

import argparse
import importlib
import inspect
import pathlib
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from lm_model import Transformer
from lm_model import loss_fn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import optax_paged

MODULES = (
    'argparse', 'asyncio', 'collections', 'contextlib', 'dataclasses',
    'datetime', 'decimal', 'difflib', 'fractions', 'functools', 'heapq',
    'inspect', 'itertools', 'json', 'logging', 'pathlib', 'random', 're',
    'shutil', 'statistics', 'string', 'subprocess', 'textwrap', 'threading',
    'unittest', 'zipfile',
)
# Per family: the peak learning rate, the hyperparameters and the three
# optimizers (8-bit, 4-bit, optax). Lion takes a tenth of Adam's learning
# rate and ten times its weight decay (Chen et al., 2023).
FAMILIES = {
    'adamw': (3e-3, dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01),
              (optax_paged.paged_adamw8bit, optax_paged.paged_adamw4bit,
               optax.adamw)),
    'lion': (3e-4, dict(b1=0.9, b2=0.99, weight_decay=0.1),
             (optax_paged.paged_lion8bit, optax_paged.paged_lion4bit,
              optax.lion)),
}
FINAL_WINDOW = 20  # final loss: mean of the last this-many steps

# (params, opt_state, tokens) -> (params, opt_state, loss)
TrainStep = Callable[[Any, Any, jax.Array], tuple[Any, Any, jax.Array]]


def docstrings_text() -> str:
  """Docstrings of MODULES, their public members and their classes' members."""
  docs: dict[str, None] = {}
  for name in MODULES:
    module = importlib.import_module(name)
    members = [module] + [
        getattr(module, attr) for attr in sorted(dir(module))
        if not attr.startswith('_')
    ]
    methods = [
        method for cls in members if inspect.isclass(cls)
        for attr, method in sorted(vars(cls).items())
        if not attr.startswith('_')
    ]
    docs.update((doc, None) for doc in map(inspect.getdoc, members + methods)
                if doc)
  return '\n\n'.join(docs)


def stdlib_source_text() -> str:
  """The standard library's Python source files (tests left out), in order.

  About 12 MB: enough text that a GPU-sized model does not memorise it.
  """
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  skipped = {'test', 'tests', 'idle_test', 'idlelib', 'site-packages'}
  files = sorted(path for path in root.rglob('*.py')
                 if not skipped & set(path.relative_to(root).parts))
  return '\n'.join(path.read_text(encoding='utf-8', errors='replace')
                   for path in files)


CORPORA = {'docstrings': docstrings_text, 'stdlib-source': stdlib_source_text}


def encode(text: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Training and held-out character ids (90% / 10%) and the vocabulary size."""
  vocab = {char: i for i, char in enumerate(sorted(set(text)))}
  data = np.asarray([vocab[char] for char in text], np.int32)
  split = int(0.9 * len(data))
  return data[:split], data[split:], len(vocab)


def batches(data: np.ndarray, context: int, batch_size: int,
            seed: int) -> Iterator[np.ndarray]:
  """Random windows of ``context + 1`` characters: inputs and their targets."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(context + 1)
  while True:
    starts = rng.integers(0, len(data) - context, size=batch_size)
    yield data[starts[:, None] + offsets]


def make_train_step(model: nn.Module,
                    tx: optax.GradientTransformation) -> TrainStep:
  """A jitted step: gradients, ``tx.update`` and the new parameters."""

  @jax.jit
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def make_fused_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    stochastic_rounding: bool) -> TrainStep:
  """A jitted step: gradients, clipped, then ``apply_gradients``."""
  clip = optax.clip_by_global_norm(1.0)

  @jax.jit
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, tokens))(params)
    grads, _ = clip.update(grads, clip.init(params))
    params, opt_state = optax_paged.apply_gradients(
        optimizer, grads, opt_state, params,
        stochastic_rounding=stochastic_rounding)
    return params, opt_state, loss

  return train_step


def precision_runs(factories, schedule, hyperparams, model, params
                   ) -> list['Run']:
  """The runs of ``--precision bf16``: the 8-bit optimizer on fp32 and
  bf16 parameters, then bf16 with stochastic rounding and master weights."""
  eight, four = factories[0], factories[1]
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  name = eight.__name__

  def make(factory, **options):
    return factory(schedule, **hyperparams, **options)

  return [
      Run(f'{name}, fp32 params', make(eight), model, params, fused=True),
      Run(f'{name}, bf16', make(eight), model, bf16, fused=True),
      Run(f'{name}, bf16 + SR', make(eight), model, bf16, fused=True,
          stochastic_rounding=True),
      Run(f'{name}, bf16 + 24-bit', make(eight, master_weight_bits=24),
          model, bf16, fused=True),
      Run(f'{name}, bf16 + 32-bit', make(eight, master_weight_bits=32),
          model, bf16, fused=True),
      Run(f'{four.__name__}, bf16 + 24-bit',
          make(four, master_weight_bits=24), model, bf16, fused=True),
  ]


def held_out_loss(model: nn.Module, params: Any, data: np.ndarray,
                  context: int, batch_size: int) -> float:
  """Mean loss over consecutive, non-overlapping windows of ``data``."""
  windows = len(data) // (context + 1)
  tokens = data[:windows * (context + 1)].reshape(windows, context + 1)
  evaluate = jax.jit(lambda p, t: loss_fn(model, p, t))
  total = 0.0
  for i in range(0, windows, batch_size):
    batch = tokens[i:i + batch_size]
    total += float(evaluate(params, batch)) * len(batch)
  return total / windows


class Run:
  """One optimizer's training run: parameters, state, losses, step times."""

  def __init__(self, name: str, optimizer: optax.GradientTransformation,
               model: nn.Module, params: Any, fused: bool = False,
               stochastic_rounding: bool = False):
    self.name = name
    self.params = params
    if fused:
      self.opt_state = optimizer.init(params)
      self.train_step = make_fused_step(model, optimizer, stochastic_rounding)
    else:
      tx = optax.chain(optax.clip_by_global_norm(1.0), optimizer)
      self.opt_state = tx.init(params)  # Outside jit: allocates the state.
      self.train_step = make_train_step(model, tx)
    self.losses: list[float] = []
    self.step_seconds: list[float] = []

  def step(self, tokens: np.ndarray) -> None:
    start = time.perf_counter()
    self.params, self.opt_state, loss = self.train_step(
        self.params, self.opt_state, tokens)
    self.losses.append(float(loss))  # Waits for the step to finish.
    self.step_seconds.append(time.perf_counter() - start)


def progress(step: int, steps: int, runs: list[Run], width: int = 20) -> None:
  """Redraw a one-line progress bar with each run's latest loss on stderr."""
  done = width * step // steps
  losses = '  '.join(f'{run.name.split(".")[-1]} {run.losses[-1]:.3f}'
                     for run in runs)
  sys.stderr.write(f'\r[{"#" * done}{"." * (width - done)}] '
                   f'{step}/{steps}  {losses}')
  if step == steps:
    sys.stderr.write('\n')
  sys.stderr.flush()


def summary(runs: list[Run], held_out: list[float], num_params: int) -> str:
  """The final table: losses, step time and optimizer state size per run."""
  width = max(28, *(len(run.name) for run in runs))
  lines = [
      f'{"optimizer":<{width}} {"train loss":>10} {"val loss":>9} '
      f'{"step ms":>8} {"state bytes":>12} {"bytes/param":>11}'
  ]
  for run, val in zip(runs, held_out, strict=True):
    size = optax_paged.state_nbytes(run.opt_state)
    final = np.mean(run.losses[-FINAL_WINDOW:])
    step_ms = 1e3 * np.mean(run.step_seconds[1:])
    lines.append(
        f'{run.name:<{width}} {final:>10.4f} {val:>9.4f} {step_ms:>8.1f} '
        f'{size:>12,} {size / num_params:>11.3f}'
    )
  return '\n'.join(lines)


def plot(runs: list[Run], num_params: int, path: str,
         baseline: int = -1) -> None:
  """Save the loss curves and, below, each run's minus the baseline run's."""
  fig = Figure(figsize=(8, 6))
  FigureCanvasAgg(fig)  # Render with Agg: no display needed.
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  window = np.ones(FINAL_WINDOW) / FINAL_WINDOW
  smooth = [np.convolve(run.losses, window, mode='valid') for run in runs]
  steps = np.arange(FINAL_WINDOW, len(runs[0].losses) + 1)
  top.plot(np.arange(1, len(runs[0].losses) + 1), runs[0].losses,
           color='0.6', linewidth=0.6, label=f'{runs[0].name}, per step')
  styles = ('-', '-.', '--', ':')
  # One colour a run in both panels (matplotlib's cycle would restart below).
  colors = [f'C{i % 10}' for i in range(len(runs))]
  for i, (run, curve) in enumerate(zip(runs, smooth, strict=True)):
    top.plot(steps, curve, styles[i % len(styles)], color=colors[i],
             linewidth=1.8, label=f'{run.name}, {FINAL_WINDOW}-step mean')
  top.set_ylabel('training loss (nats/char)')
  top.set_title(f'Character-level transformer, {num_params:,} parameters')
  top.legend(fontsize='small')
  base = runs[baseline]
  for run, curve, color in zip(runs, smooth, colors, strict=True):
    if run is not base:
      bottom.plot(steps, curve - smooth[baseline], color=color, label=run.name)
  bottom.axhline(0.0, color='black', linewidth=0.6)
  bottom.set_xlabel('step')
  bottom.set_ylabel(f'minus {base.name.split(".")[-1]}', fontsize='small')
  bottom.legend(fontsize='x-small')
  for ax in (top, bottom):
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=500)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--width', type=int, default=128)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--context', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--text', choices=sorted(CORPORA), default='docstrings',
                      help='training text: docstrings (0.3 MB, for the CPU) '
                      'or stdlib-source (12 MB, for larger models)')
  parser.add_argument('--family', choices=sorted(FAMILIES), default='adamw',
                      help='adamw (8-bit, 4-bit, optax.adamw) or lion '
                      '(8-bit, 4-bit, optax.lion)')
  parser.add_argument('--precision', choices=('fp32', 'bf16'),
                      default='fp32',
                      help='fp32: the family\'s 8-bit, 4-bit and optax '
                      'optimizers; bf16: parameter precisions and master '
                      'weights (see the module docstring)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--plot', default=None,
                      help='where to save the loss curves (default: '
                      'train_lm_<family>_<precision>.png in the temporary '
                      'folder, outside the checkout)')
  args = parser.parse_args()
  if args.plot is None:
    args.plot = str(pathlib.Path(tempfile.gettempdir())
                    / f'train_lm_{args.family}_{args.precision}.png')
  if args.steps < FINAL_WINDOW:
    parser.error(f'--steps must be at least {FINAL_WINDOW} (the final-loss '
                 'window)')

  train, val, vocab_size = encode(CORPORA[args.text]())
  model = Transformer(vocab_size, args.context, args.layers, args.width,
                      args.heads)
  params = model.init(jax.random.key(args.seed),
                      jnp.zeros((1, args.context), jnp.int32))
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  print(f'{len(train):,} training and {len(val):,} held-out characters, '
        f'vocabulary {vocab_size}, {num_params:,} parameters, {args.steps} '
        f'steps of {args.batch} x {args.context} characters')

  peak, hyperparams, factories = FAMILIES[args.family]
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak,
      warmup_steps=max(1, args.steps // 10), decay_steps=args.steps,
      end_value=peak / 10)
  if args.precision == 'bf16':
    runs = precision_runs(factories, schedule, hyperparams, model, params)
  else:
    runs = [
        Run(f'{factory.__module__.split(".")[0]}.{factory.__name__}',
            factory(schedule, **hyperparams), model, params)
        for factory in factories
    ]
  start = time.perf_counter()
  data_stream = batches(train, args.context, args.batch, args.seed)
  for step in range(1, args.steps + 1):
    tokens = next(data_stream)
    for run in runs:
      run.step(tokens)
    progress(step, args.steps, runs)
  held_out = [held_out_loss(model, run.params, val, args.context, args.batch)
              for run in runs]
  total = time.perf_counter() - start
  print()
  print(summary(runs, held_out, num_params))
  print(f'\ntotal wall time {total:.1f} s (including JIT compilation)')
  plot(runs, num_params, args.plot,
       baseline=0 if args.precision == 'bf16' else -1)
  print(f'loss curves saved to {args.plot}')
  for run in runs:
    optax_paged.release(run.opt_state)


if __name__ == '__main__':
  main()
