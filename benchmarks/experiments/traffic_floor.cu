// How fast can the fused 8-bit AdamW step's memory traffic go on this GPU,
// with no arithmetic worth the name? Issue 26 holds the kernels to 85% of
// DRAM peak; this measures what the same streams reach when nothing but the
// memory system is in the way, in our launch shape and in others: a grid
// stride, one block a warp, chunks of blocks a warp, and a persistent grid
// whose warps take their blocks from a counter.
//
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/traffic_floor \
//       benchmarks/experiments/traffic_floor.cu && /tmp/traffic_floor
//
// The streams, per parameter, as tools/profile_fused.py's step has them
// (parameters donated, so the output is written over them): read the
// gradient and the parameter (4 B each in fp32, 2 in bf16), write the
// parameter, read and write two 1-byte codes; per 256 parameters read and
// write two absmax floats. Each kernel does a token update (p += g / 1024,
// codes + 1) so that nothing is optimized away. Timing: CUDA events, the
// median of 15 launches after 3 warm-ups; bandwidth counts each byte moved
// once. "copy" is a plain device-to-device copy of 2 GiB, the card's
// practical ceiling for a read + write stream.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kBlock = 256;     // parameters a warp updates at a time
constexpr int kPerLane = 8;

#define CHECK(call)                                                     \
  do {                                                                  \
    cudaError_t e = (call);                                             \
    if (e != cudaSuccess) {                                             \
      std::printf("%s failed: %s\n", #call, cudaGetErrorString(e));     \
      std::exit(1);                                                     \
    }                                                                   \
  } while (0)

template <typename T>
struct alignas(16) Lane {
  T v[kPerLane];
};

template <typename T>
__device__ __forceinline__ float ToF(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float ToF(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T FromF(float x) { return static_cast<T>(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromF(float x) { return __float2bfloat16(x); }

// One 256-parameter block by one warp, its streams as the fused kernel's.
template <typename T>
__device__ __forceinline__ void UpdateBlock(const T* __restrict__ g, T* p,
                                            uint8_t* c0, uint8_t* c1,
                                            float* a0, float* a1,
                                            int64_t block, int lane) {
  const int64_t first = block * kBlock + lane * kPerLane;
  Lane<T> gv = *reinterpret_cast<const Lane<T>*>(g + first);
  Lane<T> pv = *reinterpret_cast<const Lane<T>*>(p + first);
  uint2 k0 = *reinterpret_cast<const uint2*>(c0 + first);
  uint2 k1 = *reinterpret_cast<const uint2*>(c1 + first);
  const float s0 = a0[block];
  const float s1 = a1[block];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    pv.v[i] = FromF<T>(ToF(pv.v[i]) + ToF(gv.v[i]) * (1.0f / 1024));
  }
  k0.x += 0x01010101u; k0.y += 0x01010101u;
  k1.x += 0x01010101u; k1.y += 0x01010101u;
  *reinterpret_cast<Lane<T>*>(p + first) = pv;
  *reinterpret_cast<uint2*>(c0 + first) = k0;
  *reinterpret_cast<uint2*>(c1 + first) = k1;
  if (lane == 0) {
    a0[block] = s0 * 1.0f;
    a1[block] = s1 + 0.0f;
  }
}

// This warp's index in the grid, and the grid's warps.
__device__ __forceinline__ int64_t GridWarp() {
  return (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
}
__device__ __forceinline__ int64_t GridWarps() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
}

// The first of `count` blocks taken from the counter by lane 0, for the warp.
__device__ __forceinline__ int64_t TakeBlocks(unsigned long long* next,
                                              unsigned long long count,
                                              int lane) {
  unsigned long long b = 0;
  if (lane == 0) b = atomicAdd(next, count);
  return static_cast<int64_t>(__shfl_sync(0xffffffffu, b, 0));
}

// Our launch shape: a fixed grid of warps striding over the blocks. With
// `times`, each warp's start and finish on the global timer: how unevenly
// the warps of a static split finish (the tail that a dynamic order, such
// as one block a warp, does not have).
template <typename T>
__global__ void __launch_bounds__(512) StrideKernel(
    const T* __restrict__ g, T* p, uint8_t* c0, uint8_t* c1, float* a0,
    float* a1, int64_t blocks, unsigned long long* times = nullptr) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = GridWarp();
  const int64_t warps = GridWarps();
  unsigned long long start;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (int64_t b = warp; b < blocks; b += warps) {
    UpdateBlock(g, p, c0, c1, a0, a1, b, lane);
  }
  unsigned long long stop;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(stop));
  if (times != nullptr && lane == 0) {
    times[2 * warp] = start;
    times[2 * warp + 1] = stop;
  }
}

// One block a warp, as many CTAs as that takes: the hardware keeps every SM
// full and each warp's loads are its only work.
template <typename T>
__global__ void __launch_bounds__(512) OneShotKernel(
    const T* __restrict__ g, T* p, uint8_t* c0, uint8_t* c1, float* a0,
    float* a1, int64_t blocks) {
  const int64_t b = GridWarp();
  if (b < blocks) UpdateBlock(g, p, c0, c1, a0, a1, b, threadIdx.x % 32);
}

// kRuns blocks a warp, the warps of a CTA interleaved (block, block + 16,
// ...), in as many CTAs as that takes: the chunked grid of change 7.
template <typename T, int kRuns>
__global__ void __launch_bounds__(512) ChunkKernel(
    const T* __restrict__ g, T* p, uint8_t* c0, uint8_t* c1, float* a0,
    float* a1, int64_t blocks) {
  constexpr int kWarps = 512 / 32;
  const int64_t first =
      static_cast<int64_t>(blockIdx.x) * kWarps * kRuns + threadIdx.x / 32;
#pragma unroll 1
  for (int j = 0; j < kRuns; ++j) {
    const int64_t b = first + static_cast<int64_t>(j) * kWarps;
    if (b >= blocks) break;
    UpdateBlock(g, p, c0, c1, a0, a1, b, threadIdx.x % 32);
  }
}

// A persistent grid (two CTAs of 512 an SM) whose warps ask the counter for
// their next block before updating the current one, so that the atomic's
// round trip overlaps the block's loads. (Asking after the update is
// StrideThenCounterKernel<T, 0, 1>.) A counter throughout would give one
// block a warp's narrow sweep of memory in the block scheduler's order,
// without a CTA's setup per block.
template <typename T>
__global__ void __launch_bounds__(512) CounterAheadKernel(
    const T* __restrict__ g, T* p, uint8_t* c0, uint8_t* c1, float* a0,
    float* a1, int64_t blocks, unsigned long long* next) {
  const int lane = threadIdx.x % 32;
  for (int64_t b = TakeBlocks(next, 1, lane); b < blocks;) {
    const int64_t after = TakeBlocks(next, 1, lane);
    UpdateBlock(g, p, c0, c1, a0, a1, b, lane);
    b = after;
  }
}

// The stride for the first kStaticEighths eighths of each warp's share, then
// the rest from a counter, kGrab consecutive blocks a take: the static
// split's narrow front with a dynamic tail.
template <typename T, int kStaticEighths, int kGrab>
__global__ void __launch_bounds__(512) StrideThenCounterKernel(
    const T* __restrict__ g, T* p, uint8_t* c0, uint8_t* c1, float* a0,
    float* a1, int64_t blocks, unsigned long long* next) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = GridWarp();
  const int64_t warps = GridWarps();
  const int64_t fixed = blocks / warps * kStaticEighths / 8 * warps;
  for (int64_t b = warp; b < fixed; b += warps) {
    UpdateBlock(g, p, c0, c1, a0, a1, b, lane);
  }
  auto take = [&] { return fixed + TakeBlocks(next, kGrab, lane); };
  for (int64_t b = take(); b < blocks; b = take()) {
    for (int j = 0; j < kGrab && b + j < blocks; ++j) {
      UpdateBlock(g, p, c0, c1, a0, a1, b + j, lane);
    }
  }
}

// Dynamic shared memory a CTA asks for (and never touches) so that only two
// CTAs of 512 threads fit an SM: the fused kernels' occupancy (64 registers
// a thread), where these kernels alone would fill the SM.
constexpr int kTwoPerSmSharedBytes = 80 * 1024;

template <typename Launch>
float MedianMs(Launch launch) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> times;
  for (int i = 0; i < 15; ++i) {
    CHECK(cudaEventRecord(start));
    launch();
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  CHECK(cudaGetLastError());
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

template <typename T>
void Run(const char* name, int64_t n, int sms, double copy_gbs) {
  const int64_t blocks = n / kBlock;
  T *g, *p;
  uint8_t *c0, *c1;
  float *a0, *a1;
  CHECK(cudaMalloc(&g, n * sizeof(T)));
  CHECK(cudaMalloc(&p, n * sizeof(T)));
  CHECK(cudaMalloc(&c0, n));
  CHECK(cudaMalloc(&c1, n));
  CHECK(cudaMalloc(&a0, blocks * sizeof(float)));
  CHECK(cudaMalloc(&a1, blocks * sizeof(float)));
  CHECK(cudaMemset(g, 0, n * sizeof(T)));
  CHECK(cudaMemset(p, 0, n * sizeof(T)));
  CHECK(cudaMemset(c0, 0, n));
  CHECK(cudaMemset(c1, 0, n));
  CHECK(cudaMemset(a0, 0, blocks * sizeof(float)));
  CHECK(cudaMemset(a1, 0, blocks * sizeof(float)));
  const double bytes = static_cast<double>(n) * (3 * sizeof(T) + 4) +
                       static_cast<double>(blocks) * 16;
  auto report = [&](const char* shape, float ms) {
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    std::printf("| %s | %s | %.3f | %.0f | %.1f%% |\n", name, shape, ms, gbs,
                100.0 * gbs / copy_gbs);
  };
  for (int per_sm : {2, 4}) {
    const int grid = sms * per_sm;
    report(per_sm == 2 ? "stride, 2 x 512 threads an SM (ours)"
                       : "stride, 4 x 512 threads an SM",
           MedianMs([&] {
             StrideKernel<T><<<grid, 512>>>(g, p, c0, c1, a0, a1, blocks);
           }));
  }
  {
    const int grid = sms * 2;
    const int64_t warps = static_cast<int64_t>(grid) * 512 / 32;
    unsigned long long* times;
    CHECK(cudaMalloc(&times, warps * 2 * sizeof(*times)));
    MedianMs([&] {
      StrideKernel<T><<<grid, 512>>>(g, p, c0, c1, a0, a1, blocks, times);
    });
    std::vector<unsigned long long> host(warps * 2);
    CHECK(cudaMemcpy(host.data(), times, host.size() * sizeof(*times),
                     cudaMemcpyDeviceToHost));
    CHECK(cudaFree(times));
    unsigned long long first = host[0];
    std::vector<double> finish;
    for (int64_t w = 0; w < warps; ++w) first = std::min(first, host[2 * w]);
    for (int64_t w = 0; w < warps; ++w) finish.push_back((host[2 * w + 1] - first) * 1e-6);
    std::sort(finish.begin(), finish.end());
    std::printf("| %s | stride's warps finish (last launch), ms after the first start: "
                "first %.3f, 10%% %.3f, median %.3f, 90%% %.3f, last %.3f | | | |\n",
                name, finish.front(), finish[finish.size() / 10],
                finish[finish.size() / 2], finish[finish.size() * 9 / 10],
                finish.back());
  }
  const int64_t ctas = (blocks * 32 + 511) / 512;
  report("one block a warp, full occupancy", MedianMs([&] {
           OneShotKernel<T><<<ctas, 512>>>(g, p, c0, c1, a0, a1, blocks);
         }));
  const int capped = kTwoPerSmSharedBytes;
  for (auto kernel : {OneShotKernel<T>, ChunkKernel<T, 4>, ChunkKernel<T, 16>}) {
    CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, capped));
  }
  report("one block a warp, 2 x 512 threads an SM", MedianMs([&] {
           OneShotKernel<T><<<ctas, 512, capped>>>(g, p, c0, c1, a0, a1, blocks);
         }));
  auto chunked = [&](auto kernel, int runs, int shared) {
    const int64_t chunk_ctas = (blocks + 16 * runs - 1) / (16 * runs);
    return MedianMs([&] {
      kernel<<<chunk_ctas, 512, shared>>>(g, p, c0, c1, a0, a1, blocks);
    });
  };
  unsigned long long* next;
  CHECK(cudaMalloc(&next, sizeof(*next)));
  auto counted = [&](auto kernel) {
    CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, capped));
    return MedianMs([&] {
      CHECK(cudaMemsetAsync(next, 0, sizeof(*next)));
      kernel<<<sms * 2, 512, capped>>>(g, p, c0, c1, a0, a1, blocks, next);
    });
  };
  report("persistent, a counter, 2 x 512 threads an SM",
         counted(StrideThenCounterKernel<T, 0, 1>));
  report("persistent, a counter one block ahead, 2 x 512 threads an SM",
         counted(CounterAheadKernel<T>));
  report("stride 7/8, then a counter, 2 x 512 threads an SM",
         counted(StrideThenCounterKernel<T, 7, 1>));
  report("stride 7/8, then a counter by 4 blocks, 2 x 512 threads an SM",
         counted(StrideThenCounterKernel<T, 7, 4>));
  report("stride 1/2, then a counter by 4 blocks, 2 x 512 threads an SM",
         counted(StrideThenCounterKernel<T, 4, 4>));
  report("a counter by 4 blocks, 2 x 512 threads an SM",
         counted(StrideThenCounterKernel<T, 0, 4>));
  CHECK(cudaFree(next));
  report("4 blocks a warp, 2 x 512 threads an SM",
         chunked(ChunkKernel<T, 4>, 4, capped));
  report("16 blocks a warp, 2 x 512 threads an SM",
         chunked(ChunkKernel<T, 16>, 16, capped));
  report("16 blocks a warp, full occupancy",
         chunked(ChunkKernel<T, 16>, 16, 0));
  CHECK(cudaFree(g));
  CHECK(cudaFree(p));
  CHECK(cudaFree(c0));
  CHECK(cudaFree(c1));
  CHECK(cudaFree(a0));
  CHECK(cudaFree(a1));
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  // The copy: 2 GiB each way.
  const size_t copy_bytes = size_t{2} << 30;
  void *src, *dst;
  CHECK(cudaMalloc(&src, copy_bytes));
  CHECK(cudaMalloc(&dst, copy_bytes));
  CHECK(cudaMemset(src, 1, copy_bytes));
  const float copy_ms = MedianMs([&] {
    CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice));
  });
  const double copy_gbs = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));
  std::printf("%s, %d SMs; device-to-device copy of 2 GiB: %.3f ms, %.0f GB/s "
              "(read + write)\n\n",
              prop.name, sms, copy_ms, copy_gbs);
  std::printf("| parameters | launch | ms | GB/s | of the copy's rate |\n");
  std::printf("|---|---|---:|---:|---:|\n");
  const int64_t n = int64_t{308000000} / kBlock * kBlock;
  Run<float>("fp32, 308M", n, sms, copy_gbs);
  Run<__nv_bfloat16>("bf16, 308M", n, sms, copy_gbs);
  return 0;
}
