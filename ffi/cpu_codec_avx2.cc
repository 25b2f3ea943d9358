// AVX2 block encode/decode, the gather versions used where gathers are
// fast (cpu_codec.cc chooses), and the 4-bit codecs for AVX2 and AVX-512.
// This file alone is compiled with -mavx2; its functions run only after
// HasAvx2() (and HasAvx512()) said yes. No FMA: every product and sum
// rounds exactly as the scalar code's.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_codec.h"

namespace optax_paged {

#if defined(__AVX2__)

namespace {

// One int32 per bucket for vpgatherdd, both sides back to back: the count of
// midpoints below the bucket in the high half, and in the low half the low
// 16 bits of the midpoint inside the bucket (0xffff when there is none).
// Every float in a bucket shares its high 16 bits (exponent and the 7
// mantissa bits that pick the bucket), and for non-negative floats bits order
// as values do, so comparing the low halves compares with the midpoint: one
// gather per 8 elements instead of a second one for the midpoint. Magnitudes
// clamped into the first or last bucket meet no midpoint there (the dynamic
// maps have none below 2^-40 or above 1).
struct PackedBuckets {
  int32_t entry[2 * kLutSize];
};

const PackedBuckets& PackedBucketsOf(const QuantTables& tables) {
  static const PackedBuckets* signed_buckets = nullptr;
  static const PackedBuckets* unsigned_buckets = nullptr;
  static const bool built = [] {
    for (int which = 0; which < 2; ++which) {
      const QuantTables& source = which == 0 ? SignedTables() : UnsignedTables();
      auto* packed = new PackedBuckets;
      for (int side = 0; side < 2; ++side) {
        for (int key = 0; key < kLutSize; ++key) {
          const int count = source.bucket_start[side][key];
          const uint32_t low =
              static_cast<uint32_t>(key + (kLutMinExponent << kLutMantissaBits))
              << (23 - kLutMantissaBits);
          const uint32_t high = low + (1u << (23 - kLutMantissaBits));
          const uint32_t midpoint = FloatBits(source.midpoints[side][count]);
          const uint32_t threshold =
              midpoint >= low && midpoint < high ? midpoint & 0xffffu : 0xffffu;
          packed->entry[side * kLutSize + key] =
              static_cast<int32_t>((static_cast<uint32_t>(count) << 16) | threshold);
        }
      }
      (which == 0 ? signed_buckets : unsigned_buckets) = packed;
    }
    return true;
  }();
  (void)built;
  return &tables == &SignedTables() ? *signed_buckets : *unsigned_buckets;
}

// The same buckets indexed by a scaled value's high 16 bits as they are
// (sign, exponent, 7 mantissa bits: no clamping, no side arithmetic), 2^16
// entries of which a step touches the few exponents its moments take. Each
// entry makes the code with one add and one shift of the value's low 16
// bits, L: on the positive side ((zero_code + count) << 16) + (0xffff -
// threshold), which carries into the code when L > threshold; on the
// negative side, where the code falls as the magnitude grows, ((zero_code -
// count - 1) << 16) + threshold + 1, with L's bits flipped (0xffff - L),
// which borrows from the code when L > threshold. The encode takes L from
// the value in memory: no bucket arithmetic, and the entry is the code.
struct CodeTable {
  uint32_t entry[1 << 16];
};

const CodeTable& CodeTableOf(const QuantTables& tables) {
  static const CodeTable* signed_table = nullptr;
  static const CodeTable* unsigned_table = nullptr;
  static const bool built = [] {
    for (int which = 0; which < 2; ++which) {
      const QuantTables& source =
          which == 0 ? SignedTables() : UnsignedTables();
      const PackedBuckets& packed = PackedBucketsOf(source);
      const uint32_t zero_code = static_cast<uint32_t>(source.zero_code);
      auto* table = new CodeTable;
      for (uint32_t high = 0; high < (1u << 16); ++high) {
        const uint32_t side = high >> 15;
        int key = static_cast<int>(high & 0x7fffu) -
                  (kLutMinExponent << kLutMantissaBits);
        key = std::clamp(key, 0, kLutSize - 1);
        const uint32_t bucket =
            static_cast<uint32_t>(packed.entry[side * kLutSize + key]);
        const uint32_t count = bucket >> 16;
        const uint32_t threshold = bucket & 0xffffu;
        table->entry[high] =
            side == 0 ? ((zero_code + count) << 16) + (0xffffu - threshold)
                      : ((zero_code - count - 1) << 16) + threshold + 1;
      }
      (which == 0 ? signed_table : unsigned_table) = table;
    }
    return true;
  }();
  (void)built;
  return &tables == &SignedTables() ? *signed_table : *unsigned_table;
}

// Eight int32 codes (0..255) as eight uint16.
inline __m128i CodeWords(__m256i code) {
  return _mm_packus_epi32(_mm256_castsi256_si128(code),
                          _mm256_extracti128_si256(code, 1));
}

}  // namespace

// Without gathers: a vector pass scales a piece (up to a block) into a
// small array; a second pass loads each value's entry with a scalar load
// indexed by the value's high half, read from that array, assembles eight
// into a vector and adds their low halves (CodeTable). AMD's AVX2 gathers
// are microcode (astc-encoder PR #511 measured scalar loads faster on Zen 2
// and Zen 4), and Intel's AVX2-only parts lost gather speed to the 2023
// Downfall microcode. One core of the AMD EPYC Zen 4 of 2026-12-05, in
// cache, ns a value: 0.32, against 0.55 for the gather encode and 0.54 for
// the AVX-512 one.
void EncodeBlockAvx2(const QuantTables& tables, const float* values,
                     float inverse, int64_t length, uint8_t* codes) {
  const uint32_t* entries = CodeTableOf(tables).entry;
  const __m256 scale = _mm256_set1_ps(inverse);
  const __m256i zero_code = _mm256_set1_epi32(tables.zero_code);
  const __m256i low_mask = _mm256_set1_epi32(0xffff);
  // The scaled values as 16-bit halves (read as such; vector loads and
  // stores may alias any type): element j's high half is halves[2 j + 1].
  alignas(32) uint16_t halves[2 * kBlockSize];
  float* scaled = reinterpret_cast<float*>(halves);
  int64_t i = 0;
  while (i + 8 <= length) {
    const int64_t piece =
        std::min<int64_t>(kBlockSize, (length - i) & ~int64_t{7});
    for (int64_t j = 0; j < piece; j += 8) {
      _mm256_store_ps(scaled + j,
                      _mm256_mul_ps(_mm256_loadu_ps(values + i + j), scale));
    }
    for (int64_t j = 0; j < piece; j += 8) {
      const uint16_t* h = halves + 2 * j + 1;
      const __m256i entry = _mm256_setr_epi32(
          entries[h[0]], entries[h[2]], entries[h[4]], entries[h[6]],
          entries[h[8]], entries[h[10]], entries[h[12]], entries[h[14]]);
      const __m256 value = _mm256_load_ps(scaled + j);
      const __m256i bits = _mm256_castps_si256(value);
      // 0xffff in negative lanes: their low halves are flipped.
      const __m256i flip = _mm256_srli_epi32(_mm256_srai_epi32(bits, 31), 16);
      const __m256i low =
          _mm256_and_si256(_mm256_xor_si256(bits, flip), low_mask);
      __m256i code = _mm256_srli_epi32(_mm256_add_epi32(entry, low), 16);
      const __m256 is_nan = _mm256_cmp_ps(value, value, _CMP_UNORD_Q);
      code = _mm256_blendv_epi8(code, zero_code, _mm256_castps_si256(is_nan));
      const __m128i words = CodeWords(code);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i + j),
                       _mm_packus_epi16(words, words));
    }
    i += piece;
  }
  for (; i < length; ++i) codes[i] = Encode(tables, values[i] * inverse);
}

