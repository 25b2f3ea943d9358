"""The language model of train_lm.py, and its loss.

A decoder-only transformer (``flax.linen``): token embedding, learned
positions, pre-LayerNorm blocks of causal self-attention and an MLP, a final
LayerNorm and an output projection. Its own module so that benchmarks can
build it without the example's plotting dependencies.
"""

from typing import Any

import flax.linen as nn
import jax
import optax


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then an MLP."""

  heads: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = x + nn.MultiHeadDotProductAttention(self.heads)(
        nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(x)))
    return x + nn.Dense(width)(h)


class Transformer(nn.Module):
  """Next-character logits at every position of a sequence of characters."""

  vocab_size: int
  context: int
  layers: int
  width: int
  heads: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    positions = self.param('positions', init, (self.context, self.width))
    x = nn.Embed(self.vocab_size, self.width, embedding_init=init)(tokens)
    x = x + positions[:tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      x = Block(self.heads)(x, mask)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))



def loss_fn(model: nn.Module, params: Any, tokens: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy over every position of ``tokens``."""
  logits = model.apply(params, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()
