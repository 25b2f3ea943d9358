// Where state buffers live: allocation and release for each memory tier.
//
// The CPU platform uses page-aligned host memory. With CUDA: plain device
// memory for unpaged optimizers, and managed memory whose preferred location
// (device or host) is the buffer's tier for paged ones.
#ifndef OPTAX_PAGED_FFI_STATE_MEMORY_H_
#define OPTAX_PAGED_FFI_STATE_MEMORY_H_

#include <cstddef>
#include <cstdint>
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

// Every GPU call below runs with `device` (a CUDA ordinal) current, so each
// buffer is allocated, advised, prefetched, copied and freed on its own GPU.
// `device` is ignored for the CPU tier.

// Allocates `bytes` zeroed bytes in `tier`, aligned to at least 4096 bytes.
// Returns nullptr and fills `error` on failure.
void* AllocateState(size_t bytes, Tier tier, int64_t device,
                    std::string* error);

void FreeState(void* ptr, Tier tier, int64_t device);

// Moves a managed buffer to `tier` (kManagedDevice or kManagedHost): sets
// its preferred location and prefetches it there.
bool RetierState(void* ptr, size_t bytes, Tier tier, int64_t device,
                 std::string* error);

// Copies between a state buffer and host memory; waits for the device first
// when the buffer is on it.
bool CopyStateToHost(void* host, const void* state, size_t bytes, Tier tier,
                     int64_t device, std::string* error);
bool CopyHostToState(void* state, const void* host, size_t bytes, Tier tier,
                     int64_t device, std::string* error);

// `count` zeroed int32s that host code reads and, with `gpu`, kernels on
// `device` write (pinned, mapped host memory). nullptr with `error` on
// failure.
int32_t* AllocateStatusWords(bool gpu, int64_t device, int count,
                             std::string* error);
void FreeStatusWords(int32_t* words, bool gpu);

// Free and total bytes of GPU `device`; false without CUDA or that GPU.
bool DeviceMemoryInfo(int64_t device, size_t* free_bytes, size_t* total_bytes);

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_STATE_MEMORY_H_