// With a gather instead, 16 lanes and mask registers (one gather per 16
// values): 0.33 against 0.56 ns a value for an AVX2 gather encode on one core
// of an AVX-512 Xeon, in cache.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void EncodeBlockAvx512(const QuantTables& tables, const float* values,
                       float inverse, int64_t length, uint8_t* codes) {
  const int32_t* buckets = PackedBucketsOf(tables).entry;
  const __m512 scale = _mm512_set1_ps(inverse);
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i low_mask = _mm512_set1_epi32(0xffff);
  const __m512i key_offset =
      _mm512_set1_epi32(kLutMinExponent << kLutMantissaBits);
  const __m512i key_max = _mm512_set1_epi32(kLutSize - 1);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i lut_side = _mm512_set1_epi32(kLutSize);
  const __m512i zero_code = _mm512_set1_epi32(tables.zero_code);
  const __m512i one = _mm512_set1_epi32(1);
  int64_t i = 0;
  for (; i + 16 <= length; i += 16) {
    const __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(values + i), scale);
    const __m512i bits = _mm512_castps_si512(scaled);
    const __m512i side = _mm512_srli_epi32(bits, 31);
    const __m512i magnitude_bits = _mm512_and_si512(bits, magnitude_mask);
    __m512i key = _mm512_sub_epi32(
        _mm512_srli_epi32(magnitude_bits, 23 - kLutMantissaBits), key_offset);
    key = _mm512_min_epi32(_mm512_max_epi32(key, zero), key_max);
    const __mmask16 negative = _mm512_test_epi32_mask(side, one);
    const __m512i bucket = _mm512_mask_add_epi32(key, negative, key, lut_side);
    const __m512i entry = _mm512_i32gather_epi32(bucket, buckets, 4);
    const __mmask16 above = _mm512_cmpgt_epi32_mask(
        _mm512_and_si512(magnitude_bits, low_mask),
        _mm512_and_si512(entry, low_mask));
    // One more midpoint below the value when it is above the bucket's.
    const __m512i below = _mm512_srli_epi32(entry, 16);
    const __m512i count = _mm512_mask_add_epi32(below, above, below, one);
    // zero_code + count, or zero_code - count for negative values.
    __m512i code = _mm512_mask_sub_epi32(_mm512_add_epi32(zero_code, count),
                                         negative, zero_code, count);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(scaled, scaled, _CMP_UNORD_Q);
    code = _mm512_mask_mov_epi32(code, is_nan, zero_code);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_cvtepi32_epi8(code));
  }
  for (; i < length; ++i) codes[i] = Encode(tables, values[i] * inverse);
}

