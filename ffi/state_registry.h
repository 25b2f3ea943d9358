// The C++ half of the state registry: optimizer state buffers by id.
//
// Python decides what a state holds (which leaves, 8-bit or fp32, which
// tier); this side owns the memory and lets FFI handlers find it. A state
// spread over several devices has one entry per device, each holding that
// device's shard; the compiled step carries the state id and every handler
// finds its own entry by (state id, device ordinal). Handlers
// hold the entry's lock while they run, so a release waits for
// them and a step that arrives after a release fails cleanly instead of
// touching freed memory.
#ifndef OPTAX_PAGED_FFI_STATE_REGISTRY_H_
#define OPTAX_PAGED_FFI_STATE_REGISTRY_H_

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include "master_weights.h"
#include "optimizer_math.h"
#include "state_memory.h"
#include "step_stamps.h"

namespace optax_paged {

enum class Platform { kCpu = 0, kCuda = 1 };

// What Python asks for, per leaf.
struct LeafSpec {
  int64_t size;
  int code_bits;  // 0 (fp32 moments), 8 or 4
  bool decay;
  Tier tier;
  // Index of this shard's first element among the leaf's elements, for the
  // random bits of stochastic rounding (0 on one device).
  int64_t index_offset;
  // Bits of the master-weight correction per element: 0 (none), 8 or 16
  // (master_weights.h).
  int correction_bits = 0;
};

// One moment of one leaf: codes + absmax when quantized, else fp32 values.
struct MomentBuffers {
  uint8_t* codes = nullptr;
  float* absmax = nullptr;
  float* values = nullptr;
};

struct LeafState {
  int64_t size = 0;
  int64_t num_blocks = 0;
  bool quantized = false;
  bool four_bit = false;  // quantized in 4 bits (else 8)
  bool decay = false;
  Tier tier = Tier::kHost;
  int64_t index_offset = 0;
  void* base = nullptr;
  size_t bytes = 0;
  MomentBuffers moments[kMaxMoments];
  // Master weights (master_weights.h): an int8 or int16 correction per
  // element, and a fingerprint of the parameters per kMasterBlockSize
  // elements followed by the count of blocks reset since allocation.
  int correction_bits = 0;
  void* correction = nullptr;
  uint32_t* fingerprints = nullptr;
  int64_t num_master_blocks = 0;
};

// Bytes of a leaf's master-weight correction, and of its fingerprints with
// the reset count (0 without master weights).
inline int64_t CorrectionBytes(const LeafState& leaf) {
  return leaf.size * (leaf.correction_bits / 8);
}
inline int64_t FingerprintBytes(const LeafState& leaf) {
  return leaf.correction_bits == 0
             ? 0
             : (leaf.num_master_blocks + 1) *
                   static_cast<int64_t>(sizeof(uint32_t));
}

// Elements per quantization block of a quantized leaf.
inline int QuantBlockSize(const LeafState& leaf) {
  return leaf.four_bit ? kFourBitBlockSize : kBlockSize;
}

// Bytes of one moment's codes of a quantized leaf (two 4-bit codes a byte).
inline int64_t CodeBytes(const LeafState& leaf) {
  return leaf.four_bit ? (leaf.size + 1) / 2 : leaf.size;
}

// Where an entry sits: its state, the device ordinal the handler sees, and
// the device's linear position in the mesh, which each call passes as an
// operand so that a shard reaching the wrong entry is refused.
struct Placement {
  int64_t state_id;
  int64_t ordinal;
  int32_t position;
};

class StateEntry {
 public:
  StateEntry(int64_t id, Placement placement, Platform platform,
             int num_moments);
  ~StateEntry();
  StateEntry(const StateEntry&) = delete;
  StateEntry& operator=(const StateEntry&) = delete;

  // Allocates every leaf; on failure frees what was taken and says why.
  bool Allocate(const std::vector<LeafSpec>& specs, std::string* error);

  // Frees the buffers after running handlers finish; later handlers fail.
  void Release();
  // Removes the entry from the registry: handlers no longer find it.
  void Unregister();

  int64_t id() const { return id_; }
  const Placement& placement() const { return placement_; }
  Platform platform() const { return platform_; }
  // Words the GPU kernel sets for the host (see StatusWord): a call that
  // passed another device's position, or a count that was not its moments'
  // step; later calls then fail, since the kernel cannot report it itself.
  int32_t* status() const { return status_; }
  // One step stamp per leaf (see step_stamps.h), in device memory on a GPU
  // and host memory on the CPU.
  uint64_t* stamps() const { return stamps_; }
  // A fresh, non-zero number for a GPU launch on this entry.
  uint32_t NextLaunch() {
    if (++launches_ == 0) ++launches_;
    return launches_;
  }
  // The step of each non-empty leaf's moments (waits for the device).
  bool ReadSteps(std::vector<int32_t>* steps, std::string* error) const;
  // Stamps every leaf with `step` (after a load wrote the moments).
  bool WriteSteps(int32_t step, std::string* error);
  int num_moments() const { return num_moments_; }
  bool released() const { return released_; }
  const std::vector<LeafState>& leaves() const { return leaves_; }
  std::vector<LeafState>& mutable_leaves() { return leaves_; }
  size_t total_bytes() const;

  // Held exclusively by a handler for its call, by Release and host access.
  std::shared_mutex& mutex() { return mutex_; }

 private:
  void FreeAll();
  Tier StampTier() const;

  const int64_t id_;
  const Placement placement_;
  const Platform platform_;
  int32_t* status_ = nullptr;
  uint64_t* stamps_ = nullptr;
  uint32_t launches_ = 0;
  const int num_moments_;
  bool released_ = false;
  std::vector<LeafState> leaves_;
  std::shared_mutex mutex_;
};

// A fresh state id, which the state's entries (one per device) share.
int64_t NewStateId();

// Creates and registers an entry; returns nullptr with `error` on failure.
std::shared_ptr<StateEntry> CreateStateEntry(Placement placement,
                                             Platform platform,
                                             int num_moments,
                                             const std::vector<LeafSpec>& specs,
                                             std::string* error);

// The live entry of state `state_id` on the device with this ordinal, or
// nullptr if it was released or collected, or the state has no entry there.
std::shared_ptr<StateEntry> FindStateEntry(int64_t state_id, int64_t ordinal);

// Releases the entries of one state: all leave the registry before any is
// freed, so a handler that runs meanwhile finds none of them (the state was
// released) rather than some, which would look like a state initialised for
// other devices.
void ReleaseEntries(const std::vector<StateEntry*>& entries);

// Whether any live entry belongs to state `state_id` (to tell "released"
// from "not on this device").
bool StateIsLive(int64_t state_id);

// Number of live entries and their bytes, for leak checks.
int64_t LiveStateCount();
int64_t LiveStateBytes();

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_STATE_REGISTRY_H_
