"""ffi/quantization.h's EncodeFinite against Encode, as a C++ program.

The CUDA kernels encode a block whose absmax is finite with code-indexed
tables (``EncodeFinite``; the 4-bit kernels through ``NearestCode`` and
``EncodeFourBitStochastic``) and keep ``Encode`` for a block holding NaN or
infinity; the two must give the same code for every value such a block can
hold (|x| <= 1 + 2^-23), for both 8-bit maps and the 4-bit signed map, or the
GPU's states would leave the CPU's. This samples every 16th pattern and every
threshold's neighbourhood; the same program with ``--all`` checks every
float32 (about two minutes).
"""

from tests.header_programs import run_header_program


def test_finite_encode_gives_the_codes_of_encode(tmp_path):
  output = run_header_program('finite_encode_check.cc', tmp_path)
  assert 'mismatches: 0' in output
  checked = int(output.split('checked: ')[1].split()[0])
  # Three maps, each 2^27 samples of |x| < 2 and its thresholds'
  # neighbourhoods.
  assert checked > 3 * 2**27, output
