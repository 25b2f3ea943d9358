"""Ahead-of-time compiles of the TPU path's step by the real TPU compiler.

``jax.experimental.topologies`` gives compile-only TPU devices on a CPU
machine when ``libtpu`` is installed (``pip install 'jax[tpu]'``); the
compiled program's cost analysis is the compiler's own. A kernel's bytes
there are its operands and results as XLA lays them out (each read or
written once: the kernel streams its tiles), and everything around the
kernels is XLA's count. Marked ``tpu_compile``.
"""

import math
import os
import re

import jax
import jax.numpy as jnp
import pytest

import optax_paged
from optax_paged._src import tpu_transform

pytestmark = pytest.mark.tpu_compile

try:
  import libtpu  # noqa: F401
except ImportError:
  pytest.skip("libtpu is not installed (pip install 'jax[tpu]'): the TPU "
              'compiler is not here', allow_module_level=True)

from jax.experimental import topologies  # noqa: E402

# No TPU is opened here, only the compiler: another process compiling for a
# topology at the same time (a second pytest session) must not stop this
# one at libtpu's single-process lock file.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

# A transformer block's MLP matrices (d_model 4096, MLP 16384: a wide one
# and a tall one) and an embedding (three dimensions): 201M parameters,
# each leaf larger than a TPU's VMEM, as in the models this is for (XLA
# stages arrays that fit into VMEM first, copies that a real model's leaves
# do not get). Each leaf's kernel compiles on its own (about a second
# each); the attention matrix (4096, 12288), a wide matrix as 'up' is, is
# left out to keep the suite's time.
SHAPES = {'up': (4096, 16384), 'down': (16384, 4096),
          'embedding': (2, 8192, 4096)}
# The traffic floor of 8-bit AdamW's fused step: read the gradient and the
# parameter, write the parameter, read and write two 1-byte codes.
FLOOR = {jnp.float32: 16, jnp.bfloat16: 10}
# With a master: the bf16 step's, and the correction read and written (1 + 1
# bytes for 24 bits, 2 + 2 for 32).
MASTER_FLOOR = {24: 12, 32: 14}
# The target. Measured with libtpu 0.0.42.1, v5e and v6e alike (bytes
# a parameter): float32 16.06, bfloat16 10.06, bfloat16 with a 24-bit master
# 12.13, with a 32-bit one 14.13; the absmax adds 1/16 of a byte and the
# fingerprints another 1/16. Before the kernel pinned its streamed operands
# to HBM (tpu_kernel.leaf_step), XLA staged the codes and absmax through
# VMEM and the count was 20.53, 14.53 and 16.79.
BOUND = 1.15


def compile_step(topology: str, dtype, *, device_budget=None, mesh_spec=None,
                 master_weight_bits=None, factory=optax_paged.paged_adamw8bit,
                 stochastic_rounding=False):
  devices = topologies.get_topology_desc(topology, 'tpu').devices
  if mesh_spec is None:
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    shardings = {k: sharding for k in SHAPES}
  else:
    mesh = jax.sharding.Mesh(devices, ('x',))
    shardings = {k: jax.sharding.NamedSharding(mesh, mesh_spec(k))
                 for k in SHAPES}
  params = {k: jax.ShapeDtypeStruct(s, dtype, sharding=shardings[k])
            for k, s in SHAPES.items()}
  with tpu_transform.force('tpu'):
    tx = factory(1e-3, weight_decay=0.01, device_budget=device_budget,
                 master_weight_bits=master_weight_bits)
  state = tx.init(params)  # abstract: laid out as the parameters
  step = jax.jit(lambda g, s, p: optax_paged.apply_gradients(
      tx, g, s, p, stochastic_rounding=stochastic_rounding),
                 donate_argnums=(1, 2))
  # Mosaic's lowering of sign (Lion) asks the default device for its TPU
  # generation: the topology's, not this machine's CPU.
  with jax.default_device(devices[0]):
    return step.lower(params, state, params).compile(), state


def parameters() -> int:
  return sum(jnp.size(jnp.zeros(s, jnp.int8)) for s in SHAPES.values())


def _diagonal(first, second, default):
  """Parameters of every (first, second) pair, ids 'first-second'; those
  not in ``default`` behind the slow marker."""
  for a in first:
    for b in second:
      marks = [] if (a, b) in default else [pytest.mark.slow]
      ids = [jnp.dtype(x).name if not isinstance(x, (str, int)) else str(x)
             for x in (a, b)]
      yield pytest.param(a, b, marks=marks, id='-'.join(ids))


