// Parameter and gradient element types and their fp32 conversions, for host
// and device code. Conversions round to nearest even, as XLA's do.
#ifndef OPTAX_PAGED_FFI_ELEMENT_TYPES_H_
#define OPTAX_PAGED_FFI_ELEMENT_TYPES_H_

#include <cstdint>
#include <type_traits>

#include "quantization.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace optax_paged {

struct BFloat16 {
  uint16_t bits;
};

struct Half {
  uint16_t bits;
};

// a + b rounded once, never fused with a product feeding it: the fused
// step must round the update before adding it, as update + apply_updates do.
OPTAX_PAGED_HD float AddRounded(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;  // host code is compiled with -ffp-contract=off
#endif
}

OPTAX_PAGED_HD float ToFloat(float x) { return x; }

OPTAX_PAGED_HD float ToFloat(BFloat16 x) {
  return BitsToFloat(static_cast<uint32_t>(x.bits) << 16);
}

OPTAX_PAGED_HD float ToFloat(Half x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) {
    return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));
  }
  return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

template <typename T>
OPTAX_PAGED_HD T FromFloat(float x);

template <>
OPTAX_PAGED_HD float FromFloat<float>(float x) {
  return x;
}

template <>
OPTAX_PAGED_HD BFloat16 FromFloat<BFloat16>(float x) {
  const uint32_t bits = FloatBits(x);
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
#if defined(__CUDA_ARCH__)
  // One conversion instruction where the rounding below takes seven; the
  // same result for every non-NaN (the hardware's NaN would be canonical,
  // not the quieted input, hence the select).
  const uint32_t rounded = __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
  // A select rather than an early return: loops of conversions vectorize.
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
#endif
  return BFloat16{static_cast<uint16_t>(x != x ? quiet_nan : rounded)};
}

template <>
OPTAX_PAGED_HD Half FromFloat<Half>(float x) {
#if defined(__CUDA_ARCH__)
  return Half{__half_as_ushort(__float2half_rn(x))};
#else
  uint32_t bits = FloatBits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  bits &= 0x7fffffffu;
  uint32_t result;
  if (bits >= 0x47800000u) {
    // 65536 and up, infinities and NaNs; values in [65520, 65536) round to
    // infinity below through the carry into the exponent.
    result = bits > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (bits < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5 lines the float's
    // mantissa up with half's 2^-24 steps and rounds to nearest even.
    const float shifted = BitsToFloat(bits) + 0.5f;
    result = FloatBits(shifted) - FloatBits(0.5f);
  } else {
    const uint32_t odd = (bits >> 13) & 1u;
    bits += 0xc8000fffu + odd;  // rebias the exponent, round to nearest even
    result = bits >> 13;
  }
  return Half{static_cast<uint16_t>(result | sign)};
#endif
}

// What an update call writes for each element.
enum OutputMode : int {
  kOutputUpdates = 0,           // the update, as tx.update returns it
  kOutputParams = 1,            // p + update, as optax.apply_updates
  kOutputParamsStochastic = 2,  // p + update with stochastic rounding (bf16)
};

// 32 random bits for element `index` of leaf `leaf` at step `seed`: the
// splitmix64 finaliser of a counter, so every element and step differ and
// the CPU and GPU draw the same bits.
OPTAX_PAGED_HD uint32_t RandomBits(uint32_t seed, uint32_t leaf,
                                   uint64_t index) {
  uint64_t z = index + (static_cast<uint64_t>(leaf) << 40) +
               0x9e3779b97f4a7c15ull * (static_cast<uint64_t>(seed) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}

// x rounded to T up or down with probabilities that make the result equal
// x on average. Only bf16 is rounded stochastically (OutputValue gives the
// other types update + apply's rounding).
template <typename T>
OPTAX_PAGED_HD T StochasticRound(float x, uint32_t random) {
  (void)random;
  return FromFloat<T>(x);
}

template <>
OPTAX_PAGED_HD BFloat16 StochasticRound<BFloat16>(float x, uint32_t random) {
  const uint32_t bits = FloatBits(x);
  if ((bits & 0x7f800000u) == 0x7f800000u) return FromFloat<BFloat16>(x);
  // Adding 16 random bits below bf16's last bit and truncating carries into
  // that bit with probability equal to the dropped fraction. Near the
  // largest finite value the carry may reach infinity, as rounding up would.
  return BFloat16{static_cast<uint16_t>((bits + (random & 0xffffu)) >> 16)};
}

template <typename T, int kMode>
OPTAX_PAGED_HD T OutputValue(float param, float update, uint32_t random) {
  if constexpr (kMode == kOutputUpdates) {
    return FromFloat<T>(update);
  } else if constexpr (kMode == kOutputParamsStochastic &&
                       std::is_same_v<T, BFloat16>) {
    return StochasticRound<T>(param + update, random);
  } else {
    // float32 and float16 under the stochastic mode too: the fused step
    // promises them update + apply_updates' bits (one rounding of p + u
    // would differ from its two in float16's last bit).
    return FromFloat<T>(AddRounded(param, ToFloat(FromFloat<T>(update))));
  }
}

template <typename T>
OPTAX_PAGED_HD T OutputValue(int mode, float param, float update,
                             uint32_t random) {
  if (mode == kOutputUpdates) {
    return OutputValue<T, kOutputUpdates>(param, update, random);
  }
  if (mode == kOutputParamsStochastic) {
    return OutputValue<T, kOutputParamsStochastic>(param, update, random);
  }
  return OutputValue<T, kOutputParams>(param, update, random);
}

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_ELEMENT_TYPES_H_
