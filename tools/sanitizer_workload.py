"""A small workload for compute-sanitizer: every kernel path, few launches.

Covers fp32/bf16/fp16, 8-bit and fp32 leaves, partial blocks and vectors,
the fused step (with and without stochastic rounding), the host tier,
updates written over gradients made in the step, the optimizers with one
and three moments, 4-bit states, and master-weight corrections (24 and 32
bits, both tiers, with a parameter changed outside the optimizer so the
reset path runs), and a step of more leaves than one launch takes (each
launch with its own run counter).
"""

import functools

import jax
import jax.numpy as jnp
import optax

import optax_paged

SHAPES = [(1000, 1029), (4097,), (300,), (3,)]

for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
  params = {
      f'p{i}': jnp.full(shape, 0.5, dtype) for i, shape in enumerate(SHAPES)
  }
  grads = jax.tree.map(lambda p: (p * 0.01).astype(p.dtype), params)
  for budget in (1.0, 0):
    tx = optax_paged.paged_adamw8bit(1e-3, min_8bit_size=256,
                                     device_budget=budget)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params2 = optax.apply_updates(params, updates)
    fused = jax.jit(functools.partial(optax_paged.apply_gradients, tx))
    params3, state = fused(grads, state, params2)
    rounded = jax.jit(functools.partial(
        optax_paged.apply_gradients, tx, stochastic_rounding=True))
    params4, state = rounded(grads, state, params3)

    @jax.jit
    def made_in_step(grads, scale, state, params, tx=tx):
      return tx.update(jax.tree.map(lambda g: g * scale, grads), state, params)

    updates, state = made_in_step(grads, jnp.asarray(2, dtype), state, params4)
    jax.block_until_ready(updates)
    optax_paged.release(state)
  for tx in (optax_paged.lion8bit(1e-4, min_8bit_size=256),
             optax_paged.ademamix8bit(1e-4, min_8bit_size=256),
             optax_paged.paged_adamw4bit(1e-4, min_8bit_size=256)):
    state = tx.init(params)
    jax.block_until_ready(
        jax.jit(functools.partial(optax_paged.apply_gradients, tx))(
            grads, state, params))
    optax_paged.release(state)

# Few configurations: every launch under the sanitizer compiles slowly.
MASTER_RUNS = [
    (jnp.bfloat16, optax_paged.paged_adamw8bit, 24, 1.0),
    (jnp.bfloat16, optax_paged.paged_adamw8bit, 32, 0),
    (jnp.bfloat16, optax_paged.paged_adamw4bit, 24, 0),
    (jnp.float16, optax_paged.paged_adamw8bit, 24, 0),
]
for dtype, factory, bits, budget in MASTER_RUNS:
  params = {
      f'p{i}': jnp.full(shape, 0.5, dtype) for i, shape in enumerate(SHAPES)
  }
  grads = jax.tree.map(lambda p: (p * 0.01).astype(p.dtype), params)
  tx = factory(1e-3, min_8bit_size=256, device_budget=budget,
               master_weight_bits=bits)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  params2 = optax.apply_updates(params, updates)
  fused = jax.jit(functools.partial(optax_paged.apply_gradients, tx))
  params3, state = fused(grads, state, params2)
  changed = dict(params3, p0=params3['p0'].at[:7].set(2.0))
  params4, state = fused(grads, state, changed)
  jax.block_until_ready(optax_paged.master_params(state, params4))
  optax_paged.release(state)
# Over 224 leaves: two launches in one step, each with its own run counter.
params = {f'p{i}': jnp.full((300 + i,), 0.5) for i in range(230)}
tx = optax_paged.adamw8bit(1e-3, min_8bit_size=256)
state = tx.init(params)
fused = jax.jit(functools.partial(optax_paged.apply_gradients, tx))
jax.block_until_ready(fused(jax.tree.map(lambda p: p * 0.01, params), state,
                            params))
optax_paged.release(state)
print('workload done')