# The figures are v5e's and v6e's alike (BOUND's measurements): the default
# run compiles each dtype on one topology, and both topologies; the other
# two compiles are behind the slow marker, to keep the suite's time.
@pytest.mark.parametrize('dtype, topology', list(_diagonal(
    [jnp.float32, jnp.bfloat16], ['v5e:2x2', 'v6e:2x2'],
    {(jnp.float32, 'v5e:2x2'), (jnp.bfloat16, 'v6e:2x2')})))
def test_step_traffic_is_near_the_floor(topology, dtype):
  compiled, _ = compile_step(topology, dtype)
  per_param = compiled.cost_analysis()['bytes accessed'] / parameters()
  assert FLOOR[dtype] <= per_param <= BOUND * FLOOR[dtype], per_param
  hlo = compiled.as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"',
                        hlo)) == len(SHAPES)
  # No gathers and nothing through host memory.
  assert not re.search(r'\bgather\(', hlo)
  assert 'S(5)' not in hlo and 'MoveToHost' not in hlo
  # The kernels stream the state from HBM: none of it is staged into VMEM
  # around them. The one array XLA copies is the code tables (2 KiB).
  assert hlo.count(' copy-start(') == 1, re.findall(r'.*copy-start\(.*', hlo)
  # The state and the parameters are updated in place (donated, aliased).
  assert compiled.memory_analysis().temp_size_in_bytes < parameters() // 100


# 4-bit states: read the gradient and the parameter, write the parameter,
# read and write each moment's half-byte codes (AdamW two moments, Lion
# one). The absmax, 4 bytes a block of 128, adds 1/16 of a byte a moment.
FOUR_BIT_FLOOR = {('adamw', jnp.float32): 14, ('adamw', jnp.bfloat16): 8,
                  ('lion', jnp.float32): 13, ('lion', jnp.bfloat16): 7}
FOUR_BIT = {'adamw': optax_paged.paged_adamw4bit,
            'lion': optax_paged.paged_lion4bit}


# In the default run: AdamW in float32 on v5e and in bfloat16 on v6e, and
# Lion (its stochastic rounding's hashed bits, int32 products and shifts
# lower too) in bfloat16 on v5e; the other five compiles (the same figures
# on both topologies, measured) are behind the slow marker, to keep the
# suite's time.
_FOUR_BIT_DEFAULT = {('adamw', jnp.float32, 'v5e:2x2'),
                     ('adamw', jnp.bfloat16, 'v6e:2x2'),
                     ('lion', jnp.bfloat16, 'v5e:2x2')}


def _four_bit_cases():
  for name in ('adamw', 'lion'):
    for dtype in (jnp.float32, jnp.bfloat16):
      for topology in ('v5e:2x2', 'v6e:2x2'):
        slow = (name, dtype, topology) not in _FOUR_BIT_DEFAULT
        yield pytest.param(
            name, dtype, topology, marks=[pytest.mark.slow] if slow else [],
            id=f'{name}-{jnp.dtype(dtype).name}-{topology}')


@pytest.mark.parametrize('name, dtype, topology', list(_four_bit_cases()))
def test_four_bit_step_traffic_is_near_the_floor(name, dtype, topology):
  compiled, state = compile_step(topology, dtype, factory=FOUR_BIT[name])
  codes = state.leaves['up'].moments[0].codes
  assert codes.shape == (4096, 8192) and codes.dtype == jnp.uint8
  per_param = compiled.cost_analysis()['bytes accessed'] / parameters()
  floor = FOUR_BIT_FLOOR[name, dtype]
  assert floor <= per_param <= BOUND * floor, per_param
  hlo = compiled.as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"',
                        hlo)) == len(SHAPES)
  assert not re.search(r'\bgather\(', hlo)
  assert 'S(5)' not in hlo and 'MoveToHost' not in hlo
  # The state streams from HBM. XLA copies only small operands: the code
  # tables (4 KiB) and Lion's rounding operands (a key, a stride and an
  # index a leaf's L rows: 12 bytes here).
  copies = re.findall(r'= \((\w+)\[([\d,]*)\].*copy-start\(', hlo)
  assert copies and all(
      math.prod(int(n) for n in dims.split(',') if n) <= 1024
      for _, dims in copies), copies
  assert compiled.memory_analysis().temp_size_in_bytes < parameters() // 100


