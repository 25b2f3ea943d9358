"""Builders shared by the optimizer tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged
from optax_paged import quantization
from optax_paged._src import reference
from optax_paged._src import registry


def random_tree(shapes, dtype=jnp.float32, seed=0, scale=1.0):
  """A dict of random normal leaves, one per shape."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {
      f'leaf{i}': (jax.random.normal(k, s, jnp.float32) * scale).astype(dtype)
      for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
  }


def random_grads(params, seed, scale=0.01):
  """Normal gradients times ``scale``, in each parameter's dtype."""
  return jax.tree.map(
      lambda p: (jax.random.normal(jax.random.PRNGKey(seed), p.shape) * scale
                 ).astype(p.dtype),
      params,
  )


def reference_state_from(state, params):
  """The reference optimizer's state holding the same moments as ``state``."""
  saved = optax_paged.state_dict(state)
  leaves, treedef = jax.tree.flatten(params)
  four_bit = int(saved.get('code_bits', 8)) == 4
  moments = []
  for leaf, param in zip(saved['leaves'], leaves, strict=True):
    if bool(leaf['quantized']) and four_bit:
      moments.append(tuple(
          reference.FourBitMoment(
              jnp.asarray(quantization.unpack_nibbles(m['codes'],
                                                      np.size(param))),
              jnp.asarray(m['absmax']))
          for m in leaf['moments']
      ))
    elif bool(leaf['quantized']):
      moments.append(tuple(
          reference.QuantizedMoment(
              jnp.asarray(m['codes']), jnp.asarray(m['absmax'])
          )
          for m in leaf['moments']
      ))
    else:
      moments.append(tuple(jnp.asarray(m['values']) for m in leaf['moments']))
  assert len(moments) == len(leaves)
  return reference.ReferenceState(
      count=jnp.asarray(saved['count']),
      moments=jax.tree.unflatten(treedef, moments),
  )


def moments_of(state):
  """(quantized?, [arrays per moment]) for every leaf, as NumPy."""
  out = []
  for leaf in optax_paged.state_dict(state)['leaves']:
    out.append((
        bool(leaf['quantized']),
        [dict(m) for m in leaf['moments']],
    ))
  return out


def as_f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def update_and_apply(tx):
  """The strict optax step: ``tx.update`` then ``optax.apply_updates``."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def jitted_step(tx):
  """``update_and_apply(tx)`` under ``jax.jit``."""
  return jax.jit(update_and_apply(tx))


def assert_fused_is_update_and_apply(tx, params, grads):
  """One jitted fused step from a fresh state equals ``tx.update`` plus
  ``optax.apply_updates`` from another, parameters and state bit for bit."""
  state = tx.init(params)
  fused, fused_state = jax.jit(
      lambda g, s, p: optax_paged.apply_gradients(tx, g, s, p))(
          grads, state, params)
  updates, plain_state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert_trees_equal(fused, optax.apply_updates(params, updates))
  assert_trees_equal(fused_state, plain_state)


def assert_trees_equal(a, b):
  """Every leaf of ``a`` equals the matching leaf of ``b`` exactly."""
  jax.tree.map(
      lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
      a, b,
  )


def refusal_of(run, report):
  """The message with which ``run()`` was refused, on any backend.

  The CPU handler raises at the call. A GPU kernel cannot fail its call: it
  returns NaN results and marks the state, and ``report()`` (for example
  ``optax_paged.state_dict`` of a state sharing the buffers) raises it.
  """
  try:
    outputs = jax.block_until_ready(run())
  except Exception as error:  # noqa: BLE001 - XlaRuntimeError or ValueError
    return str(error)
  floats = [x for x in jax.tree.leaves(outputs)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  assert floats and all(np.isnan(np.asarray(x)).all() for x in floats)
  try:
    report()
  except ValueError as error:
    return str(error)
  raise AssertionError('the call was neither refused nor reported')


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# Block edges of 128 (4-bit) and 256 (a warp's tile on the GPU), odd sizes
# (a half-filled last byte), and a 2-D leaf.
FOUR_BIT_EDGE_SHAPES = [(1,), (127,), (128,), (129,), (255,), (256,), (257,),
                        (385,), (4097,), (33, 131)]


def _ulp(x: np.ndarray, dtype) -> np.ndarray:
  """The spacing of ``dtype`` at each value of ``x``, subnormals included."""
  info = jnp.finfo(dtype)
  exponent = np.floor(np.log2(np.maximum(np.abs(x), float(info.tiny))))
  return np.exp2(exponent - info.nmant)


def kernel_runs_on_cpu() -> bool:
  """Whether jitted steps run the CPU kernel (the GPU's contracts into FMA)."""
  return jax.default_backend() == 'cpu'


def assert_equal_but_for_code_flips(ours, theirs, *, learning_rate,
                                    flipped_fraction):
  """Float32 results of two kernels that agree but for 8-bit code flips.

  The GPU contracts into FMA, so a moment an fp32 ulp from a code boundary
  may take the neighbouring code on one path (tests/cuda_test.py); that
  element's later updates then differ by a code step, a fraction of one
  step's update. So: all but ``flipped_fraction`` of the elements agree to
  rtol 1e-5, and none differs by a whole learning rate.
  """
  ours = np.asarray(ours, np.float32)
  theirs = np.asarray(theirs, np.float32)
  far = ~np.isclose(ours, theirs, rtol=1e-5, atol=1e-7)
  assert np.mean(far) <= flipped_fraction, (int(far.sum()), far.size)
  assert np.max(np.abs(ours - theirs)) < learning_rate


def _assert_bitwise_equal(ours, theirs, name):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
  different = ours.view(np.uint8) != theirs.view(np.uint8)
  assert not different.any(), (name, int(different.sum()))


def compare_one_step_exactly(state, ref_state, params, grads, ffi_tx, ref_tx):
  """One step of both from the same moments: bit for bit on the CPU.

  The reference runs op by op, so that XLA's fusion cannot reassociate or
  contract its arithmetic; each operation is then rounded as the C++ kernel
  rounds it. The GPU kernel contracts products and sums into FMA (a design
  choice, CMakeLists.txt), so there the comparison is compare_one_step's.
  """
  if not kernel_runs_on_cpu():
    return compare_one_step(state, ref_state, params, grads, ffi_tx, ref_tx)
  updates, state = jax.jit(ffi_tx.update)(grads, state, params)
  ref_updates, ref_state = ref_tx.update(grads, ref_state, params)
  for name in params:
    _assert_bitwise_equal(updates[name], ref_updates[name], name)
  after = reference_state_from(state, params)
  for name in params:
    for m, (a, b) in enumerate(zip(after.moments[name],
                                   ref_state.moments[name], strict=True)):
      for part_a, part_b in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                strict=True):
        _assert_bitwise_equal(part_a, part_b, (name, m))
  return state, updates


