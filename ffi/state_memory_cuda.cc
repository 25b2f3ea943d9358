// GPU state memory: cudaMalloc for unpaged state, managed memory with a
// preferred location for the paged tiers. Compiled only with CUDA.
//
// Host tier: preferred location host, accessed-by the GPU, so the kernel
// reads and writes the pages over the link in place, with no migration and
// no eviction traffic (DESIGN.md, "Memory tiers").
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

cudaMemLocation DeviceLocation() {
  int device = 0;
  cudaGetDevice(&device);
  cudaMemLocation location{};
  location.type = cudaMemLocationTypeDevice;
  location.id = device;
  return location;
}

cudaMemLocation HostLocation() {
  cudaMemLocation location{};
  location.type = cudaMemLocationTypeHost;
  location.id = 0;
  return location;
}

}  // namespace

bool RetierCudaState(void* ptr, size_t bytes, Tier tier, std::string* error) {
  const cudaMemLocation device = DeviceLocation();
  if (tier == Tier::kManagedDevice) {
    return Check(cudaMemAdvise(ptr, bytes, cudaMemAdviseUnsetAccessedBy, device),
                 "cudaMemAdvise(unset accessed-by)", error) &&
           Check(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation,
                               device),
                 "cudaMemAdvise(preferred location device)", error) &&
           Check(cudaMemPrefetchAsync(ptr, bytes, device, 0, nullptr),
                 "cudaMemPrefetchAsync(device)", error) &&
           Check(cudaStreamSynchronize(nullptr), "prefetch to device", error);
  }
  if (tier == Tier::kManagedHost) {
    return Check(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation,
                               HostLocation()),
                 "cudaMemAdvise(preferred location host)", error) &&
           Check(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetAccessedBy, device),
                 "cudaMemAdvise(accessed-by device)", error) &&
           Check(cudaMemPrefetchAsync(ptr, bytes, HostLocation(), 0, nullptr),
                 "cudaMemPrefetchAsync(host)", error) &&
           Check(cudaStreamSynchronize(nullptr), "prefetch to host", error);
  }
  *error = std::string("cannot move a buffer to tier '") + TierName(tier) + "'";
  return false;
}

void* AllocateCudaState(size_t bytes, Tier tier, std::string* error) {
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
  if (!RetierCudaState(ptr, bytes, tier, error)) {
    cudaFree(ptr);
    return nullptr;
  }
  return ptr;
}

void FreeCudaState(void* ptr, Tier tier) {
  (void)tier;
  // cudaFree waits for work on the device that may still use the buffer.
  cudaDeviceSynchronize();
  cudaFree(ptr);
}

bool CopyCudaState(void* dst, const void* src, size_t bytes, Tier tier,
                   bool to_host, std::string* error) {
  if (!Check(cudaDeviceSynchronize(), "waiting for the device", error)) {
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

bool CudaMemoryInfo(size_t* free_bytes, size_t* total_bytes) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    *free_bytes = *total_bytes = 0;
    return false;
  }
  if (cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) {
    cudaGetLastError();
    *free_bytes = *total_bytes = 0;
    return false;
  }
  return true;
}

}  // namespace optax_paged
