"""A fused 8-bit (or 4-bit) step on the 308M model, for ncu.

  ncu --clock-control none --kernel-name regex:UpdateKernel --launch-skip 4 \\
      --launch-count 1 --section SpeedOfLight \\
      python tools/profile_fused.py bf16 adamw [24]

The optimizer is one of adamw, adamw4bit, lion, lion4bit, ademamix; a third
argument (24 or 32, bf16 only) keeps master weights of that many bits.

Builds benchmarks/gpu_step.py's model in the given dtype (fp32, bf16) and
runs six fused steps of the optimizer, so that ncu can skip the warm-up
launches.
"""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

import optax_paged

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent
                       / 'benchmarks'))
import cpu_step  # noqa: E402

DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}
OPTIMIZERS = {'adamw': optax_paged.paged_adamw8bit,
              'adamw4bit': optax_paged.paged_adamw4bit,
              'lion': optax_paged.lion8bit,
              'lion4bit': optax_paged.lion4bit,
              'ademamix': optax_paged.ademamix8bit}


def main() -> None:
  dtype = DTYPES[sys.argv[1] if len(sys.argv) > 1 else 'fp32']
  key = jax.random.key(0)
  params = jax.tree.map(lambda x: x.astype(dtype),
                        cpu_step.random_tree(key, 24, 0.02))
  grads = jax.tree.map(lambda x: x.astype(dtype),
                       cpu_step.random_tree(jax.random.fold_in(key, 1), 24,
                                            1e-3))
  master = {'master_weight_bits': int(sys.argv[3])} if len(sys.argv) > 3 else {}
  tx = OPTIMIZERS[sys.argv[2] if len(sys.argv) > 2 else 'adamw'](1e-4,
                                                                 **master)
  state = tx.init(params)
  step = jax.jit(functools.partial(optax_paged.apply_gradients, tx),
                 donate_argnums=(1, 2))
  for _ in range(6):
    params, state = step(grads, state, params)
  jax.block_until_ready(params)
  optax_paged.release(state)


if __name__ == '__main__':
  main()