def compare_one_step(state, ref_state, params, grads, ffi_tx, ref_tx,
                     jit_reference=True):
  """One step of both from the same moments: updates and moments agree.

  ``jit_reference=False`` runs the reference op by op, as
  compare_one_step_exactly does: no compilation of its own where the suite
  has already compiled its operations for these shapes.
  """
  updates, state = jax.jit(ffi_tx.update)(grads, state, params)
  ref_update = jax.jit(ref_tx.update) if jit_reference else ref_tx.update
  ref_updates, ref_state = ref_update(grads, ref_state, params)
  for name in params:
    expected = as_f32(ref_updates[name])
    if params[name].dtype == jnp.float32:
      np.testing.assert_allclose(
          as_f32(updates[name]), expected, rtol=1e-5,
          atol=1e-6 * float(np.max(np.abs(expected), initial=0.0)),
          err_msg=name,
      )
    else:
      # fp32 results an ulp apart may round to neighbouring 16-bit values;
      # updates near zero come from terms that cancel, whose ulps remain.
      slack = _ulp(expected, params[name].dtype) + 1e-6 * float(
          np.max(np.abs(expected), initial=0.0)
      )
      assert np.all(np.abs(as_f32(updates[name]) - expected) <= slack), name
    assert updates[name].dtype == params[name].dtype
  after = reference_state_from(state, params)
  for name in params:
    ours, theirs = after.moments[name], ref_state.moments[name]
    for m, (a, b) in enumerate(zip(ours, theirs, strict=True)):
      if isinstance(a, (reference.QuantizedMoment, reference.FourBitMoment)):
        np.testing.assert_allclose(a.absmax, b.absmax, rtol=1e-6)
        diff = np.abs(np.asarray(a.codes, np.int32) - np.asarray(b.codes))
        # A moment that lands on a rounding boundary may take the other
        # neighbour after an ulp of difference; nothing else may differ.
        assert diff.max(initial=0) <= 1, (name, m)
        assert np.mean(diff) < 1e-3, (name, m)
      else:
        # Absolute slack of a few ulps of the terms that cancel into m.
        scale = float(np.max(np.abs(b), initial=0.0))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale)
  return state, updates


