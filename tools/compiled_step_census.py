"""What XLA compiled for gpu_step.py's update-and-apply steps.

  python tools/compiled_step_census.py [fp32|bf16]

For `optax.adamw` and `paged_adamw8bit` (update + apply, gradients passed
in), prints the entry computation's whole-buffer copies, fusions, custom
calls and kernel-launching instructions, and the median step time, so that a
slow peer row can be told apart from a slow machine.
"""

import collections
import os
import pathlib
import re
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

import optax_paged

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent
                       / 'benchmarks'))
import cpu_step  # noqa: E402
import gpu_step  # noqa: E402

DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}


def census(text: str) -> collections.Counter:
  """Counts of the entry computation's instructions by opcode."""
  entry = text[text.find('ENTRY'):]
  entry = entry[:entry.find('\n}')]
  counts = collections.Counter()
  for line in entry.splitlines()[1:]:
    if ' = ' in line:
      # The opcode is the first name followed by '(' after the result type,
      # which may be a tuple.
      opcode = re.search(r'\s([a-z][a-z0-9-]*)\(', line.split(' = ', 1)[1])
      counts[opcode.group(1) if opcode else '?'] += 1
  return counts


def main() -> None:
  dtype = DTYPES[sys.argv[1] if len(sys.argv) > 1 else 'fp32']
  key = jax.random.key(0)
  params = jax.tree.map(lambda x: x.astype(dtype),
                        cpu_step.random_tree(key, 24, 0.02))
  grads = [jax.tree.map(lambda x: x.astype(dtype),
                        cpu_step.random_tree(jax.random.fold_in(key, i), 24,
                                             1e-3)) for i in (1, 2)]
  # OPTAX_PAGED_BALLAST_GB: that many GB of other live arrays, as
  # gpu_step.py's eight runners hold, to see whether the peer slows with them.
  ballast = [jnp.ones((1 << 28,), jnp.float32) for _ in range(
      int(os.environ.get('OPTAX_PAGED_BALLAST_GB', '0')))]
  runners = [
      gpu_step.Runner('optax.adamw', optax.adamw(**gpu_step.HYPER), params,
                      False),
      gpu_step.Runner('paged_adamw8bit', optax_paged.paged_adamw8bit(
          **gpu_step.HYPER, device_budget=1.0), params, False),
  ]
  for r in runners:
    text = r.step.lower(r.params, r.state, grads[0], r.scale).compile(
    ).as_text()
    counts = census(text)
    for _ in range(3):
      r.run(grads, 10, timed=False)
    for _ in range(7):
      r.run(grads, 10, timed=True)
    other = sum(counts.values()) - sum(
        counts[k] for k in ('copy', 'fusion', 'custom-call'))
    print(f'{r.name}: median {statistics.median(r.times) * 1e3:.2f} ms, '
          f'dispatch {statistics.median(r.dispatch_times) * 1e3:.2f} ms; '
          f'copies {counts["copy"]}, fusions {counts["fusion"]}, '
          f'custom-calls {counts["custom-call"]}, other {other}')
  del ballast
  for r in runners:
    if r.name.startswith('paged'):
      optax_paged.release(r.state)


if __name__ == '__main__':
  main()
