// Whole-state copies between the registry and host memory, under the locks
// of every entry of the state at once.
//
// A step holds its entry's lock for the whole call, so a copy that holds all
// the entries' locks for all of its leaves sees (or leaves) the moments of
// one step: an export never mixes leaves from two steps, and a load is never
// interleaved with a step that would update half of what it wrote.
#ifndef OPTAX_PAGED_FFI_STATE_TRANSFER_H_
#define OPTAX_PAGED_FFI_STATE_TRANSFER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "state_registry.h"

namespace optax_paged {

// Host bytes that the caller can hand on (to NumPy) without another copy.
class HostBuffer {
 public:
  explicit HostBuffer(size_t bytes);
  uint8_t* data() const { return data_.get(); }
  size_t bytes() const { return bytes_; }
  // Gives up the bytes (allocated with new uint8_t[]) to the caller.
  uint8_t* Release() { return data_.release(); }

 private:
  std::unique_ptr<uint8_t[]> data_;
  size_t bytes_;
};

// One leaf of one entry: per moment, its codes and absmax (quantized) or its
// fp32 values (absmax then empty).
struct LeafCopy {
  bool quantized = false;
  std::vector<HostBuffer> data;
  std::vector<HostBuffer> absmax;
  // With master weights: the correction, then the fingerprints and reset
  // count (empty without).
  int correction_bits = 0;
  std::vector<HostBuffer> master;
};

struct EntryCopy {
  std::vector<int32_t> steps;  // of each non-empty leaf, as ReadSteps
  std::vector<LeafCopy> leaves;
};

// One moment of one leaf of entry `entry` (an index into the entries), as
// bytes: codes and absmax, or fp32 values and no absmax. Moment
// `kMasterMoment` is the master-weight correction (data) and fingerprints
// with the reset count (absmax).
struct MomentWrite {
  size_t entry;
  int64_t leaf;
  int64_t moment;
  const uint8_t* data;
  size_t data_bytes;
  const uint8_t* absmax;
  size_t absmax_bytes;
};

inline constexpr int64_t kMasterMoment = -1;

enum class TransferStatus { kOk, kReleased, kInvalid, kFailed };

// Copies every moment and step stamp of `entries` to the host.
TransferStatus CopyEntriesToHost(const std::vector<StateEntry*>& entries,
                                 std::vector<EntryCopy>* copies,
                                 std::string* error);

// Checks every write against its entry, then (only if all fit) writes them
// and stamps every leaf of every entry with `step`.
TransferStatus WriteEntriesFromHost(const std::vector<StateEntry*>& entries,
                                    const std::vector<MomentWrite>& writes,
                                    int32_t step, std::string* error);

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_STATE_TRANSFER_H_