def test_four_bit_host_tier_compiles():
  # Every leaf's state in pinned_host memory: the packed codes one row a
  # leaf there (tpu_host_tier), two moments of half a byte a parameter and
  # 4 bytes of absmax a block of 128.
  compiled, state = compile_step('v5e:2x2', jnp.bfloat16, device_budget=0,
                                 factory=optax_paged.paged_adamw4bit)
  assert {ls.tier for ls in state.leaves.values()} == {'host'}
  codes = state.leaves['embedding'].moments[0].codes
  assert codes.sharding.memory_kind == 'pinned_host'
  assert codes.shape == (math.prod(SHAPES['embedding']) // 2,)
  memory = compiled.memory_analysis()
  for stored in (memory.host_argument_size_in_bytes,
                 memory.host_output_size_in_bytes):
    assert (parameters() <= stored
            <= parameters() * 2 * (0.5 + 4 / 128) + 4096 * len(SHAPES)), stored
  hlo = compiled.as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == len(SHAPES)
  assert not re.search(r'\bgather\(', hlo)


# As the step's: each master width on one topology, and both topologies.
@pytest.mark.parametrize('topology, bits', list(_diagonal(
    ['v5e:2x2', 'v6e:2x2'], [24, 32], {('v5e:2x2', 24), ('v6e:2x2', 32)})))
def test_master_weight_step_traffic_is_near_the_floor(topology, bits):
  compiled, state = compile_step(topology, jnp.bfloat16,
                                 master_weight_bits=bits)
  master = state.leaves['up'].master
  assert master.correction.dtype == (jnp.int8 if bits == 24 else jnp.int16)
  assert master.correction.shape == SHAPES['up']
  per_param = compiled.cost_analysis()['bytes accessed'] / parameters()
  assert (MASTER_FLOOR[bits] <= per_param
          <= BOUND * MASTER_FLOOR[bits]), per_param
  hlo = compiled.as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"',
                        hlo)) == len(SHAPES)
  assert not re.search(r'\bgather\(', hlo)
  assert 'S(5)' not in hlo and 'MoveToHost' not in hlo
  # Corrections and fingerprints too are updated in place: no copies.
  assert compiled.memory_analysis().temp_size_in_bytes < parameters() // 100


def _split(name):
  return (jax.sharding.PartitionSpec(None, 'x', None) if name == 'embedding'
          else jax.sharding.PartitionSpec('x', None))


# The device keeps the down matrix's moments (codes and absmax), the first
# leaf in the state's order, the rest goes to the host; sharded, everything
# goes to the host.
_DOWN_STATE = 2 * (64 * 2**20 + 1 * 2**20)


# The sharded compile takes about 3 minutes on 2 cores (210 MB of generated
# code for the per-shard relayouts, not examined): a size run, so marked slow.
@pytest.mark.parametrize('case', ['float32', 'bfloat16_master',
                                  pytest.param('sharded',
                                               marks=pytest.mark.slow)])
