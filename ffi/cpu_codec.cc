#include "cpu_codec.h"

#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace optax_paged {

void EncodeBlock(const QuantTables& tables, const float* values, float inverse,
                 int64_t length, uint8_t* codes) {
  if (UseGathers()) {
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
  if (UseGathers()) {
    DecodeBlockGather(tables, codes, absmax, length, values);
    return;
  }
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

void EncodeFourBitBlockScalar(bool is_signed, const float* values,
                              float inverse, int64_t length, uint8_t* codes) {
  const QuantTables& tables = SignedFourBitTables();
  PackFourBit(length, codes, [&](int64_t i) {
    return EncodeFourBit(tables, is_signed, values[i] * inverse);
  });
}

void EncodeFourBitBlockStochasticScalar(const float* values, float inverse,
                                        int64_t length, uint32_t key,
                                        uint64_t first_index, uint8_t* codes) {
  const QuantTables& tables = SignedFourBitTables();
  PackFourBit(length, codes, [&](int64_t i) {
    return EncodeFourBitStochastic(
        tables, values[i] * inverse,
        StateRoundingBits(key, first_index + static_cast<uint64_t>(i)));
  });
}

void DecodeFourBitBlockScalar(bool is_signed, const uint8_t* codes,
                              float absmax, int64_t length, float* values) {
  const QuantTables& tables = SignedFourBitTables();
  for (int64_t i = 0; i < length; ++i) {
    const uint8_t code = (codes[i / 2] >> (4 * (i & 1))) & 0xfu;
    values[i] = DecodeFourBit(tables, is_signed, code, absmax);
  }
}

}  // namespace

const FourBitCodec kFourBitScalar = {EncodeFourBitBlockScalar,
                                     EncodeFourBitBlockStochasticScalar,
                                     DecodeFourBitBlockScalar};

const FourBitCodec& CpuFourBitCodec() {
  static const FourBitCodec& codec = HasAvx512() ? kFourBitAvx512
                                     : HasAvx2() ? kFourBitAvx2
                                                 : kFourBitScalar;
  return codec;
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

namespace {

// The widest instruction set the CPU path may use, from OPTAX_PAGED_CPU_ISA:
// "avx2" runs this processor as one without AVX-512, "sse2" as one without
// AVX2 (x86-64's baseline); unset, the processor's own. Tests and benchmarks
// use it to run, on any x86 CPU, the paths other CPUs take; the results are
// bit-identical whichever path runs.
enum class IsaCap { kSse2, kAvx2, kAvx512 };

IsaCap IsaCapFromEnvironment() {
  static const IsaCap cap = [] {
    const char* text = std::getenv("OPTAX_PAGED_CPU_ISA");
    if (text == nullptr || *text == '\0') return IsaCap::kAvx512;
    const std::string_view value(text);
    if (value == "sse2") return IsaCap::kSse2;
    if (value == "avx2") return IsaCap::kAvx2;
    if (value != "avx512") {
      std::fprintf(stderr,
                   "optax_paged: OPTAX_PAGED_CPU_ISA=%s is not sse2, avx2 or "
                   "avx512; ignored\n",
                   text);
    }
    return IsaCap::kAvx512;
  }();
  return cap;
}

}  // namespace

bool HasAvx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") &&
                               IsaCapFromEnvironment() >= IsaCap::kAvx2;
  return has_avx2;
#else
  return false;
#endif
}

bool HasAvx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") &&
                                 IsaCapFromEnvironment() >= IsaCap::kAvx512;
  return has_avx512;
#else
  return false;
#endif
}

bool UseGathers() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool use_gathers = HasAvx512() && __builtin_cpu_is("intel");
  return use_gathers;
#else
  return false;
#endif
}

}  // namespace optax_paged
