"""See it work: train the same Flax model with paged_adamw8bit and optax.adamw.

A character-level language model (an embedding of the last few characters
and a two-layer MLP, written with ``flax.linen``) learns to predict the next
character of the docstrings of a few standard-library modules, so the data
ships with Python. It is trained twice, from the same initialisation, on the
same batches and with the same hyperparameters: once with
``optax_paged.paged_adamw8bit`` and once with ``optax.adamw``, both after
``optax.clip_by_global_norm(1.0)``. Nearly all the parameters are in leaves of
at least 4096 elements, whose moments optax_paged keeps in 8 bits.

The losses of the two runs should fall together and end within a few percent
of each other, while the 8-bit state takes about a quarter of the memory.

Run it from the repository root (about a minute on a 2-core CPU):

  python examples/train_demo.py
  python examples/train_demo.py --steps 500   # quicker
"""

import argparse
import importlib
import inspect
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged

MODULES = (
    'builtins', 'collections', 'functools', 'itertools', 'json', 'random',
    're', 'statistics', 'textwrap', 'string', 'heapq', 'argparse',
)
HYPERPARAMS = dict(learning_rate=3e-3, b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=1e-4)
FINAL_WINDOW = 20  # final loss: mean of the last this-many steps

# (params, opt_state, tokens, targets) -> (params, opt_state, loss)
TrainStep = Callable[
    [Any, Any, jax.Array, jax.Array], tuple[Any, Any, jax.Array]
]


def corpus() -> str:
  """The docstrings of MODULES and of their public members, deduplicated."""
  docs: dict[str, None] = {}
  for name in MODULES:
    module = importlib.import_module(name)
    objects = [module] + [
        getattr(module, attr) for attr in sorted(dir(module))
        if not attr.startswith('_')
    ]
    docs.update((doc, None) for doc in map(inspect.getdoc, objects) if doc)
  return '\n\n'.join(docs)


class CharMLP(nn.Module):
  """Next-character logits from the previous ``context`` characters."""

  vocab_size: int
  embed_dim: int = 32
  hidden_dim: int = 512

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
    x = x.reshape(x.shape[0], -1)
    x = nn.gelu(nn.Dense(self.hidden_dim)(x))
    x = nn.gelu(nn.Dense(self.hidden_dim)(x))
    return nn.Dense(self.vocab_size)(x)


def batches(data: np.ndarray, context: int, batch_size: int,
            seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Random windows of ``data``: (characters, the character after each)."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(context)
  while True:
    starts = rng.integers(0, len(data) - context, size=batch_size)
    yield data[starts[:, None] + offsets], data[starts + context]


def make_train_step(model: nn.Module,
                    tx: optax.GradientTransformation) -> TrainStep:
  """A jitted step: gradients, ``tx.update`` and the new parameters."""

  def loss_fn(params, tokens, targets):
    logits = model.apply(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  @jax.jit
  def train_step(params, opt_state, tokens, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


class Run:
  """One optimizer's training run: parameters, state, losses, time."""

  def __init__(self, name: str, optimizer: optax.GradientTransformation,
               model: nn.Module, params: Any):
    self.name = name
    tx = optax.chain(optax.clip_by_global_norm(1.0), optimizer)
    self.params = params
    self.opt_state = tx.init(params)  # Outside jit: allocates the state.
    self.train_step = make_train_step(model, tx)
    self.losses: list[float] = []
    self.seconds = 0.0

  def step(self, tokens: np.ndarray, targets: np.ndarray) -> None:
    start = time.perf_counter()
    self.params, self.opt_state, loss = self.train_step(
        self.params, self.opt_state, tokens, targets)
    self.losses.append(float(loss))  # Waits for the step to finish.
    self.seconds += time.perf_counter() - start


def summary(runs: list[Run], num_params: int) -> str:
  """The final table: loss, optimizer state size and wall time per run."""
  lines = [
      f'{"optimizer":<28} {"final loss":>10} {"state bytes":>12} '
      f'{"bytes/param":>11} {"wall s":>7}'
  ]
  for run in runs:
    size = optax_paged.state_nbytes(run.opt_state)
    final = np.mean(run.losses[-FINAL_WINDOW:])
    lines.append(
        f'{run.name:<28} {final:>10.4f} {size:>12,} '
        f'{size / num_params:>11.3f} {run.seconds:>7.1f}'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--context', type=int, default=16)
  parser.add_argument('--log-every', type=int, default=200)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()

  text = corpus()
  vocab = {char: i for i, char in enumerate(sorted(set(text)))}
  data = np.asarray([vocab[char] for char in text], np.int32)
  model = CharMLP(vocab_size=len(vocab))
  params = model.init(jax.random.key(args.seed),
                      jnp.zeros((1, args.context), jnp.int32))
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  print(f'{len(text):,} characters, vocabulary {len(vocab)}, '
        f'{num_params:,} parameters, {args.steps} steps of '
        f'{args.batch_size} x {args.context} characters')

  runs = [
      Run('optax_paged.paged_adamw8bit',
          optax_paged.paged_adamw8bit(**HYPERPARAMS), model, params),
      Run('optax.adamw', optax.adamw(**HYPERPARAMS), model, params),
  ]
  start = time.perf_counter()
  data_stream = batches(data, args.context, args.batch_size, args.seed)
  for step in range(1, args.steps + 1):
    tokens, targets = next(data_stream)
    for run in runs:
      run.step(tokens, targets)
    if step % args.log_every == 0 or step == 1:
      losses = '  '.join(f'{run.name} {run.losses[-1]:.4f}' for run in runs)
      print(f'step {step:>5}  loss: {losses}')
  total = time.perf_counter() - start
  print()
  print(summary(runs, num_params))
  print(f'\ntotal wall time {total:.1f} s (including JIT compilation)')
  for run in runs:
    optax_paged.release(run.opt_state)


if __name__ == '__main__':
  main()