def test_host_tier_compiles_with_the_planned_copies(case):
  # libtpu 0.0.42.1 refused the host tier while the codes kept their
  # 2-D layout in pinned_host memory (uint8 tiles differ between the two
  # memories, tpu_host_tier); one row a shard there compiles.
  sharded = case == 'sharded'
  compiled, state = compile_step(
      'v5e:2x2', jnp.float32 if case == 'float32' else jnp.bfloat16,
      device_budget=0 if sharded else _DOWN_STATE + (
          0 if case == 'float32'
          else math.prod(SHAPES['down']) * 33 // 32 + 2**20),
      mesh_spec=_split if sharded else None,
      master_weight_bits=None if case == 'float32' else 24)
  host = [k for k in SHAPES if state.leaves[k].tier == 'host']
  assert host == (list(SHAPES) if sharded else ['up', 'embedding'])
  codes = state.leaves['embedding'].moments[0].codes
  assert codes.sharding.memory_kind == 'pinned_host'
  size = math.prod(SHAPES['embedding'])
  assert codes.shape == ((1, 4, 1, size // 4) if sharded else (size,))
  # Per parameter: two moments of 1-byte codes and 4-byte absmax a block of
  # 256; a master adds its 1-byte correction and 4-byte fingerprint a block
  # of 128 (and a 4-byte reset count a leaf).
  # The codes and corrections alone are the floor: the sharded compile
  # counts 3/64 of a byte a parameter less than the arrays hold (not
  # examined).
  master = case != 'float32'
  per_param = 2 * (1 + 4 / 256) + (1 + 4 / 128 if master else 0)
  host_params = sum(math.prod(SHAPES[k]) for k in host)
  memory = compiled.memory_analysis()
  for stored in (memory.host_argument_size_in_bytes,
                 memory.host_output_size_in_bytes):
    assert (host_params * (2 + master) <= stored
            <= host_params * per_param + 4096 * len(host)), stored
  hlo = compiled.as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == len(SHAPES)
  assert not re.search(r'\bgather\(', hlo)
  assert not re.search(
      r'all-gather|all-reduce|all-to-all|collective-permute', hlo)


@pytest.mark.parametrize('master_weight_bits', [None, 24])
def test_sharded_step_compiles_per_shard(master_weight_bits):
  def spec(name):
    return (jax.sharding.PartitionSpec(None, 'x', None) if name == 'embedding'
            else jax.sharding.PartitionSpec('x', None))
  compiled, state = compile_step('v5e:2x2', jnp.bfloat16, mesh_spec=spec,
                                 master_weight_bits=master_weight_bits)
  hlo = compiled.as_text()
  # Every kernel runs on its shard: no collectives at all.
  assert not re.search(r'all-gather|all-reduce|all-to-all|collective-permute',
                       hlo)
  assert hlo.count('custom_call_target="tpu_custom_call"') == len(SHAPES)
  codes = state.leaves['up'].moments[0].codes
  assert codes.sharding.spec == jax.sharding.PartitionSpec('x', None)
  absmax = state.leaves['embedding'].moments[1].absmax
  assert absmax.sharding.spec == jax.sharding.PartitionSpec(None, None, 'x')
  if master_weight_bits:
    # The correction splits as the codes, the fingerprints as the absmax.
    master = state.leaves['embedding'].master
    assert master.correction.sharding.spec == jax.sharding.PartitionSpec(
        None, 'x', None)
    assert master.fingerprints.sharding.spec == absmax.sharding.spec


@pytest.mark.parametrize('name', ['paged_lamb8bit', 'paged_lars8bit'])
def test_trust_ratio_step_compiles_without_gathers(name):
  """LAMB and LARS: the kernels plus the trust ratio's norms in XLA. Their
  traffic has no 8-bit floor of its own (the kernel runs on float32 copies
  and writes float32 directions that the ratio then reads), so only the
  program is checked. Measured (libtpu 0.0.42.1, v5e, bfloat16, these
  leaves): 42.06 bytes accessed a parameter for LAMB, 40.03 for LARS,
  against 10.06 for 8-bit AdamW's fused step (46.86 and 43.23 with the
  attention matrix too)."""
  compiled, _ = compile_step('v5e:2x2', jnp.bfloat16,
                             factory=getattr(optax_paged, name))
  hlo = compiled.as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"',
                        hlo)) == len(SHAPES)
  assert not re.search(r'\bgather\(', hlo)
  assert 'S(5)' not in hlo and 'MoveToHost' not in hlo
  per_param = compiled.cost_analysis()['bytes accessed'] / parameters()
  print(f'{name}: {per_param:.2f} bytes accessed a parameter')


def test_stochastic_rounding_step_is_near_the_floor():
  """The fused step's stochastic rounding (bfloat16, v5e): the random bits'
  int32 products and shifts lower in the kernel, with no gathers and the
  traffic of the nearest step."""
  compiled, _ = compile_step('v5e:2x2', jnp.bfloat16, stochastic_rounding=True)
  per_param = compiled.cost_analysis()['bytes accessed'] / parameters()
  assert FLOOR[jnp.bfloat16] <= per_param <= BOUND * FLOOR[jnp.bfloat16], (
      per_param)
  hlo = compiled.as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"',
                        hlo)) == len(SHAPES)
  assert not re.search(r'\bgather\(', hlo)
  assert 'S(5)' not in hlo and 'MoveToHost' not in hlo
  print(f'stochastic rounding: {per_param:.2f} bytes accessed a parameter')