// Eight codes from one 8-byte load, their values by scalar loads,
// assembled and scaled as a vector. Zen 4, in cache: 0.24 against 0.38 ns a
// value with a gather.
void DecodeBlockAvx2(const QuantTables& tables, const uint8_t* codes,
                     float absmax, int64_t length, float* values) {
  const float* map = tables.values;
  const __m256 scale = _mm256_set1_ps(absmax);
  int64_t i = 0;
  for (; i + 8 <= length; i += 8) {
    uint64_t k;
    std::memcpy(&k, codes + i, sizeof(k));
    const __m256 decoded = _mm256_setr_ps(
        map[k & 0xff], map[(k >> 8) & 0xff], map[(k >> 16) & 0xff],
        map[(k >> 24) & 0xff], map[(k >> 32) & 0xff], map[(k >> 40) & 0xff],
        map[(k >> 48) & 0xff], map[k >> 56]);
    _mm256_storeu_ps(values + i, _mm256_mul_ps(decoded, scale));
  }
  for (; i < length; ++i) values[i] = Decode(map, codes[i], absmax);
}

void DecodeBlockGather(const QuantTables& tables, const uint8_t* codes,
                       float absmax, int64_t length, float* values) {
  const __m256 scale = _mm256_set1_ps(absmax);
  int64_t i = 0;
  for (; i + 8 <= length; i += 8) {
    const __m128i packed =
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i));
    const __m256i index = _mm256_cvtepu8_epi32(packed);
    const __m256 decoded = _mm256_i32gather_ps(tables.values, index, 4);
    _mm256_storeu_ps(values + i, _mm256_mul_ps(decoded, scale));
  }
  for (; i < length; ++i) values[i] = Decode(tables.values, codes[i], absmax);
}

