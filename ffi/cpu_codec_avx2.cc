// AVX2 block encode/decode, and the gather versions used where gathers are
// fast (cpu_codec.cc chooses). This file alone is compiled with -mavx2; its
// functions run only after HasAvx2() (and HasAvx512()) said yes. No FMA:
// every product and sum rounds exactly as the scalar code's.
#include <immintrin.h>

#include <algorithm>
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
      // Narrow eight int32 codes (0..255) to bytes.
      const __m128i words = _mm_packus_epi32(
          _mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
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

#endif

}  // namespace optax_paged
