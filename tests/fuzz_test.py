"""Fuzzing (marker ``fuzz``, deselected by default; run with -m fuzz).

Random trees, dtypes, shapes and hyperparameters against the reference
implementation; random corruptions of a ``state_dict`` that must be refused
with the state untouched.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_paged
from optax_paged._src import base
from optax_paged._src import families
from optax_paged._src import reference
from tests.helpers import compare_one_step_exactly
from tests.helpers import reference_state_from

pytestmark = pytest.mark.fuzz

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _optimizers(lr, wd):
  """name -> (kernel transformation, spec of the same hyperparameters)."""
  return {
      'adamw': (optax_paged.adamw8bit(lr, weight_decay=wd, min_8bit_size=256),
                families.spec('adamw', lr, weight_decay=wd)),
      'rmsprop': (optax_paged.rmsprop8bit(lr, min_8bit_size=256),
                  families.spec('rmsprop', lr)),
      'sgd': (optax_paged.sgd8bit(lr, momentum=0.9, min_8bit_size=256),
              families.spec('sgd', lr, momentum=0.9)),
  }


shapes = st.lists(
    st.lists(st.integers(1, 300), min_size=1, max_size=2).map(tuple),
    min_size=1, max_size=4)


@settings(max_examples=30, deadline=None)
@given(shapes=shapes, dtype=st.sampled_from(DTYPES),
       name=st.sampled_from(['adamw', 'rmsprop', 'sgd']),
       lr=st.floats(1e-5, 1e-1), wd=st.floats(0.0, 0.1),
       seed=st.integers(0, 2**16))
def test_random_trees_follow_the_reference(shapes, dtype, name, lr, wd, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(shapes))
  params = {f'p{i}': jax.random.normal(keys[i], s).astype(dtype)
            for i, s in enumerate(shapes)}
  grads = {f'p{i}': (jax.random.normal(keys[len(shapes) + i], s) * 0.1
                     ).astype(dtype) for i, s in enumerate(shapes)}
  tx, spec = _optimizers(lr, wd)[name]
  ref = reference.reference_transformation(spec, min_8bit_size=256)
  state = tx.init(params)
  # A first step, so the moments are not all zero; then one compared step.
  _, state = jax.jit(tx.update)(grads, state, params)
  compare_one_step_exactly(state, reference_state_from(state, params),
                           params, grads, tx, ref)


def _corruptions(saved):
  """(description, edit) pairs, each of which must be refused."""
  leaf = saved['leaves'][0]
  moment = leaf['moments'][0]
  data = 'codes' if 'codes' in moment else 'values'
  return [
      ('flip a moment byte',
       lambda s, i: s['leaves'][0]['moments'][0][data].view(np.uint8)
       .__setitem__(i % s['leaves'][0]['moments'][0][data].nbytes,
                    s['leaves'][0]['moments'][0][data].view(np.uint8)[
                        i % s['leaves'][0]['moments'][0][data].nbytes] ^ 1)),
      ('change the count',
       lambda s, i: s.__setitem__('count', np.asarray(
           int(s['count']) + 1 + i % 1000, np.int32))),
      ('change the checksum',
       lambda s, i: s.__setitem__('checksum', np.asarray(
           (int(s['checksum']) + 1 + i) % 2**32, np.uint32))),
      ('truncate a moment',
       lambda s, i: s['leaves'][0]['moments'][0].__setitem__(
           data, s['leaves'][0]['moments'][0][data][:-1])),
      ('change a shape',
       lambda s, i: s['leaves'][0].__setitem__(
           'shape', np.asarray(s['leaves'][0]['shape']) + 1)),
      ('change a map value',
       lambda s, i: s['signed_map'].__setitem__(i % 256, 0.123)),
      # A version this build does not read (older readable ones are valid).
      ('change the version',
       lambda s, i: s.__setitem__('format_version', np.asarray(
           max(base.READABLE_FORMAT_VERSIONS) + 1 + i % 50, np.int32))),
      ('drop a field',
       lambda s, i: s.pop(['count', 'checksum', 'block_size'][i % 3])),
  ]


@settings(max_examples=40, deadline=None)
@given(which=st.integers(0, 7), where=st.integers(0, 2**20),
       seed=st.integers(0, 100))
def test_random_corruptions_are_refused_with_the_state_untouched(
    which, where, seed):
  params = {'w': jax.random.normal(jax.random.PRNGKey(seed), (64, 80)),
            'b': jnp.ones((300,))}
  tx = optax_paged.adamw8bit(1e-2, min_8bit_size=256)
  trained = tx.init(params)
  _, trained = jax.jit(tx.update)(params, trained, params)
  saved = optax_paged.state_dict(trained)
  target = tx.init(params)
  before = optax_paged.state_dict(target)
  bad = copy.deepcopy(saved)
  description, edit = _corruptions(bad)[which]
  edit(bad, where)
  with pytest.raises(ValueError, match='load_state_dict'):
    optax_paged.load_state_dict(target, bad)
  after = optax_paged.state_dict(target)
  jax.tree.map(np.testing.assert_array_equal, after, before)
  del description
