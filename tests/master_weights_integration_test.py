"""Master weights through chains, injection, accumulation and train states."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_paged
from optax_paged.train_state import FusedTrainState
from tests.helpers import random_grads
from tests.helpers import random_tree

SHAPES = [(300,), (64, 65)]


def _make(**kwargs):
  return optax_paged.adamw8bit(1e-2, master_weight_bits=24, min_8bit_size=1,
                               **kwargs)


def _bits(tree):
  return {k: np.asarray(v).view(np.uint16) for k, v in tree.items()}


def _steps(tx, params, grads_list, step):
  state = tx.init(params)
  for grads in grads_list:
    params, state = step(tx, grads, state, params)
  return params, state


def _update_apply(tx, grads, state, params):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


PARAMS = random_tree(SHAPES, jnp.bfloat16, seed=5)
GRADS = [random_grads(PARAMS, seed=50 + i, scale=0.1) for i in range(4)]


def test_a_chain_before_the_optimizer_is_the_optimizer_on_clipped_grads():
  clip = optax.clip_by_global_norm(0.5)
  chained, _ = _steps(optax.chain(clip, _make()), PARAMS, GRADS,
                      jax.jit(_update_apply, static_argnums=0))
  # Jitted as in the chain: on the GPU, XLA's norm reduction in an eager
  # call need not sum in the jitted step's order.
  clip_alone = jax.jit(lambda g: clip.update(g, clip.init(PARAMS))[0])
  clipped = [clip_alone(g) for g in GRADS]
  alone, _ = _steps(_make(), PARAMS, clipped, _update_apply)
  np.testing.assert_equal(_bits(chained), _bits(alone))


def test_a_transformation_after_the_optimizer_resets_every_step_loudly():
  # optax.scale after the optimizer changes the parameters the correction
  # was written for: each block restarts from the parameters, and says so.
  tx = optax.chain(_make(), optax.scale(0.5))
  _, state = _steps(tx, PARAMS, GRADS, _update_apply)
  resets = optax_paged.memory_report(state).master_weight_resets
  blocks = sum(-(-int(np.prod(s)) // 128) for s in SHAPES)
  assert resets >= blocks  # the later steps reset (nearly) every block


def test_inject_hyperparams_with_master_weight_bits_static():
  # float32 hyperparameters: in bf16 (optax's default for bf16 parameters)
  # b2 = 0.999 would round to 1.
  injected = optax.inject_hyperparams(
      optax_paged.adamw8bit, static_args=('master_weight_bits',
                                          'min_8bit_size'),
      hyperparam_dtype=jnp.float32)(
      learning_rate=1e-2, master_weight_bits=24, min_8bit_size=1)
  ours, _ = _steps(injected, PARAMS, GRADS, jax.jit(_update_apply,
                                                    static_argnums=0))
  plain, _ = _steps(_make(), PARAMS, GRADS, jax.jit(_update_apply,
                                                     static_argnums=0))
  for name in ours:
    np.testing.assert_allclose(np.asarray(ours[name], np.float32),
                               np.asarray(plain[name], np.float32),
                               atol=2 ** -6)


def test_inject_hyperparams_traced_at_init_names_static_args():
  injected = optax.inject_hyperparams(
      optax_paged.adamw8bit, static_args=('min_8bit_size',))(
      learning_rate=1e-2, master_weight_bits=24)
  with pytest.raises(TypeError, match='static_args'):
    jax.jit(injected.init)(PARAMS)


def test_accumulated_steps_equal_steps_of_the_mean_gradient():
  tx = optax_paged.accumulate_gradients(_make(), every_k=2)
  accumulated, _ = _steps(tx, PARAMS, GRADS, _update_apply)
  means = [jax.tree.map(lambda a, b: ((a.astype(jnp.float32)
                                       + b.astype(jnp.float32)) / 2
                                      ).astype(a.dtype), GRADS[i],
                        GRADS[i + 1]) for i in (0, 2)]
  direct, _ = _steps(_make(), PARAMS, means, _update_apply)
  for name in direct:
    np.testing.assert_allclose(np.asarray(accumulated[name], np.float32),
                               np.asarray(direct[name], np.float32),
                               atol=2 ** -6)


def test_fused_train_state_keeps_the_masters():
  state = FusedTrainState.create(apply_fn=None, params=PARAMS, tx=_make())
  for grads in GRADS:
    state = state.apply_gradients(grads=grads)
  plain, _ = _steps(_make(), PARAMS, GRADS, _update_apply)
  np.testing.assert_equal(_bits(state.params), _bits(plain))
  masters = optax_paged.master_params(state, state.params)
  assert all(m.dtype == jnp.float32 for m in masters.values())


class _BfloatMlp(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 128, param_dtype=jnp.bfloat16, rngs=rngs)
    self.out = nnx.Linear(128, 4, param_dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_optimizer_with_master_weights_matches_plain_jax():
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 64))
  y = jax.random.normal(jax.random.PRNGKey(1), (32, 4))

  def loss(model):
    return jnp.mean((model(x).astype(jnp.float32) - y) ** 2)

  model = _BfloatMlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _make(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model))

  graphdef, params = nnx.split(_BfloatMlp(nnx.Rngs(0)))
  tx = _make()
  state = tx.init(params)

  @jax.jit
  def plain_step(params, state):
    grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(4):
    step(model, optimizer)
    params, state = plain_step(params, state)
  ours = nnx.state(model, nnx.Param)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16),
                                  np.asarray(b).view(np.uint16))
  masters = optax_paged.master_params(optimizer, ours)
  for leaf in jax.tree.leaves(masters):
    assert leaf.dtype == jnp.float32
