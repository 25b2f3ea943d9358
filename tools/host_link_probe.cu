// How fast a kernel can read and rewrite host-tier state in place, by access
// pattern: the facts behind the host tier's kernel (benchmarks/NOTES.md).
//
// State like the 308M model's host tier: two 8-bit moments (codes) with one
// float absmax per 256-element block each, in managed memory preferring the
// host and mapped for the GPU (our host tier). Each pattern reads every code
// and absmax once and writes it once; the table gives GB/s each way.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/host_link_probe tools/host_link_probe.cu
//   /tmp/host_link_probe [num_params]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                    \
  do {                                                                 \
    cudaError_t e = (call);                                            \
    if (e != cudaSuccess) {                                            \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e));  \
      std::exit(1);                                                    \
    }                                                                  \
  } while (0)

constexpr int kBlock = 256;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct State {
  uint8_t* codes[2];
  float* absmax[2];
  int64_t blocks;
};

__device__ __forceinline__ uint2 Touch(uint2 c) {
  return make_uint2(c.x + 0x01010101u, c.y ^ 0x5a5a5a5au);
}

// Flat: 16 bytes a lane over the codes only (the link's in-place rate).
__global__ void Flat(State s) {
  const int64_t n = s.blocks * kBlock / 16;
  for (int m = 0; m < 2; ++m) {
    uint4* p = reinterpret_cast<uint4*>(s.codes[m]);
    for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
         i += int64_t{gridDim.x} * blockDim.x) {
      uint4 v = p[i];
      v.x += 1; v.w ^= 7;
      p[i] = v;
    }
  }
}

// As the update kernel: a warp per block, 8 codes a lane per moment, the
// absmax read by every lane and written by lane 0.
__global__ void WarpPerBlock(State s) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32;
  const int64_t warps = int64_t{gridDim.x} * kWarps;
  for (int64_t b = warp; b < s.blocks; b += warps) {
    uint2 c[2];
    float a[2];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      a[m] = s.absmax[m][b];
      c[m] = reinterpret_cast<const uint2*>(s.codes[m] + b * kBlock)[lane];
    }
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      reinterpret_cast<uint2*>(s.codes[m] + b * kBlock)[lane] = Touch(c[m]);
      if (lane == 0) s.absmax[m][b] = a[m] * 1.5f;
    }
  }
}

// A warp owns runs of 32 consecutive blocks: the run's absmax are read and
// written once, coalesced (lane i holds block i's), and `kInFlight` blocks'
// codes are loaded before any is written.
template <int kInFlight>
__global__ void WarpPerRun(State s) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32;
  const int64_t warps = int64_t{gridDim.x} * kWarps;
  const int64_t runs = (s.blocks + 31) / 32;
  for (int64_t r = warp; r < runs; r += warps) {
    const int64_t first = r * 32;
    const int count = static_cast<int>(s.blocks - first < 32 ? s.blocks - first : 32);
    float a[2];
#pragma unroll
    for (int m = 0; m < 2; ++m) a[m] = lane < count ? s.absmax[m][first + lane] : 0.f;
    float out[2] = {a[0], a[1]};
    for (int k = 0; k < count; k += kInFlight) {
      uint2 c[kInFlight][2];
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          if (k + j < count) {
            c[j][m] = reinterpret_cast<const uint2*>(
                s.codes[m] + (first + k + j) * kBlock)[lane];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const float scale = __shfl_sync(0xffffffffu, a[m], (k + j) % 32);
          if (k + j < count) {
            reinterpret_cast<uint2*>(s.codes[m] + (first + k + j) * kBlock)[lane] =
                Touch(c[j][m]);
            if (lane == k + j) out[m] = scale * 1.5f;
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < 2; ++m) if (lane < count) s.absmax[m][first + lane] = out[m];
  }
}

template <typename Kernel>
float Time(Kernel kernel, State s, int grid) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  kernel<<<grid, kThreads>>>(s);  // warm-up
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < 5; ++i) {
    CHECK(cudaEventRecord(start));
    kernel<<<grid, kThreads>>>(s);
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int main(int argc, char** argv) {
  const int64_t params = argc > 1 ? std::atoll(argv[1]) : 308LL << 20;
  State s{};
  s.blocks = (params + kBlock - 1) / kBlock;
  const size_t code_bytes = s.blocks * kBlock, absmax_bytes = s.blocks * 4;
  cudaMemLocation host{};
  host.type = cudaMemLocationTypeHost;
  cudaMemLocation gpu{};
  gpu.type = cudaMemLocationTypeDevice;
  gpu.id = 0;
  auto managed_host = [&](size_t bytes) {
    void* p = nullptr;
    CHECK(cudaMallocManaged(&p, bytes));
    std::fill_n(static_cast<uint8_t*>(p), bytes, uint8_t{3});
    CHECK(cudaMemAdvise(p, bytes, cudaMemAdviseSetPreferredLocation, host));
    CHECK(cudaMemAdvise(p, bytes, cudaMemAdviseSetAccessedBy, gpu));
    CHECK(cudaMemPrefetchAsync(p, bytes, host, 0, nullptr));
    return p;
  };
  for (int m = 0; m < 2; ++m) {
    s.codes[m] = static_cast<uint8_t*>(managed_host(code_bytes));
    s.absmax[m] = static_cast<float*>(managed_host(absmax_bytes));
  }
  CHECK(cudaDeviceSynchronize());
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const double each_way = 2.0 * (code_bytes + absmax_bytes);
  std::printf("%s, %lld params: %.0f MB each way\n", prop.name,
              static_cast<long long>(params), each_way / 1e6);
  std::printf("%-34s %6s %9s %9s\n", "pattern", "grid", "ms", "GB/s");
  for (int per_sm : {2, 4}) {
    const int grid = sms * per_sm;
    auto row = [&](const char* name, float ms) {
      std::printf("%-34s %6d %9.2f %9.1f\n", name, grid, ms,
                  each_way / ms / 1e6);
    };
    row("flat, 16 B a lane (codes only)", Time(Flat, s, grid));
    row("warp per block (the kernel now)", Time(WarpPerBlock, s, grid));
    row("warp per 32-block run, 1 in flight", Time(WarpPerRun<1>, s, grid));
    row("warp per 32-block run, 2 in flight", Time(WarpPerRun<2>, s, grid));
    row("warp per 32-block run, 4 in flight", Time(WarpPerRun<4>, s, grid));
  }
  return 0;
}
