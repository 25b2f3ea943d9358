// Step stamps: each leaf's moments know the step they are at, so that a call
// given a state whose count is not that step (a count restored without its
// moments, a state reset with jax.tree.map, an older copy stepped again) is
// refused instead of silently applying moments from another point of
// training. Shared by the CPU handler, the CUDA kernel and the registry.
#ifndef OPTAX_PAGED_FFI_STEP_STAMPS_H_
#define OPTAX_PAGED_FFI_STEP_STAMPS_H_

#include <cstdint>

#include "quantization.h"

namespace optax_paged {

// A stamp packs the step a leaf's moments are at (low 32 bits) and the GPU
// launch that set it (high 32 bits; 0 when set by the host).
OPTAX_PAGED_HD uint64_t MakeStamp(int32_t step, uint32_t launch) {
  return (static_cast<uint64_t>(launch) << 32) | static_cast<uint32_t>(step);
}

OPTAX_PAGED_HD int32_t StampStep(uint64_t stamp) {
  return static_cast<int32_t>(static_cast<uint32_t>(stamp));
}

// Whether GPU launch `launch` (never 0) of the step that takes the moments
// from `step` to `step + 1` may update a leaf stamped `stamp`. Blocks of one
// launch read the stamp before or after another block of that launch
// advanced it, so both are accepted; a later launch for the same step sees
// another launch number and is refused.
OPTAX_PAGED_HD bool StampAccepts(uint64_t stamp, int32_t step,
                                 uint32_t launch) {
  return StampStep(stamp) == step || stamp == MakeStamp(step + 1, launch);
}

// The words a GPU kernel writes for the host (pinned, mapped memory), since
// a kernel cannot fail its call; the next call or Python reports them.
enum StatusWord {
  kStatusMisrouted = 0,  // a call received another mesh position's shard
  kStatusStale = 1,      // a call's count was not its moments' step
  kStatusStaleCount = 2,  // that call's count
  kStatusStaleStep = 3,   // the step its moments were at
  kNumStatusWords = 4,
};

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_STEP_STAMPS_H_
