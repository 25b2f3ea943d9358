// Blockwise 8-bit quantization with bitsandbytes' dynamic tree maps.
//
// Shared by the CPU and CUDA paths so the two cannot drift: every function
// here is callable from host and device code.
//
// A block of kBlockSize values is stored as one uint8 code per value and one
// float32 absmax. Encoding a value x of a block with absmax a picks the map
// entry nearest to x * (1 / a); equidistant values go to the entry of smaller
// magnitude. Nearest is decided against float32 midpoints of neighbouring map
// entries, found with a lookup table on the float's bits instead of a binary
// search (same answer, a quarter of the memory reads).
#ifndef OPTAX_PAGED_FFI_QUANTIZATION_H_
#define OPTAX_PAGED_FFI_QUANTIZATION_H_

#include <cstdint>
#include <cstring>

#include "dynamic_maps.h"

#if defined(__CUDACC__)
#define OPTAX_PAGED_HD __host__ __device__ __forceinline__
#else
#define OPTAX_PAGED_HD inline
#endif

namespace optax_paged {

// bitsandbytes >= 0.44 blockwise optimizers: blocks of 256, fp32 absmax.
inline constexpr int kBlockSize = 256;

// The lookup table buckets |x| by its exponent and top mantissa bits. Below
// 2^(kLutMinExponent - 127) = 2^-40 every value encodes as zero (the smallest
// nonzero map magnitude is 5.5e-7); exponents past 128 share the last bucket.
inline constexpr int kLutMantissaBits = 7;
inline constexpr int kLutMinExponent = 87;
inline constexpr int kLutSize = (128 - kLutMinExponent + 2) << kLutMantissaBits;

// One side (positive or negative) of a map: the ascending magnitudes of the
// midpoints between neighbouring entries, and for each bucket the number of
// midpoints below the bucket's lowest value.
struct QuantSide {
  float midpoints[255];
  uint8_t bucket_start[kLutSize];
  int count;
};

struct QuantTables {
  float values[256];
  QuantSide positive;
  QuantSide negative;
  int zero_code;
};

OPTAX_PAGED_HD uint32_t FloatBits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

inline float BitsToFloat(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// Number of midpoints of `side` strictly below `magnitude` (>= 0, not NaN).
OPTAX_PAGED_HD int CountMidpointsBelow(const QuantSide& side, float magnitude) {
  const uint32_t bits = FloatBits(magnitude);
  if (static_cast<int>(bits >> 23) < kLutMinExponent) return 0;
  uint32_t key = (bits >> (23 - kLutMantissaBits)) -
                 (static_cast<uint32_t>(kLutMinExponent) << kLutMantissaBits);
  if (key >= static_cast<uint32_t>(kLutSize)) key = kLutSize - 1;
  int count = side.bucket_start[key];
  while (count < side.count && side.midpoints[count] < magnitude) ++count;
  return count;
}

// The code of the map entry nearest to `scaled` (a value already divided by
// its block's absmax). NaN encodes as zero; its block's absmax is NaN anyway.
OPTAX_PAGED_HD uint8_t Encode(const QuantTables& tables, float scaled) {
  if (scaled < 0.0f) {
    return static_cast<uint8_t>(
        tables.zero_code - CountMidpointsBelow(tables.negative, -scaled));
  }
  if (!(scaled >= 0.0f)) return static_cast<uint8_t>(tables.zero_code);
  return static_cast<uint8_t>(
      tables.zero_code + CountMidpointsBelow(tables.positive, scaled));
}

OPTAX_PAGED_HD float Decode(const float* values, uint8_t code, float absmax) {
  return values[code] * absmax;
}

// Running block maximum of |x| that keeps NaN once seen, so a non-finite
// element poisons its block instead of vanishing (fmaxf would drop it).
OPTAX_PAGED_HD float AbsMaxStep(float running, float x) {
  const float magnitude = x < 0.0f ? -x : x;
  return (magnitude > running || magnitude != magnitude) ? magnitude : running;
}

// The multiplier that maps a block onto [-1, 1]; zero for an all-zero block
// (and for a non-finite absmax, whose block decodes to NaN regardless).
OPTAX_PAGED_HD float InverseScale(float absmax) {
  return (absmax > 0.0f && absmax <= 3.4028234663852886e38f) ? 1.0f / absmax
                                                              : 0.0f;
}

// Fills one side from the map entries on that side of zero. `step` is +1 for
// the positive side (entries above zero_code), -1 for the negative side.
inline void BuildQuantSide(const float* values, int zero_code, int step,
                           QuantSide* side) {
  side->count = 0;
  for (int code = zero_code; code + step >= 0 && code + step < 256;
       code += step) {
    const float midpoint = 0.5f * (values[code] + values[code + step]);
    side->midpoints[side->count++] = midpoint < 0.0f ? -midpoint : midpoint;
  }
  for (int key = 0; key < kLutSize; ++key) {
    const uint32_t low_bits =
        (static_cast<uint32_t>(key) +
         (static_cast<uint32_t>(kLutMinExponent) << kLutMantissaBits))
        << (23 - kLutMantissaBits);
    const float low = BitsToFloat(low_bits);
    int below = 0;
    while (below < side->count && side->midpoints[below] < low) ++below;
    side->bucket_start[key] = static_cast<uint8_t>(below);
  }
}

inline void BuildQuantTables(const float* map, QuantTables* tables) {
  tables->zero_code = 0;
  for (int code = 0; code < 256; ++code) {
    tables->values[code] = map[code];
    if (map[code] == 0.0f) tables->zero_code = code;
  }
  BuildQuantSide(map, tables->zero_code, +1, &tables->positive);
  BuildQuantSide(map, tables->zero_code, -1, &tables->negative);
}

// Tables for the two maps, built once on first use.
inline const QuantTables& SignedTables() {
  static const QuantTables* tables = [] {
    auto* t = new QuantTables;
    BuildQuantTables(kSignedDynamicMap, t);
    return t;
  }();
  return *tables;
}

inline const QuantTables& UnsignedTables() {
  static const QuantTables* tables = [] {
    auto* t = new QuantTables;
    BuildQuantTables(kUnsignedDynamicMap, t);
    return t;
  }();
  return *tables;
}

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_QUANTIZATION_H_
