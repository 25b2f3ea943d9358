// Allocation of state buffers by tier. Managed memory is in
// state_memory_cuda.cc, compiled only when CUDA is available.
#include "state_memory.h"

#include <cstdlib>
#include <cstring>

namespace optax_paged {

#if defined(OPTAX_PAGED_WITH_CUDA)
// In state_memory_cuda.cc.
void* AllocateCudaState(size_t bytes, Tier tier, int64_t device,
                        std::string* error);
void FreeCudaState(void* ptr, Tier tier, int64_t device);
bool RetierCudaState(void* ptr, size_t bytes, Tier tier, int64_t device,
                     std::string* error);
bool CopyCudaState(void* dst, const void* src, size_t bytes, Tier tier,
                   bool to_host, int64_t device, std::string* error);
int32_t* AllocateCudaStatusWords(int64_t device, int count, std::string* error);
void FreeCudaStatusWords(int32_t* words);
bool CudaMemoryInfo(int64_t device, size_t* free_bytes, size_t* total_bytes);
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
      return "cpu";
    case Tier::kManagedDevice:
      return "device";
    case Tier::kManagedHost:
      return "host";
    case Tier::kDevice:
      return "device (unpaged)";
  }
  return "unknown";
}

namespace {

[[maybe_unused]] std::string NoCuda(Tier tier) {
  return std::string("tier '") + TierName(tier) +
         "' needs CUDA, but optax_paged was built without it (no CUDA 12 or "
         "13 nvcc at install time; optax_paged.build_info() says so): "
         "reinstall with nvcc on PATH, see the README's Install section";
}

}  // namespace

void* AllocateState(size_t bytes, Tier tier, int64_t device,
                    std::string* error) {
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
  return AllocateCudaState(rounded, tier, device, error);
#else
  (void)device;
  *error = NoCuda(tier);
  return nullptr;
#endif
}

void FreeState(void* ptr, Tier tier, int64_t device) {
  if (ptr == nullptr) return;
  if (tier == Tier::kHost) {
    std::free(ptr);
    return;
  }
#if defined(OPTAX_PAGED_WITH_CUDA)
  FreeCudaState(ptr, tier, device);
#else
  (void)device;
#endif
}

bool RetierState(void* ptr, size_t bytes, Tier tier, int64_t device,
                 std::string* error) {
#if defined(OPTAX_PAGED_WITH_CUDA)
  return RetierCudaState(ptr, RoundUpToPage(bytes), tier, device, error);
#else
  (void)ptr, (void)bytes, (void)device;
  *error = NoCuda(tier);
  return false;
#endif
}

bool CopyStateToHost(void* host, const void* state, size_t bytes, Tier tier,
                     int64_t device, std::string* error) {
  if (tier == Tier::kHost) {
    std::memcpy(host, state, bytes);
    return true;
  }
#if defined(OPTAX_PAGED_WITH_CUDA)
  return CopyCudaState(host, state, bytes, tier, /*to_host=*/true, device,
                       error);
#else
  (void)device;
  *error = NoCuda(tier);
  return false;
#endif
}

bool CopyHostToState(void* state, const void* host, size_t bytes, Tier tier,
                     int64_t device, std::string* error) {
  if (tier == Tier::kHost) {
    std::memcpy(state, host, bytes);
    return true;
  }
#if defined(OPTAX_PAGED_WITH_CUDA)
  return CopyCudaState(state, host, bytes, tier, /*to_host=*/false, device,
                       error);
#else
  (void)device;
  *error = NoCuda(tier);
  return false;
#endif
}

int32_t* AllocateStatusWords(bool gpu, int64_t device, int count,
                             std::string* error) {
  if (!gpu) {
    auto* words = static_cast<int32_t*>(std::calloc(count, sizeof(int32_t)));
    if (words == nullptr) *error = "could not allocate status words";
    return words;
  }
#if defined(OPTAX_PAGED_WITH_CUDA)
  return AllocateCudaStatusWords(device, count, error);
#else
  (void)device;
  *error = NoCuda(Tier::kDevice);
  return nullptr;
#endif
}

void FreeStatusWords(int32_t* words, bool gpu) {
  if (words == nullptr) return;
  if (!gpu) {
    std::free(words);
    return;
  }
#if defined(OPTAX_PAGED_WITH_CUDA)
  FreeCudaStatusWords(words);
#endif
}

bool DeviceMemoryInfo(int64_t device, size_t* free_bytes,
                      size_t* total_bytes) {
#if defined(OPTAX_PAGED_WITH_CUDA)
  return CudaMemoryInfo(device, free_bytes, total_bytes);
#else
  (void)device;
  *free_bytes = *total_bytes = 0;
  return false;
#endif
}

}  // namespace optax_paged
