// Block encode/decode for the CPU path, with AVX2 and AVX-512 versions
// chosen at run time by what the processor has (the scalar loops do not
// vectorize: they look values up in tables). All give exactly the codes and
// values of Encode and Decode.
#ifndef OPTAX_PAGED_FFI_CPU_CODEC_H_
#define OPTAX_PAGED_FFI_CPU_CODEC_H_

#include <cstdint>

#include "quantization.h"

namespace optax_paged {

// Codes of `values[i] * inverse` for i < length.
void EncodeBlock(const QuantTables& tables, const float* values, float inverse,
                 int64_t length, uint8_t* codes);

// `tables.values[codes[i]] * absmax` for i < length.
void DecodeBlock(const QuantTables& tables, const uint8_t* codes, float absmax,
                 int64_t length, float* values);

// The largest magnitude of `values[i]` for i < length, NaN if one is NaN
// (the largest bit pattern without the sign: non-negative floats order as
// their bits do, and NaN patterns sit above infinity).
float BlockAbsmax(const float* values, int64_t length);
// The same by the scalar loop, whatever the processor.
float BlockAbsmaxScalar(const float* values, int64_t length);

// The same with AVX2 and no gathers (table entries by scalar loads); only
// call when HasAvx2() is true.
void EncodeBlockAvx2(const QuantTables& tables, const float* values,
                     float inverse, int64_t length, uint8_t* codes);
void DecodeBlockAvx2(const QuantTables& tables, const uint8_t* codes,
                     float absmax, int64_t length, float* values);
float BlockAbsmaxAvx2(const float* values, int64_t length);

// The same with vector gathers, used where gathers are fast
// (UseGathers()): DecodeBlockGather needs HasAvx2(), EncodeBlockAvx512
// HasAvx512().
void DecodeBlockGather(const QuantTables& tables, const uint8_t* codes,
                       float absmax, int64_t length, float* values);
void EncodeBlockAvx512(const QuantTables& tables, const float* values,
                       float inverse, int64_t length, uint8_t* codes);

// The 4-bit block codec: element i's code in the low nibble of byte i / 2
// for even i, the high nibble for odd i; an odd length leaves the last high
// nibble zero. `encode` gives the codes of `values[i] * inverse`
// (EncodeFourBit), `encode_stochastic` signed codes rounded stochastically
// (EncodeFourBitStochastic) with the leaf's StateRoundingKey, `first_index`
// being values[0]'s index in the leaf, and `decode` DecodeFourBit's values.
// One per instruction set; all give the same bits.
struct FourBitCodec {
  void (*encode)(bool is_signed, const float* values, float inverse,
                 int64_t length, uint8_t* codes);
  void (*encode_stochastic)(const float* values, float inverse,
                            int64_t length, uint32_t key,
                            uint64_t first_index, uint8_t* codes);
  void (*decode)(bool is_signed, const uint8_t* codes, float absmax,
                 int64_t length, float* values);
};

// The scalar loops, for any processor.
extern const FourBitCodec kFourBitScalar;
// Vector codecs without gathers or tables in memory (register permutes and
// the unsigned map in closed form): kFourBitAvx2 needs HasAvx2(),
// kFourBitAvx512 HasAvx512().
extern const FourBitCodec kFourBitAvx2;
extern const FourBitCodec kFourBitAvx512;
// The widest of these that the processor has (capped as HasAvx2 says).
const FourBitCodec& CpuFourBitCodec();

// What the CPU path may use: the processor's instruction sets, capped by
// OPTAX_PAGED_CPU_ISA ("avx2" or "sse2") so that tests and benchmarks run the
// paths of other CPUs; every path gives the same bits.
bool HasAvx2();
// AVX-512 F, BW and VL.
bool HasAvx512();
// Whether the codec uses gathers: on Intel processors with AVX-512, where
// they were measured faster than scalar loads. AMD implements them in
// microcode, and processors with AVX2 alone take the path without them.
bool UseGathers();

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_CPU_CODEC_H_
