"""The optimizer table the extension exports, and packing by slot name."""

import numpy as np
import pytest

from optax_paged._src import families
from optax_paged._src import ffi
from optax_paged._src import hyperparams
from optax_paged._src import optimizer_table
from optax_paged._src import transform


def test_every_row_names_a_registered_target_and_its_slots():
  table = optimizer_table.table()
  # Every kernel serves a family of the factory table, which names it.
  assert set(table) == {f.kernel for f in families.FAMILIES.values()}
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
  spec = transform.OptimizerSpec('lamb_from_the_future', lambda c, n: c,
                                 kernel='lamb_from_the_future')
  with pytest.raises(ImportError, match='rebuild the package'):
    spec.target  # noqa: B018 - the lookup is the point


def test_unpack_reads_the_vector_by_the_table_s_slot_names():
  for name, row in optimizer_table.table().items():
    values = {slot: float(i + 1) for i, slot in enumerate(row.slots)}
    unpacked = hyperparams.unpack(name, hyperparams.pack(name, **values))
    assert {k: float(v) for k, v in unpacked.items()} == values


def test_every_family_fills_exactly_its_kernel_s_slots():
  for family in families.FAMILIES.values():
    values = {h.name: h.default for h in family.hyperparameters}
    values['learning_rate'] = 1e-3
    slots = family.slots(values, np.int32(0), np.int32(1))
    assert set(slots) == set(optimizer_table.info(family.kernel).slots), (
        family.name)


def test_four_bit_variants_exist_only_where_the_kernel_has_4_bit_states():
  for family in families.FAMILIES.values():
    four_bit = {'4bit', 'paged_4bit'} & set(family.variants)
    if four_bit:
      assert optimizer_table.info(family.kernel).four_bit, family.name