// Baseline x86-64 has no unsigned 32-bit max (SSE4.1's pmaxud), so the
// scalar loop does not vectorize there: 0.45 against 0.12 ns an element.
float BlockAbsmaxAvx2(const float* values, int64_t length) {
  const __m256i magnitude_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i largest = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= length; i += 8) {
    const __m256i bits =
        _mm256_castps_si256(_mm256_loadu_ps(values + i));
    largest = _mm256_max_epu32(largest, _mm256_and_si256(bits, magnitude_mask));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), largest);
  uint32_t result = FloatBits(BlockAbsmaxScalar(values + i, length - i));
  for (uint32_t lane : lanes) result = lane > result ? lane : result;
  return BitsToFloat(result);
}

// The 4-bit codec, written once over W lanes of GCC vector extensions and
// instantiated for AVX2 (W = 8) and AVX-512 (W = 16). The sixteen entries
// of the signed map sit in registers and are read by permutes (vpermps: two
// and a blend for eight lanes, one for sixteen); the unsigned map is in
// closed form. Everything is inlined into the entry points at the end, so
// no 512-bit vector crosses a call and GCC's note that passing one would
// change the ABI does not apply (it comes at the end of the file, so the
// pragma stays on to there).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

template <int W>
struct Lanes;

template <>
struct Lanes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
  // Eight codes from bytes 8 p to 8 p + 7 of `bytes`.
  __attribute__((always_inline)) static I Widen(__m128i bytes, int p) {
    return (I)_mm256_cvtepu8_epi32(p == 0 ? bytes
                                          : _mm_unpackhi_epi64(bytes, bytes));
  }
  // Sixteen codes (0..15), in two vectors, as sixteen bytes.
  __attribute__((always_inline)) static __m128i Narrow(const I* code) {
    return _mm_packus_epi16(CodeWords((__m256i)code[0]),
                            CodeWords((__m256i)code[1]));
  }
};

template <>
struct Lanes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef uint32_t U __attribute__((vector_size(64)));
  typedef uint8_t Bytes __attribute__((vector_size(16)));
  // Not always_inline: GCC inlines it once the template that calls it sits
  // in an AVX-512 function, where vpmovzxbd zmm is allowed (generic
  // conversions widen bytes to int32 in many steps, or one at a time).
  __attribute__((target("avx512f"))) static I Widen(__m128i bytes, int) {
    return (I)_mm512_cvtepu8_epi32(bytes);
  }
  __attribute__((always_inline)) static __m128i Narrow(const I* code) {
    return (__m128i)__builtin_convertvector(code[0], Bytes);
  }
};

// Sixteen codes from eight bytes, as bytes in element order (low nibble
// first).
inline __m128i UnpackNibbles(const uint8_t* codes) {
  const __m128i packed =
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  const __m128i mask = _mm_set1_epi8(0x0f);
  return _mm_unpacklo_epi8(_mm_and_si128(packed, mask),
                           _mm_and_si128(_mm_srli_epi16(packed, 4), mask));
}

// Sixteen codes (0..15, bytes in element order) into eight bytes: each
// 16-bit pair c0 | c1 << 8 becomes c0 | c1 << 4.
inline void PackNibbles(__m128i codes, uint8_t* packed) {
  const __m128i pairs = _mm_and_si128(
      _mm_or_si128(codes, _mm_srli_epi16(codes, 4)), _mm_set1_epi16(0xff));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(packed),
                   _mm_packus_epi16(pairs, pairs));
}

// Sixteen floats of the signed 4-bit map, read by a vector of indices.
template <int W>
struct Sixteen;

template <>
struct Sixteen<8> {
  Lanes<8>::F low, high;
  explicit Sixteen(const float* entries) {
    std::memcpy(&low, entries, sizeof(low));
    std::memcpy(&high, entries + 8, sizeof(high));
  }
  __attribute__((always_inline)) Lanes<8>::F operator()(
      const Lanes<8>::I& index) const {
    return __builtin_shuffle(low, high, index);
  }
  // The same where `upper` (-1 or 0) says which half each index is in:
  // two permutes and a blend, no test of the index (0.50 against 0.58 ns
  // a value for Nearest's encode, one core of the Zen 4, in L2).
  __attribute__((always_inline)) Lanes<8>::F operator()(
      const Lanes<8>::I& index, const Lanes<8>::I& upper) const {
    return upper ? __builtin_shuffle(high, index) : __builtin_shuffle(low, index);
  }
};

