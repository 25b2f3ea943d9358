"""Keep one parameter's optimizer state in fp32: ``keep_32bit``.

8-bit optimizer state suits most weights, but embeddings are often kept in
fp32 (rare tokens get rare, small gradients, which blockwise quantization
handles worst). ``keep_32bit`` marks the leaves whose state stays fp32 with a
tree of booleans shaped like the parameters, or with a function of the
parameters that returns one, here every leaf under a Flax ``nn.Embed``::

  tx = optax_paged.paged_adamw8bit(1e-3, keep_32bit=lambda params: (
      jax.tree_util.tree_map_with_path(
          lambda path, _: 'Embed' in jax.tree_util.keystr(path), params)))

The same split is possible with ``optax.multi_transform``, two optimizers and
a labelling function, but that is more code and two states to look after::

  tx = optax.multi_transform(
      {'fp32': optax_paged.paged_adamw(1e-3),
       '8bit': optax_paged.paged_adamw8bit(1e-3)},
      lambda params: jax.tree_util.tree_map_with_path(
          lambda path, _: 'fp32' if 'Embed' in jax.tree_util.keystr(path)
          else '8bit', params))

The model is a bag of embeddings (a 4096-token vocabulary, 64 dimensions)
followed by an MLP; it learns a synthetic regression: the sum of a hidden
random value per token, with tokens drawn from a Zipf-like distribution so
that most of the vocabulary is rare. It is trained twice from the same
initialisation on the same batches, with and without the override, after
printing ``optax_paged.memory_report`` of the state with it.

Run it from the repository root (about 10 seconds on a 2-core CPU):

  python examples/finetune_embedding_32bit.py
"""

import argparse
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged

VOCAB = 4096
EMBED_DIM = 64
SEQUENCE = 32
FINAL_WINDOW = 20  # final loss: mean of the last this-many steps

# (params, opt_state, tokens, targets) -> (params, opt_state, loss)
TrainStep = Callable[
    [Any, Any, jax.Array, jax.Array], tuple[Any, Any, jax.Array]
]


class BagOfEmbeddings(nn.Module):
  """A scalar from the mean embedding of a sequence of tokens."""

  hidden_dim: int = 256

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(VOCAB, EMBED_DIM)(tokens).mean(axis=-2)
    x = nn.gelu(nn.Dense(self.hidden_dim)(x))
    x = nn.gelu(nn.Dense(self.hidden_dim)(x))
    return nn.Dense(1)(x)[..., 0]


def embedding_leaves(params: Any) -> Any:
  """True for the leaves of every ``nn.Embed``, False elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'Embed' in jax.tree_util.keystr(path), params)


def batches(batch_size: int,
            seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Zipf-distributed token sequences and the sum of their hidden values."""
  rng = np.random.default_rng(seed)
  values = rng.normal(size=VOCAB).astype(np.float32)
  frequency = 1.0 / np.arange(1, VOCAB + 1)
  frequency /= frequency.sum()
  while True:
    tokens = rng.choice(VOCAB, size=(batch_size, SEQUENCE), p=frequency)
    yield tokens.astype(np.int32), values[tokens].sum(-1) / np.sqrt(SEQUENCE)


def make_train_step(model: nn.Module,
                    tx: optax.GradientTransformation) -> TrainStep:
  """A jitted step using the fused ``optax_paged.apply_gradients``."""

  def loss_fn(params, tokens, targets):
    return jnp.mean((model.apply(params, tokens) - targets) ** 2)

  @jax.jit
  def train_step(params, opt_state, tokens, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
    params, opt_state = optax_paged.apply_gradients(
        tx, grads, opt_state, params)
    return params, opt_state, loss

  return train_step


def train(tx: optax.GradientTransformation, model: nn.Module, params: Any,
          args: argparse.Namespace,
          show_report: bool = False) -> tuple[float, int]:
  """Train ``params`` with ``tx``: the final loss and the state's bytes."""
  opt_state = tx.init(params)  # Outside jit: allocates the state.
  report = optax_paged.memory_report(opt_state)
  if show_report:
    print(report)
  train_step = make_train_step(model, tx)
  data = batches(args.batch_size, args.seed)
  losses = []
  for _ in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state, *next(data))
    losses.append(float(loss))
  optax_paged.release(opt_state)
  return float(np.mean(losses[-FINAL_WINDOW:])), report.total_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--learning-rate', type=float, default=1e-3)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()

  model = BagOfEmbeddings()
  params = model.init(jax.random.key(args.seed),
                      jnp.zeros((1, SEQUENCE), jnp.int32))
  hyperparams = dict(learning_rate=args.learning_rate, weight_decay=0.01)
  print('paged_adamw8bit(..., keep_32bit=embedding_leaves):')
  with_override = train(
      optax_paged.paged_adamw8bit(**hyperparams, keep_32bit=embedding_leaves),
      model, params, args, show_report=True)
  all_8bit = train(optax_paged.paged_adamw8bit(**hyperparams), model, params,
                   args)
  print(f'\n{"optimizer state":<34} {"final loss":>10} {"state bytes":>12}')
  for name, (loss, nbytes) in (('embedding fp32, rest 8-bit', with_override),
                               ('all 8-bit', all_8bit)):
    print(f'{name:<34} {loss:>10.4f} {nbytes:>12,}')
  print(f'(final loss: mean of the last {FINAL_WINDOW} of {args.steps} steps)')


if __name__ == '__main__':
  main()
