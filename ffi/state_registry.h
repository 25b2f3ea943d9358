// The C++ half of the state registry: optimizer state buffers by id.
//
// Python decides what a state holds (which leaves, 8-bit or fp32, which
// tier); this side owns the memory and lets FFI handlers find it by the id
// the compiled step carries. Handlers hold a shared lock on the entry while
// they run, so a release waits for them and a step that arrives after a
// release fails cleanly instead of touching freed memory.
#ifndef OPTAX_PAGED_FFI_STATE_REGISTRY_H_
#define OPTAX_PAGED_FFI_STATE_REGISTRY_H_

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include "optimizer_math.h"
#include "state_memory.h"

namespace optax_paged {

enum class Platform { kCpu = 0, kCuda = 1 };

// What Python asks for, per leaf.
struct LeafSpec {
  int64_t size;
  bool quantized;
  bool decay;
  Tier tier;
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
  bool decay = false;
  Tier tier = Tier::kHost;
  void* base = nullptr;
  size_t bytes = 0;
  MomentBuffers moments[kMaxMoments];
};

class StateEntry {
 public:
  StateEntry(int64_t id, Platform platform, int num_moments);
  ~StateEntry();
  StateEntry(const StateEntry&) = delete;
  StateEntry& operator=(const StateEntry&) = delete;

  // Allocates every leaf; on failure frees what was taken and says why.
  bool Allocate(const std::vector<LeafSpec>& specs, std::string* error);

  // Frees the buffers after running handlers finish; later handlers fail.
  void Release();

  int64_t id() const { return id_; }
  Platform platform() const { return platform_; }
  int num_moments() const { return num_moments_; }
  bool released() const { return released_; }
  const std::vector<LeafState>& leaves() const { return leaves_; }
  std::vector<LeafState>& mutable_leaves() { return leaves_; }
  size_t total_bytes() const;

  // Handlers take it shared for a step; Release and host access exclusive.
  std::shared_mutex& mutex() { return mutex_; }

 private:
  void FreeAll();

  const int64_t id_;
  const Platform platform_;
  const int num_moments_;
  bool released_ = false;
  std::vector<LeafState> leaves_;
  std::shared_mutex mutex_;
};

// Creates and registers an entry; returns nullptr with `error` on failure.
std::shared_ptr<StateEntry> CreateStateEntry(Platform platform,
                                             int num_moments,
                                             const std::vector<LeafSpec>& specs,
                                             std::string* error);

// The live entry with this id, or nullptr if it was released or collected.
std::shared_ptr<StateEntry> FindStateEntry(int64_t id);

// Number of live entries and their bytes, for leak checks.
int64_t LiveStateCount();
int64_t LiveStateBytes();

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_STATE_REGISTRY_H_