template <>
struct Sixteen<16> {
  Lanes<16>::F all;
  explicit Sixteen(const float* entries) {
    std::memcpy(&all, entries, sizeof(all));
  }
  __attribute__((always_inline)) Lanes<16>::F operator()(
      const Lanes<16>::I& index) const {
    return __builtin_shuffle(all, index);
  }
  __attribute__((always_inline)) Lanes<16>::F operator()(
      const Lanes<16>::I& index, const Lanes<16>::I&) const {
    return __builtin_shuffle(all, index);
  }
};

// The signed 4-bit map as the vector code reads it. `thresholds` ascend,
// and the code Encode gives a non-NaN x is the number of them below x: the
// positive side's midpoints (below x: |x| is past them), then, below those,
// the negative side's midpoints each lowered by one ulp (x above one means
// |x| at or below the midpoint: ties go to the smaller magnitude), and
// infinity last, below no x. `gaps` are EncodeFourBitStochastic's
// values[k + 1] - values[k].
struct SignedFourBitLanes {
  alignas(64) float values[16];
  alignas(64) float thresholds[16];
  alignas(64) float gaps[16];
};

const SignedFourBitLanes& SignedFourBitLanesOf() {
  static const SignedFourBitLanes* lanes = [] {
    const QuantTables& tables = SignedFourBitTables();
    const int below_zero = tables.zero_code;  // midpoints on the negative side
    auto* out = new SignedFourBitLanes;
    for (int k = 0; k < 16; ++k) {
      out->values[k] = tables.values[k];
      out->gaps[k] = k < 15 ? tables.values[k + 1] - tables.values[k] : 0.0f;
      out->thresholds[k] =
          k < below_zero
              ? std::nextafter(-tables.midpoints[1][below_zero - 1 - k],
                               -INFINITY)
              : tables.midpoints[0][k - below_zero];
    }
    return out;
  }();
  return *lanes;
}

template <int W>
struct FourBitLanes {
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;
  using U = typename Lanes<W>::U;
  Sixteen<W> values, thresholds, gaps;
  float middle;  // thresholds[7]

  explicit FourBitLanes(const SignedFourBitLanes& map)
      : values(map.values),
        thresholds(map.thresholds),
        gaps(map.gaps),
        middle(map.thresholds[7]) {}

  // Encode on the signed map: the thresholds below x, by binary search;
  // NaN counts as zero (the zero code).
  __attribute__((always_inline)) I Nearest(const F& scaled) const {
    const F x = scaled == scaled ? scaled : F{};
    const I upper = x > middle;  // codes 8 to 15
    I code = upper & 8;
    for (int step = 4; step >= 1; step /= 2) {
      code += (thresholds(code + (step - 1), upper) < x) & step;
    }
    return code;
  }

  // EncodeFourBitStochastic, its steps in the same order.
  __attribute__((always_inline)) I Stochastic(const F& scaled,
                                              const U& random) const {
    const I nearest = Nearest(scaled);
    I low = nearest + (values(nearest) > scaled);  // a true lane is -1
    low = low < 0 ? 0 : low;
    low = low > 14 ? 14 : low;
    const F into = scaled - values(low);
    const F u = (F)((random >> 9) | 0x3f800000u) - 1.0f;
    return low + ((into > u * gaps(low)) & 1);
  }

  // EncodeLinear16: the ceiling of the clamp, which lies in [0, 15], as its
  // truncation plus one where that is below it. A NaN fails `> 0` and
  // becomes 0 as fmaxf makes it.
  __attribute__((always_inline)) static I Linear(const F& scaled) {
    F t = (scaled * 32.0f - 3.0f) * 0.5f;
    t = t > 0.0f ? t : 0.0f;
    t = t < 15.0f ? t : 15.0f;
    const I whole = __builtin_convertvector(t, I);
    return whole - (__builtin_convertvector(whole, F) < t);
  }

