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

#include <cmath>
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

// 4-bit states (Li et al., 2023; torchao's AdamW4bit): blocks of 128, two
// codes a byte, element 2i in the low nibble and 2i + 1 in the high one.
inline constexpr int kFourBitBlockSize = 128;

// The lookup table buckets |x| by its exponent and top mantissa bits. Below
// 2^(kLutMinExponent - 127) = 2^-40 every value encodes as zero (the smallest
// nonzero map magnitude is 5.5e-7); exponents past 128 share the last bucket.
inline constexpr int kLutMantissaBits = 7;
inline constexpr int kLutMinExponent = 87;
inline constexpr int kLutSize = (128 - kLutMinExponent + 2) << kLutMantissaBits;

OPTAX_PAGED_HD uint32_t FloatBits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

OPTAX_PAGED_HD float BitsToFloat(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// The positive and negative sides of a map, each as the ascending
// magnitudes of the midpoints between neighbouring entries (padded with
// infinity), and per bucket the number of midpoints below the bucket's lowest
// value. No bucket of the dynamic maps holds more than one midpoint, so one
// comparison after the table lookup finds the nearest entry without a branch.
struct QuantTables {
  float values[256];
  float midpoints[2][256];  // [0]: positive side, [1]: negative side
  uint8_t bucket_start[2][kLutSize];
  int zero_code;
  int max_midpoints_per_bucket;
};

// The code of the map entry nearest to `scaled` (a value already divided by
// its block's absmax). NaN encodes as the zero code; its block's absmax is
// NaN, so the block decodes to NaN whatever the codes.
OPTAX_PAGED_HD uint8_t Encode(const QuantTables& tables, float scaled) {
  const uint32_t bits = FloatBits(scaled);
  const uint32_t side = bits >> 31;
  const float magnitude = BitsToFloat(bits & 0x7fffffffu);
  int key = static_cast<int>((bits & 0x7fffffffu) >> (23 - kLutMantissaBits)) -
            (kLutMinExponent << kLutMantissaBits);
  key = key < 0 ? 0 : (key >= kLutSize ? kLutSize - 1 : key);
  int count = tables.bucket_start[side][key];
  count += tables.midpoints[side][count] < magnitude ? 1 : 0;
  // Arithmetic, not a branch: the sign of a moment is a coin flip.
  const int negate = -static_cast<int>(side);
  const int code = tables.zero_code + ((count ^ negate) - negate);
  return static_cast<uint8_t>(scaled != scaled ? tables.zero_code : code);
}

OPTAX_PAGED_HD uint8_t NearestCode(const QuantTables& tables, float scaled) {
  return Encode(tables, scaled);
}

OPTAX_PAGED_HD float Decode(const float* values, uint8_t code, float absmax) {
  return values[code] * absmax;
}

// The code of the 4-bit unsigned map's entry ((code + 1) / 16) nearest to
// `scaled`, ties to the smaller; NaN and everything below 3/32 give code 0.
// The midpoint above code c is (2c + 3) / 32, so the code is the number of
// integers c in [0, 15) with 2c + 3 < 32 x: ceil((32 x - 3) / 2), clamped.
// Every step is exact in float32 (32 x and the halving are powers of two;
// 32 x - 3 is exact wherever the ceiling can be above zero). The clamp
// comes first (ceil commutes with it: the bounds are integers) and sends NaN
// to 0 (fmaxf drops a NaN operand). On the device the ceiling is an add of
// 2^23 rounding up, whose low bits are then the code: two full-rate
// instructions instead of FRND and F2I, which issue at a quarter of the rate.
OPTAX_PAGED_HD uint8_t EncodeLinear16(float scaled) {
  const float clamped =
      fminf(fmaxf((scaled * 32.0f - 3.0f) * 0.5f, 0.0f), 15.0f);
#if defined(__CUDA_ARCH__)
  return static_cast<uint8_t>(FloatBits(__fadd_ru(clamped, 8388608.0f)) & 0xfu);
#else
  return static_cast<uint8_t>(ceilf(clamped));
#endif
}

// The multiplier that maps a block onto [-1, 1]. Zero for an all-zero block,
// for a non-finite absmax (the block decodes to NaN regardless) and for a
// subnormal absmax, whose reciprocal would overflow: such a block (every
// |x| < 1.2e-38) decodes to zero, as XLA's flush-to-zero CPU code sees it.
OPTAX_PAGED_HD float InverseScale(float absmax) {
  return (absmax >= 1.17549435e-38f && absmax <= 3.4028234663852886e38f)
             ? 1.0f / absmax
             : 0.0f;
}

// The 4-bit code of `scaled` for a moment of either sign kind: the signed
// map through its tables, the unsigned one in closed form.
OPTAX_PAGED_HD uint8_t EncodeFourBit(const QuantTables& signed_tables,
                                     bool is_signed, float scaled) {
  return is_signed ? Encode(signed_tables, scaled) : EncodeLinear16(scaled);
}

// The value of a 4-bit code: the unsigned map's entry (code + 1) / 16 is
// computed, exactly, instead of looked up.
// `Tables`: QuantTables or FiniteCodeTables (both hold the map's values).
template <typename Tables>
OPTAX_PAGED_HD float DecodeFourBit(const Tables& signed_tables, bool is_signed,
                                   uint8_t code, float absmax) {
  // (2^23 + code) / 16 - (2^19 - 1/16) = (code + 1) / 16, every step exact
  // (so contraction changes nothing); an integer conversion would issue at a
  // quarter of the rate.
  const float value =
      is_signed ? signed_tables.values[code]
                : BitsToFloat(0x4b000000u | code) * 0.0625f - 524287.9375f;
  return value * absmax;
}

// Stochastic rounding of 4-bit codes. With nearest rounding a moment that
// moves by less than half a code step a step never moves at all: Lion's
// momentum (1% of a gradient a step) froze, and 4-bit Lion ended 9% above
// optax.lion on the LM example (benchmarks/RESULTS.md), where rounding up
// with probability equal to the fraction of the gap came within 0.5%.
//
// The random bits are a hash of (step, leaf, element), as the parameters'
// stochastic rounding draws (RandomBits), so every path and every mesh
// draws the same ones; 32-bit arithmetic only, so that the jnp reference
// computes them without 64-bit types (state_rounding_bits in
// optax_paged/_src/quantization.py).
OPTAX_PAGED_HD uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// A leaf's key at a step (`seed`, the kernels' seed slot): hoisted out of
// the element loop.
OPTAX_PAGED_HD uint32_t StateRoundingKey(uint32_t seed, uint32_t leaf) {
  return Mix32(Mix32(seed * 0x9e3779b9u + 0x7f4a7c15u) ^ (leaf * 0x85ebca6bu));
}

// The bits of element `index` of the leaf (its index in the whole leaf, so
// a shard draws what one device draws).
OPTAX_PAGED_HD uint32_t StateRoundingBits(uint32_t key, uint64_t index) {
  return Mix32(static_cast<uint32_t>(index) ^ key ^
               (static_cast<uint32_t>(index >> 32) * 0x9e3779b9u));
}

// The 4-bit signed map's code for `scaled`, rounded stochastically between
// the entries below and above it: up when the distance from the one below
// exceeds u times the gap, u = (random >> 9) / 2^23 in [0, 1). Every step
// is one correctly rounded operation (u is exact, built from bits), so the
// CPU, the GPU and XLA agree. Outside [values[0], values[15]] (|x| = 1 of a
// negative absmax element) the end entry is kept; NaN gives the zero code.
// `Tables`: QuantTables, or FiniteCodeTables for a block with a finite absmax
// (NearestCode: the same nearest code either way).
template <typename Tables>
OPTAX_PAGED_HD uint8_t EncodeFourBitStochastic(const Tables& tables,
                                               float scaled, uint32_t random) {
  const int nearest = NearestCode(tables, scaled);
  int low = tables.values[nearest] > scaled ? nearest - 1 : nearest;
  low = low < 0 ? 0 : (low > 14 ? 14 : low);
  const float gap = tables.values[low + 1] - tables.values[low];
  const float into = scaled - tables.values[low];
  const float u = BitsToFloat(0x3f800000u | (random >> 9)) - 1.0f;
  return static_cast<uint8_t>(into > u * gap ? low + 1 : low);
}

// Fills one side from the map entries on that side of zero. `step` is +1 for
// the positive side (entries above zero_code), -1 for the negative side.
inline void BuildQuantSide(const float* values, int size, int zero_code,
                           int step, float* midpoints, uint8_t* bucket_start,
                           int* max_per_bucket) {
  int count = 0;
  for (int code = zero_code; code + step >= 0 && code + step < size;
       code += step) {
    const float midpoint = 0.5f * (values[code] + values[code + step]);
    midpoints[count++] = midpoint < 0.0f ? -midpoint : midpoint;
  }
  for (int i = count; i < 256; ++i) midpoints[i] = BitsToFloat(0x7f800000u);
  for (int key = 0; key < kLutSize; ++key) {
    const uint32_t low_bits =
        (static_cast<uint32_t>(key) +
         (static_cast<uint32_t>(kLutMinExponent) << kLutMantissaBits))
        << (23 - kLutMantissaBits);
    const uint32_t high_bits = low_bits + (1u << (23 - kLutMantissaBits));
    int below = 0;
    while (below < count && midpoints[below] < BitsToFloat(low_bits)) ++below;
    int inside = 0;
    while (below + inside < count && midpoints[below + inside] < BitsToFloat(high_bits)) {
      ++inside;
    }
    bucket_start[key] = static_cast<uint8_t>(below);
    if (inside > *max_per_bucket) *max_per_bucket = inside;
  }
}

// Tables of a sorted map of `size` (at most 256) entries holding zero.
inline void BuildQuantTables(const float* map, int size, QuantTables* tables) {
  tables->zero_code = 0;
  for (int code = 0; code < 256; ++code) {
    tables->values[code] = code < size ? map[code] : 0.0f;
    if (code < size && map[code] == 0.0f) tables->zero_code = code;
  }
  tables->max_midpoints_per_bucket = 0;
  BuildQuantSide(map, size, tables->zero_code, +1, tables->midpoints[0],
                 tables->bucket_start[0], &tables->max_midpoints_per_bucket);
  BuildQuantSide(map, size, tables->zero_code, -1, tables->midpoints[1],
                 tables->bucket_start[1], &tables->max_midpoints_per_bucket);
}

// Tables for the two maps, built once on first use.
inline const QuantTables& SignedTables() {
  static const QuantTables* tables = [] {
    auto* t = new QuantTables;
    BuildQuantTables(kSignedDynamicMap, 256, t);
    return t;
  }();
  return *tables;
}

inline const QuantTables& UnsignedTables() {
  static const QuantTables* tables = [] {
    auto* t = new QuantTables;
    BuildQuantTables(kUnsignedDynamicMap, 256, t);
    return t;
  }();
  return *tables;
}

// The GPU's encode of a block whose absmax is finite (every |scaled| <= 1 +
// 2^-23, never NaN): tables indexed by code, so that the nearest code is
// one lookup of the lower candidate, one of the threshold above it and the
// sign of their difference, about half of Encode's instructions (the
// kernels are bound by instructions; benchmarks/NOTES.md, issue 26). The
// same code as Encode for every such value, for both 8-bit maps and the
// 4-bit signed one: the exhaustive check is
// tests/data/finite_encode_check.cc --all. A block holding NaN or
// infinity takes Encode. Needs subnormals kept (no flush to zero).
struct FiniteCodeTables {
  float values[256];  // the map, for decoding
  // Between code c and c + 1: the midpoint, ties to the smaller magnitude
  // (below zero the midpoint's magnitude one step larger); infinity past
  // the last code.
  float threshold[256];
  // Per side (0: x >= 0) and bucket of |x| (Encode's key): the code just
  // below every threshold the bucket's values can exceed.
  uint8_t lower_code[2][kLutSize];
};

// 2^-40: every smaller magnitude shares the first bucket (kLutMinExponent).
inline constexpr float kLutFloor = 9.094947017729282e-13f;

OPTAX_PAGED_HD uint8_t EncodeFinite(const FiniteCodeTables& tables,
                                    float scaled) {
  const uint32_t side = FloatBits(scaled) >> 31;
  const float magnitude = fmaxf(fabsf(scaled), kLutFloor);
  const int key = static_cast<int>(FloatBits(magnitude) >>
                                   (23 - kLutMantissaBits)) -
                  (kLutMinExponent << kLutMantissaBits);
  const uint32_t lower = tables.lower_code[side][key];
  return static_cast<uint8_t>(
      lower + (FloatBits(tables.threshold[lower] - scaled) >> 31));
}

// Encode's code for a value of a block with a finite absmax.
OPTAX_PAGED_HD uint8_t NearestCode(const FiniteCodeTables& tables,
                                   float scaled) {
  return EncodeFinite(tables, scaled);
}

inline void BuildFiniteCodeTables(const QuantTables& quant,
                                  FiniteCodeTables* tables) {
  const int zero = quant.zero_code;
  for (int code = 0; code < 256; ++code) {
    tables->values[code] = quant.values[code];
    tables->threshold[code] =
        code >= zero ? quant.midpoints[0][code - zero]
                     : std::nextafterf(-quant.midpoints[1][zero - 1 - code],
                                       -BitsToFloat(0x7f800000u));
  }
  for (int key = 0; key < kLutSize; ++key) {
    tables->lower_code[0][key] =
        static_cast<uint8_t>(zero + quant.bucket_start[0][key]);
    const int below = zero - quant.bucket_start[1][key] - 1;
    tables->lower_code[1][key] = static_cast<uint8_t>(below < 0 ? 0 : below);
  }
}

// The 4-bit signed map's tables (Encode works on them unchanged); the
// unsigned 4-bit map needs none (EncodeLinear16), only its values.
inline const QuantTables& SignedFourBitTables() {
  static const QuantTables* tables = [] {
    auto* t = new QuantTables;
    BuildQuantTables(kSignedFourBitMap, 16, t);
    return t;
  }();
  return *tables;
}

// The FiniteCodeTables of the map whose QuantTables `kQuant` returns, built
// once on first use.
template <const QuantTables& (*kQuant)()>
inline const FiniteCodeTables& FiniteCodeTablesOf() {
  static const FiniteCodeTables* tables = [] {
    auto* t = new FiniteCodeTables;
    BuildFiniteCodeTables(kQuant(), t);
    return t;
  }();
  return *tables;
}

inline const FiniteCodeTables& SignedFiniteCodeTables() {
  return FiniteCodeTablesOf<SignedTables>();
}

inline const FiniteCodeTables& UnsignedFiniteCodeTables() {
  return FiniteCodeTablesOf<UnsignedTables>();
}

inline const FiniteCodeTables& SignedFourBitFiniteCodeTables() {
  return FiniteCodeTablesOf<SignedFourBitTables>();
}

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_QUANTIZATION_H_
