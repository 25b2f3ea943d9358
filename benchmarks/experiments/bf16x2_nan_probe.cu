// What the GPU makes of NaN on the way to bf16, for proposal C of
// benchmarks/logs/sass_budget_2026-12-06.md (round bf16 pairs with one packed
// conversion and drop FromFloat<BFloat16>'s NaN select). The select exists
// because the CPU keeps a NaN's sign and payload (quieted); the packed
// conversion may canonicalize. Whether C keeps the GPU equal to the CPU
// depends on two facts this prints for NaNs of either sign and several
// payloads: what cvt.rn.bf16x2.f32 (and the scalar cvt) gives, and what the
// kernel's own arithmetic (p + u, fma) hands FromFloat when an operand is NaN.
//   nvcc -arch=sm_90 -o /tmp/bf16x2_nan_probe bf16x2_nan_probe.cu && /tmp/bf16x2_nan_probe
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

namespace {

constexpr int kInputs = 8;

__global__ void Probe(const float* in, uint32_t* out) {
  const int i = threadIdx.x;
  if (i >= kInputs) return;
  const float x = in[i];
  const float one = in[kInputs];  // 1.0f, read from memory so nothing folds
  const __nv_bfloat162 pair = __floats2bfloat162_rn(x, one);
  uint32_t packed;
  memcpy(&packed, &pair, sizeof(packed));
  out[i * 5 + 0] = packed & 0xffffu;                               // packed cvt
  out[i * 5 + 1] = __bfloat16_as_ushort(__float2bfloat16_rn(x));  // scalar cvt
  uint32_t sum, fma_bits, product;
  const float s = x + one, f = fmaf(x, one, one), p = x * one;
  memcpy(&sum, &s, 4);
  memcpy(&fma_bits, &f, 4);
  memcpy(&product, &p, 4);
  out[i * 5 + 2] = sum;
  out[i * 5 + 3] = fma_bits;
  out[i * 5 + 4] = product;
}

}  // namespace

int main() {
  const uint32_t bits[kInputs] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u,
                                  0x7fa12345u, 0xffe54321u, 0x7fffffffu, 0x3f800000u};
  float host_in[kInputs + 1];
  for (int i = 0; i < kInputs; ++i) memcpy(&host_in[i], &bits[i], 4);
  host_in[kInputs] = 1.0f;
  float* in;
  uint32_t* out;
  if (cudaMalloc(&in, sizeof(host_in)) != cudaSuccess ||
      cudaMalloc(&out, kInputs * 5 * sizeof(uint32_t)) != cudaSuccess) {
    std::printf("cudaMalloc failed\n");
    return 1;
  }
  cudaMemcpy(in, host_in, sizeof(host_in), cudaMemcpyHostToDevice);
  Probe<<<1, 32>>>(in, out);
  uint32_t host_out[kInputs * 5];
  if (cudaMemcpy(host_out, out, sizeof(host_out), cudaMemcpyDeviceToHost) != cudaSuccess) {
    std::printf("kernel failed\n");
    return 1;
  }
  std::printf("| input | bf16x2 cvt | bf16 cvt | x + 1 | fma(x, 1, 1) | x * 1 | CPU FromFloat |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (int i = 0; i < kInputs; ++i) {
    const uint32_t* r = &host_out[i * 5];
    // FromFloat<BFloat16> on the CPU: NaN quieted, anything else rounded.
    const bool nan = (bits[i] & 0x7fffffffu) > 0x7f800000u;
    const uint32_t cpu = nan ? (bits[i] >> 16) | 0x40u
                             : (bits[i] + 0x7fffu + ((bits[i] >> 16) & 1u)) >> 16;
    std::printf("| 0x%08x | 0x%04x | 0x%04x | 0x%08x | 0x%08x | 0x%08x | 0x%04x |\n", bits[i], r[0],
                r[1], r[2], r[3], r[4], cpu & 0xffffu);
  }
  return 0;
}
