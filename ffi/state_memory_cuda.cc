// GPU state memory: cudaMalloc for unpaged state, managed memory with a
// preferred location for the paged tiers. Compiled only with CUDA.
//
// Host tier: preferred location host, accessed-by the GPU, so the kernel
// reads and writes the pages over the link in place, with no migration and
// no eviction traffic (README, "On the GPU: memory tiers").
//
// Every call makes the buffer's GPU current first and restores the caller's
// device after: the current device is per thread and XLA's threads rely on
// theirs.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "state_memory.h"

namespace optax_paged {

namespace {

bool Check(cudaError_t status, const char* what, std::string* error) {
  if (status == cudaSuccess) return true;
  *error = std::string(what) + ": " + cudaGetErrorString(status);
  cudaGetLastError();  // clear the sticky-free error state
  return false;
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int64_t device) {
    cudaGetDevice(&previous_);
    ok_ = cudaSetDevice(static_cast<int>(device)) == cudaSuccess;
    if (!ok_) cudaGetLastError();
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  bool ok(int64_t device, std::string* error) const {
    if (!ok_) *error = "cannot use GPU " + std::to_string(device);
    return ok_;
  }

 private:
  int previous_ = 0;
  bool ok_ = false;
};

// Where managed memory is advised to live or prefetched to. CUDA 13 names a
// place by a cudaMemLocation; CUDA 12 by a device number (cudaCpuDeviceId for
// the host) and has no cudaMemLocation overloads of these calls, so both
// spellings are kept, chosen by the toolkit's runtime version.
#if CUDART_VERSION >= 13000
using Place = cudaMemLocation;

Place DevicePlace(int64_t device) {
  cudaMemLocation location{};
  location.type = cudaMemLocationTypeDevice;
  location.id = static_cast<int>(device);
  return location;
}

Place HostPlace() {
  cudaMemLocation location{};
  location.type = cudaMemLocationTypeHost;
  location.id = 0;
  return location;
}

cudaError_t Prefetch(void* ptr, size_t bytes, Place place) {
  return cudaMemPrefetchAsync(ptr, bytes, place, 0, nullptr);
}
#else
using Place = int;

Place DevicePlace(int64_t device) { return static_cast<int>(device); }

Place HostPlace() { return cudaCpuDeviceId; }

cudaError_t Prefetch(void* ptr, size_t bytes, Place place) {
  return cudaMemPrefetchAsync(ptr, bytes, place, nullptr);
}
#endif

// With the buffer's device current.
bool Retier(void* ptr, size_t bytes, Tier tier, int64_t device_ordinal,
            std::string* error) {
  const Place device = DevicePlace(device_ordinal);
  if (tier == Tier::kManagedDevice) {
    return Check(cudaMemAdvise(ptr, bytes, cudaMemAdviseUnsetAccessedBy, device),
                 "cudaMemAdvise(unset accessed-by)", error) &&
           Check(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation,
                               device),
                 "cudaMemAdvise(preferred location device)", error) &&
           Check(Prefetch(ptr, bytes, device), "cudaMemPrefetchAsync(device)",
                 error) &&
           Check(cudaStreamSynchronize(nullptr), "prefetch to device", error);
  }
  if (tier == Tier::kManagedHost) {
    return Check(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation,
                               HostPlace()),
                 "cudaMemAdvise(preferred location host)", error) &&
           Check(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetAccessedBy, device),
                 "cudaMemAdvise(accessed-by device)", error) &&
           Check(Prefetch(ptr, bytes, HostPlace()), "cudaMemPrefetchAsync(host)",
                 error) &&
           Check(cudaStreamSynchronize(nullptr), "prefetch to host", error);
  }
  *error = std::string("cannot move a buffer to tier '") + TierName(tier) + "'";
  return false;
}

}  // namespace

bool RetierCudaState(void* ptr, size_t bytes, Tier tier, int64_t device,
                     std::string* error) {
  DeviceGuard guard(device);
  return guard.ok(device, error) && Retier(ptr, bytes, tier, device, error);
}

void* AllocateCudaState(size_t bytes, Tier tier, int64_t device,
                        std::string* error) {
  DeviceGuard guard(device);
  if (!guard.ok(device, error)) return nullptr;
  void* ptr = nullptr;
  if (tier == Tier::kDevice) {
    if (!Check(cudaMalloc(&ptr, bytes), "cudaMalloc", error)) return nullptr;
    if (!Check(cudaMemset(ptr, 0, bytes), "cudaMemset", error)) {
      cudaFree(ptr);
      return nullptr;
    }
    return ptr;
  }
  if (!IsManaged(tier)) {
    *error = std::string("tier '") + TierName(tier) + "' is not a GPU tier";
    return nullptr;
  }
  if (!Check(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal),
             "cudaMallocManaged", error)) {
    return nullptr;
  }
  // Zero on the host: the pages are born there and the host tier stays.
  std::memset(ptr, 0, bytes);
  if (!Retier(ptr, bytes, tier, device, error)) {
    cudaFree(ptr);
    return nullptr;
  }
  return ptr;
}

void FreeCudaState(void* ptr, Tier tier, int64_t device) {
  (void)tier;
  DeviceGuard guard(device);
  // cudaFree waits for work on the device that may still use the buffer.
  cudaDeviceSynchronize();
  cudaFree(ptr);
}

bool CopyCudaState(void* dst, const void* src, size_t bytes, Tier tier,
                   bool to_host, int64_t device, std::string* error) {
  DeviceGuard guard(device);
  if (!guard.ok(device, error) ||
      !Check(cudaDeviceSynchronize(), "waiting for the device", error)) {
    return false;
  }
  if (IsManaged(tier)) {
    std::memcpy(dst, src, bytes);
    return true;
  }
  return Check(cudaMemcpy(dst, src, bytes,
                          to_host ? cudaMemcpyDeviceToHost
                                  : cudaMemcpyHostToDevice),
               "cudaMemcpy", error);
}

int32_t* AllocateCudaStatusWords(int64_t device, int count,
                                 std::string* error) {
  DeviceGuard guard(device);
  if (!guard.ok(device, error)) return nullptr;
  void* words = nullptr;
  // Mapped and portable: with unified addressing the host pointer is valid
  // in kernels on every GPU.
  if (!Check(cudaHostAlloc(&words, count * sizeof(int32_t),
                           cudaHostAllocMapped | cudaHostAllocPortable),
             "cudaHostAlloc(status words)", error)) {
    return nullptr;
  }
  std::memset(words, 0, count * sizeof(int32_t));
  return static_cast<int32_t*>(words);
}

void FreeCudaStatusWords(int32_t* words) { cudaFreeHost(words); }

bool CudaMemoryInfo(int64_t device, size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = *total_bytes = 0;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 ||
      device >= count) {
    cudaGetLastError();
    return false;
  }
  DeviceGuard guard(device);
  if (cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) {
    cudaGetLastError();
    *free_bytes = *total_bytes = 0;
    return false;
  }
  return true;
}

}  // namespace optax_paged
