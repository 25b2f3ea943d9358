// Allocation of state buffers by tier. Managed memory is in
// state_memory_cuda.cu, compiled only when CUDA is available.
#include "state_memory.h"

#include <cstdlib>
#include <cstring>

namespace optax_paged {

#if defined(OPTAX_PAGED_WITH_CUDA)
void* AllocateManagedState(size_t bytes, Tier tier, std::string* error);
void FreeManagedState(void* ptr);
#endif

namespace {

constexpr size_t kPageBytes = 4096;

size_t RoundUpToPage(size_t bytes) {
  return (bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
}

}  // namespace

const char* TierName(Tier tier) {
  switch (tier) {
    case Tier::kHost:
      return "host";
    case Tier::kDevice:
      return "device";
    case Tier::kPagedHost:
      return "paged_host";
  }
  return "unknown";
}

void* AllocateState(size_t bytes, Tier tier, std::string* error) {
  const size_t rounded = RoundUpToPage(bytes == 0 ? 1 : bytes);
  if (tier == Tier::kHost) {
    void* ptr = std::aligned_alloc(kPageBytes, rounded);
    if (ptr == nullptr) {
      *error = "could not allocate " + std::to_string(rounded) +
               " bytes of host memory for optimizer state";
      return nullptr;
    }
    std::memset(ptr, 0, rounded);
    return ptr;
  }
#if defined(OPTAX_PAGED_WITH_CUDA)
  return AllocateManagedState(rounded, tier, error);
#else
  *error = std::string("tier '") + TierName(tier) +
           "' needs CUDA, but optax_paged was built without it";
  return nullptr;
#endif
}

void FreeState(void* ptr, Tier tier) {
  if (ptr == nullptr) return;
  if (tier == Tier::kHost) {
    std::free(ptr);
    return;
  }
#if defined(OPTAX_PAGED_WITH_CUDA)
  FreeManagedState(ptr);
#endif
}

}  // namespace optax_paged
