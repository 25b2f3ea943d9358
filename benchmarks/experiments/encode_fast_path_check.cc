// Exhaustive CPU check of the encode fast path proposed for the CUDA kernel
// (issue 26, benchmarks/NOTES.md "Where the instructions go", proposal B): code-indexed
// tables and a sign-of-difference compare give Encode's code for every float32.
//   g++ -O2 -std=c++17 -pthread -I ffi benchmarks/experiments/encode_fast_path_check.cc -o /tmp/enc && /tmp/enc
// Written by a helper session on 2026-12-06; 0 mismatches over both maps (about 60 s).
// Exhaustive check: code-indexed tables + sign-of-difference compare == Encode, for every float.
#include <cstdio>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
#include <atomic>
#include "quantization.h"
using namespace optax_paged;

struct CodeTables {
  float mid_by_code[256];
  uint8_t bucket_code[2][kLutSize];
};

static void Build(const QuantTables& q, CodeTables* t) {
  const int zc = q.zero_code;
  for (int c = 0; c < 256; ++c) {
    float th;
    if (c >= zc) {
      th = q.midpoints[0][c - zc];            // +inf padding past the last entry
    } else {
      const int k = zc - 1 - c;
      th = std::nextafterf(-q.midpoints[1][k], -INFINITY);  // ties go to c + 1 (smaller magnitude)
    }
    t->mid_by_code[c] = th;
  }
  for (int key = 0; key < kLutSize; ++key) {
    t->bucket_code[0][key] = static_cast<uint8_t>(zc + q.bucket_start[0][key]);
    int c0 = zc - q.bucket_start[1][key] - 1;
    t->bucket_code[1][key] = static_cast<uint8_t>(c0 < 0 ? 0 : c0);
  }
}

// The proposed device fast path (absmax finite => |scaled| <= 1 + 2^-23, never NaN).
static inline uint32_t EncodeFast(const CodeTables& t, float scaled) {
  const uint32_t side = FloatBits(scaled) >> 31;
  const float clamped = std::fmax(std::fabs(scaled), 0x1p-40f);
  const int key = static_cast<int>(FloatBits(clamped) >> 16) - (kLutMinExponent << kLutMantissaBits);
  const uint32_t c0 = t.bucket_code[side][key];
  return c0 + (FloatBits(t.mid_by_code[c0] - scaled) >> 31);
}
// Total version (any input): upper clamp and NaN select added.
static inline uint32_t EncodeFull(const CodeTables& t, const QuantTables& q, float scaled) {
  if (scaled != scaled) return q.zero_code;
  const uint32_t side = FloatBits(scaled) >> 31;
  uint32_t k = FloatBits(std::fmax(std::fabs(scaled), 0x1p-40f)) >> 16;
  int key = static_cast<int>(k) - (kLutMinExponent << kLutMantissaBits);
  if (key > kLutSize - 1) key = kLutSize - 1;
  const uint32_t c0 = t.bucket_code[side][key];
  return c0 + (scaled > t.mid_by_code[c0] ? 1u : 0u);
}

int main() {
  const QuantTables* maps[2] = {&SignedTables(), &UnsignedTables()};
  for (int mi = 0; mi < 2; ++mi) {
    const QuantTables& q = *maps[mi];
    static CodeTables t; Build(q, &t);
    std::atomic<uint64_t> bad_fast{0}, bad_full{0}, checked_fast{0};
    const int nth = 2;
    std::vector<std::thread> th;
    for (int w = 0; w < nth; ++w) th.emplace_back([&, w] {
      uint64_t bf = 0, bu = 0, cf = 0;
      for (uint64_t b = w; b < (1ull << 32); b += nth) {
        const float x = BitsToFloat(static_cast<uint32_t>(b));
        const uint32_t ref = Encode(q, x);
        if (EncodeFull(t, q, x) != ref) { if (bu < 5) printf("full mismatch map %d x=%a ref=%u got=%u\n", mi, x, ref, EncodeFull(t, q, x)); ++bu; }
        if (x == x && std::fabs(x) < 2.0f) {
          ++cf;
          if (EncodeFast(t, x) != ref) { if (bf < 5) printf("fast mismatch map %d x=%a ref=%u got=%u\n", mi, x, ref, EncodeFast(t, x)); ++bf; }
        }
      }
      bad_fast += bf; bad_full += bu; checked_fast += cf;
    });
    for (auto& x : th) x.join();
    printf("map %d (zero_code %d): fast-path inputs checked %llu, mismatches %llu; all 2^32 inputs, full version mismatches %llu\n",
           mi, q.zero_code, (unsigned long long)checked_fast.load(), (unsigned long long)bad_fast.load(), (unsigned long long)bad_full.load());
  }
}
