"""ffi/master_weights.h's shortcuts for the 24-bit master, as a C++ program.

The CUDA kernel decodes, steps and encodes a lane of bf16 parameters with
8-bit corrections by shortcuts (DecodeMaster8Inside, RoundTiesUpInside,
EncodeCorrection8Inside) where its values lie inside bf16's finite range,
and fingerprints a full lane by its 32-bit words (LaneFingerprint); each
must equal the general function it stands for, or the GPU's masters would
leave the CPU's (or their blocks be reset as changed).
"""

from tests.header_programs import run_header_program


def test_shortcuts_equal_the_general_functions(tmp_path):
  output = run_header_program('master_shortcuts_check.cc', tmp_path)
  assert 'decode checked: 16711168 mismatches: 0' in output
  assert 'fingerprints checked: 200000 mismatches: 0' in output
  checked = int(output.split('masters checked: ')[1].split()[0])
  assert f'masters checked: {checked} mismatches: 0' in output
  assert checked > 2**32 // 61, output
