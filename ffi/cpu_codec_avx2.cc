// AVX2 block encode/decode. This file alone is compiled with -mavx2; its
// functions run only after HasAvx2() said yes. No FMA: every product and sum
// rounds exactly as the scalar code's.
#include <immintrin.h>

#include <cstdint>

#include "cpu_codec.h"

namespace optax_paged {

#if defined(__AVX2__)

namespace {

// The bucket table widened to int32 for vpgatherdd, both sides back to back.
struct WideBuckets {
  int32_t start[2 * kLutSize];
};

const WideBuckets& WideBucketsOf(const QuantTables& tables) {
  static const WideBuckets* signed_buckets = nullptr;
  static const WideBuckets* unsigned_buckets = nullptr;
  static const bool built = [] {
    for (int which = 0; which < 2; ++which) {
      const QuantTables& source = which == 0 ? SignedTables() : UnsignedTables();
      auto* wide = new WideBuckets;
      for (int side = 0; side < 2; ++side) {
        for (int key = 0; key < kLutSize; ++key) {
          wide->start[side * kLutSize + key] = source.bucket_start[side][key];
        }
      }
      (which == 0 ? signed_buckets : unsigned_buckets) = wide;
    }
    return true;
  }();
  (void)built;
  return &tables == &SignedTables() ? *signed_buckets : *unsigned_buckets;
}

}  // namespace

void EncodeBlockAvx2(const QuantTables& tables, const float* values,
                     float inverse, int64_t length, uint8_t* codes) {
  const int32_t* buckets = WideBucketsOf(tables).start;
  const float* midpoints = &tables.midpoints[0][0];
  const __m256 scale = _mm256_set1_ps(inverse);
  const __m256i magnitude_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i key_offset = _mm256_set1_epi32(kLutMinExponent << kLutMantissaBits);
  const __m256i key_max = _mm256_set1_epi32(kLutSize - 1);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i lut_side = _mm256_set1_epi32(kLutSize);
  const __m256i zero_code = _mm256_set1_epi32(tables.zero_code);
  int64_t i = 0;
  for (; i + 8 <= length; i += 8) {
    const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(values + i), scale);
    const __m256i bits = _mm256_castps_si256(scaled);
    const __m256i side = _mm256_srli_epi32(bits, 31);
    const __m256i magnitude_bits = _mm256_and_si256(bits, magnitude_mask);
    __m256i key = _mm256_sub_epi32(
        _mm256_srli_epi32(magnitude_bits, 23 - kLutMantissaBits), key_offset);
    key = _mm256_min_epi32(_mm256_max_epi32(key, zero), key_max);
    const __m256i bucket = _mm256_add_epi32(key, _mm256_mullo_epi32(side, lut_side));
    __m256i count = _mm256_i32gather_epi32(buckets, bucket, 4);
    const __m256i midpoint_index =
        _mm256_add_epi32(count, _mm256_slli_epi32(side, 8));
    const __m256 midpoint = _mm256_i32gather_ps(midpoints, midpoint_index, 4);
    const __m256 above = _mm256_cmp_ps(_mm256_castsi256_ps(magnitude_bits),
                                       midpoint, _CMP_GT_OQ);
    count = _mm256_sub_epi32(count, _mm256_castps_si256(above));
    const __m256i negate = _mm256_sub_epi32(zero, side);
    __m256i code = _mm256_add_epi32(
        zero_code, _mm256_sub_epi32(_mm256_xor_si256(count, negate), negate));
    const __m256 is_nan = _mm256_cmp_ps(scaled, scaled, _CMP_UNORD_Q);
    code = _mm256_blendv_epi8(code, zero_code, _mm256_castps_si256(is_nan));
    // Narrow eight int32 codes (0..255) to bytes.
    const __m128i low = _mm256_castsi256_si128(code);
    const __m128i high = _mm256_extracti128_si256(code, 1);
    const __m128i words = _mm_packus_epi32(low, high);
    const __m128i bytes = _mm_packus_epi16(words, words);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), bytes);
  }
  for (; i < length; ++i) codes[i] = Encode(tables, values[i] * inverse);
}

void DecodeBlockAvx2(const QuantTables& tables, const uint8_t* codes,
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

#else  // Not x86-64 with AVX2: HasAvx2() is false and these are never called.

void EncodeBlockAvx2(const QuantTables& tables, const float* values,
                     float inverse, int64_t length, uint8_t* codes) {
  for (int64_t i = 0; i < length; ++i) codes[i] = Encode(tables, values[i] * inverse);
}

void DecodeBlockAvx2(const QuantTables& tables, const uint8_t* codes,
                     float absmax, int64_t length, float* values) {
  for (int64_t i = 0; i < length; ++i) values[i] = Decode(tables.values, codes[i], absmax);
}

#endif

}  // namespace optax_paged
