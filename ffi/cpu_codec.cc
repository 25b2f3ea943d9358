#include "cpu_codec.h"

namespace optax_paged {

void EncodeBlock(const QuantTables& tables, const float* values, float inverse,
                 int64_t length, uint8_t* codes) {
  if (HasAvx512()) {
    EncodeBlockAvx512(tables, values, inverse, length, codes);
    return;
  }
  if (HasAvx2()) {
    EncodeBlockAvx2(tables, values, inverse, length, codes);
    return;
  }
  for (int64_t i = 0; i < length; ++i) {
    codes[i] = Encode(tables, values[i] * inverse);
  }
}

void DecodeBlock(const QuantTables& tables, const uint8_t* codes, float absmax,
                 int64_t length, float* values) {
  if (HasAvx2()) {
    DecodeBlockAvx2(tables, codes, absmax, length, values);
    return;
  }
  for (int64_t i = 0; i < length; ++i) {
    values[i] = Decode(tables.values, codes[i], absmax);
  }
}

namespace {

// Packs code_of(i) for i < length two a byte, low nibble first.
template <typename CodeOf>
void PackFourBit(int64_t length, uint8_t* codes, CodeOf code_of) {
  for (int64_t i = 0; i < length; i += 2) {
    const uint8_t low = code_of(i);
    const uint8_t high = i + 1 < length ? code_of(i + 1) : 0;
    codes[i / 2] = static_cast<uint8_t>(low | (high << 4));
  }
}

}  // namespace

void EncodeFourBitBlock(bool is_signed, const float* values, float inverse,
                        int64_t length, uint8_t* codes) {
  const QuantTables& tables = SignedFourBitTables();
  PackFourBit(length, codes, [&](int64_t i) {
    return EncodeFourBit(tables, is_signed, values[i] * inverse);
  });
}

void EncodeFourBitBlockStochastic(const float* values, float inverse,
                                  int64_t length, uint32_t key,
                                  uint64_t first_index, uint8_t* codes) {
  const QuantTables& tables = SignedFourBitTables();
  PackFourBit(length, codes, [&](int64_t i) {
    return EncodeFourBitStochastic(
        tables, values[i] * inverse,
        StateRoundingBits(key, first_index + static_cast<uint64_t>(i)));
  });
}

void DecodeFourBitBlock(bool is_signed, const uint8_t* codes, float absmax,
                        int64_t length, float* values) {
  const QuantTables& tables = SignedFourBitTables();
  for (int64_t i = 0; i < length; ++i) {
    const uint8_t code = (codes[i / 2] >> (4 * (i & 1))) & 0xfu;
    values[i] = DecodeFourBit(tables, is_signed, code, absmax);
  }
}

float BlockAbsmax(const float* values, int64_t length) {
  return HasAvx2() ? BlockAbsmaxAvx2(values, length)
                   : BlockAbsmaxScalar(values, length);
}

float BlockAbsmaxScalar(const float* values, int64_t length) {
  uint32_t largest = 0;
  for (int64_t i = 0; i < length; ++i) {
    const uint32_t magnitude = FloatBits(values[i]) & 0x7fffffffu;
    largest = magnitude > largest ? magnitude : largest;
  }
  return BitsToFloat(largest);
}

bool HasAvx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  return has_avx2;
#else
  return false;
#endif
}

bool HasAvx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl");
  return has_avx512;
#else
  return false;
#endif
}

}  // namespace optax_paged
