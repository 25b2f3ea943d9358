"""ffi/master_weights.h's arithmetic on the host, as a C++ program.

Two shortcuts of the master-weight kernels, each against what it replaces:
``DivideByGap`` (a division by a power of two known only at run time, the
correction's gap, as a product) against IEEE division over every gap and
millions of values, subnormal gaps included; ``RoundTiesUp<BFloat16>`` (on
the bits) against round-to-nearest-even with the tie moved up, over every
tie and its neighbours and every 97th float32; and bf16's correction on the
bits (``DecodeMasterOnBits``, ``EncodeCorrectionOnBits``: integer counts of
float32 steps) against the gap arithmetic float16 keeps
(``DecodeMasterByGap``, ``EncodeCorrectionByGap``), over every parameter.
The GPU runs the same header functions (no sums in them to contract into an
FMA).
"""

from tests.header_programs import run_header_program


def test_shortcuts_give_the_same_bits(tmp_path):
  output = run_header_program('master_weights_check.cc', tmp_path)
  assert 'division checked: 5520000 mismatches: 0' in output
  assert 'rounding checked: 44671230 mismatches: 0' in output
  assert 'correction decode checked: 348127232 mismatches: 0' in output
  assert 'correction encode checked: 27529728 mismatches: 0' in output