  // DecodeFourBit of the unsigned map: (2^23 + code) / 16 - (2^19 - 1/16).
  __attribute__((always_inline)) static F LinearValue(const I& code) {
    return (F)(code | 0x4b000000) * 0.0625f - 524287.9375f;
  }
};

// Mix32 on every lane.
template <typename U>
__attribute__((always_inline)) inline U Mix32Lanes(const U& bits) {
  U x = bits ^ (bits >> 16);
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

enum class FourBitRounding { kLinear, kNearest, kStochastic };

// Encodes whole groups of sixteen values; returns how many it did (the
// caller's scalar loop does the rest). Stochastic rounding needs the
// elements' indices to share their high 32 bits (any leaf under 2^32
// elements; else it leaves everything to the caller).
template <int W, FourBitRounding kRounding>
__attribute__((always_inline)) inline int64_t EncodeFourBitLanes(
    const float* values, float inverse, int64_t length, uint32_t key,
    uint64_t first_index, uint8_t* codes) {
  using Lane = FourBitLanes<W>;
  using U = typename Lane::U;
  if (kRounding == FourBitRounding::kStochastic && length > 0 &&
      (first_index >> 32) != ((first_index + length - 1) >> 32)) {
    return 0;
  }
  const Lane lanes(SignedFourBitLanesOf());
  // StateRoundingBits of element j: Mix32 of j's low 32 bits ^ mixed_key.
  const uint32_t mixed_key =
      key ^ (static_cast<uint32_t>(first_index >> 32) * 0x9e3779b9u);
  U lane_index;
  for (int k = 0; k < W; ++k) lane_index[k] = static_cast<uint32_t>(k);
  int64_t i = 0;
  for (; i + 16 <= length; i += 16) {
    typename Lane::I code[16 / W];
    for (int p = 0; p < 16 / W; ++p) {
      typename Lane::F value;
      std::memcpy(&value, values + i + p * W, sizeof(value));
      const typename Lane::F scaled = value * inverse;
      if constexpr (kRounding == FourBitRounding::kLinear) {
        code[p] = Lane::Linear(scaled);
      } else if constexpr (kRounding == FourBitRounding::kNearest) {
        code[p] = lanes.Nearest(scaled);
      } else {
        const uint32_t first =
            static_cast<uint32_t>(first_index + i + p * W);
        code[p] = lanes.Stochastic(
            scaled, Mix32Lanes((lane_index + first) ^ mixed_key));
      }
    }
    PackNibbles(Lanes<W>::Narrow(code), codes + i / 2);
  }
  return i;
}

template <int W>
__attribute__((always_inline)) inline void EncodeFourBitBlockLanes(
    bool is_signed, const float* values, float inverse, int64_t length,
    uint8_t* codes) {
  const int64_t done =
      is_signed
          ? EncodeFourBitLanes<W, FourBitRounding::kNearest>(
                values, inverse, length, 0, 0, codes)
          : EncodeFourBitLanes<W, FourBitRounding::kLinear>(
                values, inverse, length, 0, 0, codes);
  kFourBitScalar.encode(is_signed, values + done, inverse, length - done,
                        codes + done / 2);
}

template <int W>
__attribute__((always_inline)) inline void EncodeFourBitBlockStochasticLanes(
    const float* values, float inverse, int64_t length, uint32_t key,
    uint64_t first_index, uint8_t* codes) {
  const int64_t done = EncodeFourBitLanes<W, FourBitRounding::kStochastic>(
      values, inverse, length, key, first_index, codes);
  kFourBitScalar.encode_stochastic(values + done, inverse, length - done, key,
                                   first_index + static_cast<uint64_t>(done),
                                   codes + done / 2);
}

// GCC's loop unswitching makes two loops of this one, by `is_signed`.
template <int W>
__attribute__((always_inline)) inline void DecodeFourBitBlockLanes(
    bool is_signed, const uint8_t* codes, float absmax, int64_t length,
    float* values) {
  using Lane = FourBitLanes<W>;
  const Sixteen<W> map(SignedFourBitLanesOf().values);
  int64_t i = 0;
  for (; i + 16 <= length; i += 16) {
    const __m128i bytes = UnpackNibbles(codes + i / 2);
    for (int p = 0; p < 16 / W; ++p) {
      const typename Lane::I code = Lanes<W>::Widen(bytes, p);
      const typename Lane::F value =
          (is_signed ? map(code) : Lane::LinearValue(code)) * absmax;
      std::memcpy(values + i + p * W, &value, sizeof(value));
    }
  }
  kFourBitScalar.decode(is_signed, codes + i / 2, absmax, length - i,
                        values + i);
}

void EncodeFourBitBlockAvx2(bool is_signed, const float* values,
                            float inverse, int64_t length, uint8_t* codes) {
  EncodeFourBitBlockLanes<8>(is_signed, values, inverse, length, codes);
}

void EncodeFourBitBlockStochasticAvx2(const float* values, float inverse,
                                      int64_t length, uint32_t key,
                                      uint64_t first_index, uint8_t* codes) {
  EncodeFourBitBlockStochasticLanes<8>(values, inverse, length, key,
                                       first_index, codes);
}

void DecodeFourBitBlockAvx2(bool is_signed, const uint8_t* codes,
                            float absmax, int64_t length, float* values) {
  DecodeFourBitBlockLanes<8>(is_signed, codes, absmax, length, values);
}

#define OPTAX_PAGED_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

OPTAX_PAGED_AVX512 void EncodeFourBitBlockAvx512(bool is_signed,
                                                 const float* values,
                                                 float inverse, int64_t length,
                                                 uint8_t* codes) {
  EncodeFourBitBlockLanes<16>(is_signed, values, inverse, length, codes);
}

OPTAX_PAGED_AVX512 void EncodeFourBitBlockStochasticAvx512(
    const float* values, float inverse, int64_t length, uint32_t key,
    uint64_t first_index, uint8_t* codes) {
  EncodeFourBitBlockStochasticLanes<16>(values, inverse, length, key,
                                        first_index, codes);
}

OPTAX_PAGED_AVX512 void DecodeFourBitBlockAvx512(bool is_signed,
                                                 const uint8_t* codes,
                                                 float absmax, int64_t length,
                                                 float* values) {
  DecodeFourBitBlockLanes<16>(is_signed, codes, absmax, length, values);
}

}  // namespace

