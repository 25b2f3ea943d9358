"""A small workload for compute-sanitizer: every kernel path, few launches.

Covers fp32/bf16/fp16, 8-bit and fp32 leaves, partial blocks and vectors,
the fused step, and the host tier.
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
    jax.block_until_ready(params3)
    optax_paged.release(state)
print('workload done')