def teacher_problem():
  """A 2-layer MLP fitting a noisy random teacher network."""
  k = jax.random.split(jax.random.PRNGKey(42), 5)
  x = jax.random.normal(k[0], (2048, 32))
  teacher = jax.random.normal(k[1], (32, 8))
  y = jnp.sin(x @ teacher) + 0.1 * jax.random.normal(k[4], (2048, 8))
  params = {
      'w1': jax.random.normal(k[2], (32, 128)) * 0.2,
      'b1': jnp.zeros((128,)),
      'w2': jax.random.normal(k[3], (128, 8)) * 0.1,
      'b2': jnp.zeros((8,)),
  }

  def loss_fn(p):
    hidden = jax.nn.gelu(x @ p['w1'] + p['b1'])
    return jnp.mean((hidden @ p['w2'] + p['b2'] - y) ** 2)

  return params, loss_fn


def train(tx, params, loss_fn, steps):
  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return float(np.mean(losses[-10:])), losses[0]


def _bnb_scale(update, param, max_unorm):
  """bitsandbytes' update_scale, except that a zero-norm tensor moves."""
  unorm = jnp.sqrt(jnp.sum(jnp.square(update)))
  pnorm = jnp.sqrt(jnp.sum(jnp.square(param)))
  clip = (max_unorm > 0) & (pnorm > 0) & (unorm > max_unorm * pnorm)
  return jnp.where(clip, max_unorm * pnorm / unorm, 1.0)


def bnb_lamb(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
             max_unorm=1.0):
  """bitsandbytes' 32-bit LAMB (Adam kernel with max_unorm), in jnp.

  Its preconditioning pass takes the norm of m_hat / (sqrt(v_hat) + eps);
  its update adds step_size * m / (sqrt(v) + eps * c2) scaled by the clip,
  step_size = -lr c2 / c1, c1 = 1 - b1^t, c2 = sqrt(1 - b2^t); then it
  multiplies the parameter by 1 - lr * weight_decay.
  """

  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return (jnp.zeros([], jnp.int32), zeros, zeros)

  def update(grads, state, params):
    t, m, v = state
    t = t + 1
    c1 = 1 - b1 ** t.astype(jnp.float32)
    c2 = jnp.sqrt(1 - b2 ** t.astype(jnp.float32))

    def leaf(g, p, m, v):
      g, p = g.astype(jnp.float32), p.astype(jnp.float32)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      direction = (m / c1) / (jnp.sqrt(v / (c2 * c2)) + eps)
      scale = _bnb_scale(direction, p, max_unorm)
      new_p = p + scale * (-lr * c2 / c1) * (m / (jnp.sqrt(v) + eps * c2))
      new_p = new_p * (1 - lr * weight_decay)
      return new_p - p, m, v

    out = jax.tree.map(leaf, grads, params, m, v)
    first = lambda i: jax.tree.map(  # noqa: E731
        lambda x: x[i], out, is_leaf=lambda x: isinstance(x, tuple))
    return first(0), (t, first(1), first(2))

  return optax.GradientTransformationExtraArgs(
      init, lambda g, s, p=None, **_: update(g, s, p))


def bnb_lars(lr, momentum=0.9, weight_decay=0.0, max_unorm=0.02):
  """bitsandbytes' 32-bit LARS (momentum kernel with max_unorm), in jnp.

  g += weight_decay * p; m = g on the first step, else momentum * m + g;
  the step -lr * m is scaled by the clip of |m| against max_unorm |p|.
  """

  def init(params):
    return (jnp.zeros([], jnp.int32),
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def update(grads, state, params):
    t, m = state

    def leaf(g, p, m):
      g, p = g.astype(jnp.float32), p.astype(jnp.float32)
      g = g + weight_decay * p
      m = jnp.where(t == 0, g, momentum * m + g)
      return -lr * _bnb_scale(m, p, max_unorm) * m, m

    out = jax.tree.map(leaf, grads, params, m)
    first = lambda i: jax.tree.map(  # noqa: E731
        lambda x: x[i], out, is_leaf=lambda x: isinstance(x, tuple))
    return first(0), (t + 1, first(1))

  return optax.GradientTransformationExtraArgs(
      init, lambda g, s, p=None, **_: update(g, s, p))


class FakeTierEntry:
  """A registry entry's tier interface, recording the moves asked of it."""

  ordinal = 0

  def __init__(self, tiers, sizes):
    self.tiers, self.sizes, self.calls = list(tiers), sizes, []

  def leaf_info(self, i):
    return {'tier': self.tiers[i], 'bytes': self.sizes[i]}

  def set_leaf_tier(self, i, code):
    tier = {v: k for k, v in registry.TIER_CODES.items()}[code]
    self.calls.append((i, tier))
    self.tiers[i] = tier
