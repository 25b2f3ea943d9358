"""The optimizer table the extension exports, and packing by slot name."""

import numpy as np
import pytest

from optax_paged._src import ffi
from optax_paged._src import hyperparams
from optax_paged._src import optimizer_table
from optax_paged._src import transform


def test_every_row_names_a_registered_target_and_its_slots():
  table = optimizer_table.table()
  assert set(table) == {'adamw', 'lion', 'ademamix', 'sgd', 'rmsprop',
                        'adagrad'}
  targets = ffi.extension().cpu_registrations()
  for name, row in table.items():
    assert row.target == f'optax_paged_{name}' and row.target in targets
    assert len(row.signed) == row.num_moments
    assert row.slots[0] == 'learning_rate'
  assert table['adamw'].signed == (True, False)
  assert table['ademamix'].num_moments == 3


def test_pack_lays_slots_out_in_the_kernels_order():
  slots = optimizer_table.info('rmsprop').slots
  vector = hyperparams.pack('rmsprop', **{s: i + 1.0 for i, s in
                                          enumerate(reversed(slots))})
  expected = [len(slots) - i for i in range(len(slots))]
  np.testing.assert_array_equal(np.asarray(vector[:len(slots)]), expected)
  assert vector.shape == (hyperparams.NUM_HYPERPARAMS,)
  assert not np.asarray(vector[len(slots):]).any()


def test_pack_refuses_missing_or_unknown_slots():
  with pytest.raises(TypeError, match='do not match the slots'):
    hyperparams.pack('sgd', learning_rate=1.0, momentum=0.9)
  with pytest.raises(TypeError, match='do not match the slots'):
    hyperparams.pack('sgd', learning_rate=1.0, momentum=0.9,
                     weight_decay=0.0, nesterov=0.0, dampening=0.0)


def test_an_optimizer_missing_from_the_build_is_a_clear_error():
  spec = transform.OptimizerSpec('lamb_from_the_future', lambda c, n: c)
  with pytest.raises(ImportError, match='rebuild the package'):
    spec.target  # noqa: B018 - the lookup is the point