#undef OPTAX_PAGED_AVX512

const FourBitCodec kFourBitAvx2 = {EncodeFourBitBlockAvx2,
                                   EncodeFourBitBlockStochasticAvx2,
                                   DecodeFourBitBlockAvx2};
const FourBitCodec kFourBitAvx512 = {EncodeFourBitBlockAvx512,
                                     EncodeFourBitBlockStochasticAvx512,
                                     DecodeFourBitBlockAvx512};

#else  // Not x86-64 with AVX2: HasAvx2() is false and these are never called.

void EncodeBlockAvx2(const QuantTables& tables, const float* values,
                     float inverse, int64_t length, uint8_t* codes) {
  for (int64_t i = 0; i < length; ++i) codes[i] = Encode(tables, values[i] * inverse);
}

void DecodeBlockAvx2(const QuantTables& tables, const uint8_t* codes,
                     float absmax, int64_t length, float* values) {
  for (int64_t i = 0; i < length; ++i) values[i] = Decode(tables.values, codes[i], absmax);
}

void DecodeBlockGather(const QuantTables& tables, const uint8_t* codes,
                       float absmax, int64_t length, float* values) {
  DecodeBlockAvx2(tables, codes, absmax, length, values);
}

void EncodeBlockAvx512(const QuantTables& tables, const float* values,
                       float inverse, int64_t length, uint8_t* codes) {
  for (int64_t i = 0; i < length; ++i) codes[i] = Encode(tables, values[i] * inverse);
}

float BlockAbsmaxAvx2(const float* values, int64_t length) {
  return BlockAbsmaxScalar(values, length);
}

const FourBitCodec kFourBitAvx2 = kFourBitScalar;
const FourBitCodec kFourBitAvx512 = kFourBitScalar;

#endif

}  // namespace optax_paged
