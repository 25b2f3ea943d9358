// Where state buffers live: allocation and release for each memory tier.
//
// The CPU platform uses page-aligned host memory. With CUDA: plain device
// memory for unpaged optimizers, and managed memory whose preferred location
// (device or host) is the buffer's tier for paged ones.
#ifndef OPTAX_PAGED_FFI_STATE_MEMORY_H_
#define OPTAX_PAGED_FFI_STATE_MEMORY_H_

#include <cstddef>
#include <string>

namespace optax_paged {

enum class Tier {
  kHost = 0,          // plain host memory, for the CPU platform
  kManagedDevice = 1,  // managed memory, preferred on the GPU, prefetched
  kManagedHost = 2,   // managed memory, preferred on the host, read by the GPU
  kDevice = 3,        // plain device memory (cudaMalloc), never paged
};

inline bool IsManaged(Tier tier) {
  return tier == Tier::kManagedDevice || tier == Tier::kManagedHost;
}

const char* TierName(Tier tier);

// Allocates `bytes` zeroed bytes in `tier`, aligned to at least 4096 bytes.
// Returns nullptr and fills `error` on failure.
void* AllocateState(size_t bytes, Tier tier, std::string* error);

void FreeState(void* ptr, Tier tier);

// Moves a managed buffer to `tier` (kManagedDevice or kManagedHost): sets
// its preferred location and prefetches it there.
bool RetierState(void* ptr, size_t bytes, Tier tier, std::string* error);

// Copies between a state buffer and host memory; waits for the device first
// when the buffer is on it.
bool CopyStateToHost(void* host, const void* state, size_t bytes, Tier tier,
                     std::string* error);
bool CopyHostToState(void* state, const void* host, size_t bytes, Tier tier,
                     std::string* error);

// Free and total bytes of the current GPU; false without CUDA or a GPU.
bool DeviceMemoryInfo(size_t* free_bytes, size_t* total_bytes);

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_STATE_MEMORY_H_
