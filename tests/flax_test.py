"""Flax Linen train states and Flax NNX optimizers around optax_paged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

import optax_paged
from optax_paged.train_state import FusedTrainState
from tests.helpers import assert_trees_equal


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(128)(x)))


def _data():
  k1, k2 = jax.random.split(jax.random.key(0))
  return jax.random.normal(k1, (32, 64)), jax.random.normal(k2, (32, 4))


def _linen_run(state_class, steps=4):
  x, y = _data()
  model = Mlp()
  params = model.init(jax.random.key(1), x)
  state = state_class.create(
      apply_fn=model.apply, params=params,
      tx=optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256),
  )

  @jax.jit
  def step(state):
    def loss(p):
      return jnp.mean((state.apply_fn(p, x) - y) ** 2)
    grads = jax.grad(loss)(state.params)
    return state.apply_gradients(grads=grads)

  for _ in range(steps):
    state = step(state)
  return state


def test_linen_train_state_matches_the_manual_optax_loop():
  state = _linen_run(train_state.TrainState)
  x, y = _data()
  model = Mlp()
  params = model.init(jax.random.key(1), x)
  tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(4):
    params, opt_state = step(params, opt_state)
  assert int(state.step) == 4
  assert_trees_equal(state.params, params)
  assert_trees_equal(optax_paged.state_dict(state.opt_state),
                     optax_paged.state_dict(opt_state))


def test_fused_train_state_is_bit_identical_to_train_state():
  plain = _linen_run(train_state.TrainState)
  fused = _linen_run(FusedTrainState)
  assert_trees_equal(fused.params, plain.params)
  assert_trees_equal(optax_paged.state_dict(fused.opt_state),
                     optax_paged.state_dict(plain.opt_state))


class NnxMlp(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_optimizer_update_matches_optax_on_the_same_tree():
  x, y = _data()
  model = NnxMlp(nnx.Rngs(0))
  tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss(m):
    return jnp.mean((m(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  # The same model and optimizer through plain JAX and optax.
  graphdef, params = nnx.split(NnxMlp(nnx.Rngs(0)))
  ref_tx = optax_paged.paged_adamw8bit(1e-2, min_8bit_size=256)
  ref_state = ref_tx.init(params)

  @jax.jit
  def ref_step(params, ref_state):
    grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p)))(params)
    updates, ref_state = ref_tx.update(grads, ref_state, params)
    return optax.apply_updates(params, updates), ref_state

  losses = []
  for _ in range(4):
    losses.append(float(loss(model)))
    step(model, optimizer)
    params, ref_state = ref_step(params, ref_state)
  assert losses[-1] < losses[0]
  ours = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert_trees_equal(ours, jax.tree.leaves(params))
