// Where state buffers live: allocation and release for each memory tier.
//
// The CPU build uses page-aligned host memory. The CUDA build (issue 3) adds
// managed memory with a device or host preferred location.
#ifndef OPTAX_PAGED_FFI_STATE_MEMORY_H_
#define OPTAX_PAGED_FFI_STATE_MEMORY_H_

#include <cstddef>
#include <string>

namespace optax_paged {

enum class Tier {
  kHost = 0,     // plain host memory, for the CPU platform
  kDevice = 1,   // managed memory, preferred on the GPU and prefetched there
  kPagedHost = 2,  // managed memory, preferred on the host, read by the GPU
};

const char* TierName(Tier tier);

// Allocates `bytes` zeroed bytes in `tier`, aligned to at least 4096 bytes.
// Returns nullptr and fills `error` on failure.
void* AllocateState(size_t bytes, Tier tier, std::string* error);

void FreeState(void* ptr, Tier tier);

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_STATE_MEMORY_H_
