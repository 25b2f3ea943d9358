// Exhaustive check of the device's 4-bit unsigned codec (ffi/quantization.h)
// against its definition: every float32 bit pattern's code, and every code's
// value. Prints "mismatches: N" and exits nonzero when N > 0.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>

#include "quantization.h"

namespace {

// The signed tables, which the unsigned decode never reads.
__device__ optax_paged::QuantTables g_unread;

// The definition, written plainly: the nearest of (c + 1) / 16, ties to the
// smaller, NaN and everything below 3/32 to code 0.
__device__ unsigned DefinedCode(float x) {
  if (x != x) return 0u;
  const float above = ceilf((x * 32.0f - 3.0f) * 0.5f);
  return static_cast<unsigned>(above < 0.0f ? 0.0f
                                            : (above > 15.0f ? 15.0f : above));
}

__global__ void CheckEncode(unsigned long long* mismatches,
                            unsigned* first_bad) {
  unsigned long long local = 0;
  const uint64_t stride = uint64_t{gridDim.x} * blockDim.x;
  for (uint64_t bits = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
       bits < (uint64_t{1} << 32); bits += stride) {
    const float x = optax_paged::BitsToFloat(static_cast<uint32_t>(bits));
    if (optax_paged::EncodeLinear16(x) != DefinedCode(x)) {
      if (local == 0) atomicCAS(first_bad, 0u, static_cast<unsigned>(bits));
      ++local;
    }
  }
  if (local) atomicAdd(mismatches, local);
}

__global__ void CheckDecode(const float* absmax, int count,
                            unsigned long long* mismatches) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= 16 * count) return;
  const uint8_t code = static_cast<uint8_t>(i % 16);
  const float scale = absmax[i / 16];
  const float got = optax_paged::DecodeFourBit(g_unread, false, code, scale);
  const float want = static_cast<float>(code + 1) * 0.0625f * scale;
  if (optax_paged::FloatBits(got) != optax_paged::FloatBits(want)) {
    atomicAdd(mismatches, 1ull);
  }
}

}  // namespace

int main() {
  unsigned long long* mismatches;
  unsigned* first_bad;
  cudaMallocManaged(&mismatches, 2 * sizeof(*mismatches));
  cudaMallocManaged(&first_bad, sizeof(*first_bad));
  mismatches[0] = mismatches[1] = 0;
  *first_bad = 0;
  CheckEncode<<<1024, 256>>>(mismatches, first_bad);
  const float scales[] = {1.0f, 3.0e-38f, 1.0e-30f, 0.37f, 7.5e3f, 3.0e38f,
                          INFINITY, NAN, 0.0f};
  constexpr int kScales = sizeof(scales) / sizeof(scales[0]);
  float* absmax;
  cudaMallocManaged(&absmax, sizeof(scales));
  for (int i = 0; i < kScales; ++i) absmax[i] = scales[i];
  CheckDecode<<<1, 16 * kScales>>>(absmax, kScales, mismatches + 1);
  const cudaError_t status = cudaDeviceSynchronize();
  if (status != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(status));
    return 2;
  }
  std::printf("encode mismatches: %llu (first at bits 0x%08x)\n",
              mismatches[0], *first_bad);
  std::printf("decode mismatches: %llu\n", mismatches[1]);
  std::printf("mismatches: %llu\n", mismatches[0] + mismatches[1]);
  return mismatches[0] + mismatches[1] == 0 ? 0 : 1;
}
