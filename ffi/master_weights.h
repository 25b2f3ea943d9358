// Master-weight correction: a 16-bit parameter and a signed 8- or 16-bit
// correction stand for a float32 master weight.
//
// The correction q is the master's offset from the parameter p in units of
// 2^-bits of the gap from p to its neighbour on the master's side:
//   master = p + q * gap(p, side of q) / 2^bits,  q in [-2^(bits-1), 2^(bits-1)).
// After a step the parameter is the master rounded to nearest with ties
// toward +infinity, so |master - p| <= gap / 2 and q = -2^(bits-1) only at a
// tie: every offset fits. (Ties toward +infinity rather than to even, since
// a tie rounded down would need q = +2^(bits-1).)
//
// bf16 with 16 bits: the unit gap / 2^16 is float32's ulp at the master (bf16
// has float32's exponent range, subnormals included; below a power of two
// the downward gap is half the upward one, as is the ulp), so every float32
// master whose bf16 rounding is finite is kept exactly. fp16 with 16 bits:
// exact while the parameter is a normal fp16 number. With 8 bits the master
// has 8 more significant bits than the parameter (bf16: 16 of float32's 24),
// the offset rounded to nearest even.
//
// The parameters the correction belongs to are fingerprinted per block of
// kMasterBlockSize: a block whose parameters changed outside the optimizer
// (new weights loaded, a tie, an update scaled after the optimizer) drops
// its correction, so that its master restarts from those parameters, and
// is counted in the leaf's reset counter.
#ifndef OPTAX_PAGED_FFI_MASTER_WEIGHTS_H_
#define OPTAX_PAGED_FFI_MASTER_WEIGHTS_H_

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "element_types.h"
#include "quantization.h"

// Inlined on the host too: the CPU kernel's loops over these vectorize only
// when no call is left in them.
#if defined(__CUDACC__)
#define OPTAX_PAGED_MASTER OPTAX_PAGED_HD
#else
#define OPTAX_PAGED_MASTER inline __attribute__((always_inline))
#endif

namespace optax_paged {

// Parameters per fingerprint: a half-warp's eight elements a lane on the GPU.
inline constexpr int kMasterBlockSize = 128;

OPTAX_PAGED_MASTER uint16_t Bits16(BFloat16 x) { return x.bits; }
OPTAX_PAGED_MASTER uint16_t Bits16(Half x) { return x.bits; }

template <typename T>
OPTAX_PAGED_MASTER T FromBits16(uint32_t bits) {
  return T{static_cast<uint16_t>(bits)};
}

OPTAX_PAGED_MASTER bool IsFinite16(BFloat16 x) {
  return (x.bits & 0x7f80u) != 0x7f80u;
}
OPTAX_PAGED_MASTER bool IsFinite16(Half x) {
  return (x.bits & 0x7c00u) != 0x7c00u;
}

// The next value toward +infinity (up) or -infinity (down): bit patterns are
// sign and magnitude, so a step in magnitude is a step of the pattern.
// Branch-free (selects, no early returns) here and below, so that the CPU
// compiler vectorizes the element loops and GPU lanes do not diverge.
template <typename T>
OPTAX_PAGED_MASTER T Neighbour(T x, bool up) {
  const uint32_t bits = Bits16(x);
  const bool negative = (bits & 0x8000u) != 0;
  const uint32_t stepped = negative == up ? bits - 1u : bits + 1u;
  const uint32_t from_zero = up ? 0x0001u : 0x8001u;
  return FromBits16<T>((bits & 0x7fffu) == 0 ? from_zero : stepped);
}

// |neighbour - x| on that side: a power of two, exact in float32 (infinity
// past the largest finite value).
template <typename T>
OPTAX_PAGED_MASTER float GapToward(T x, bool up) {
  // One subtraction and a select of its sign: a float operation in each
  // arm of a select is not if-converted (it might trap), a negation is.
  const float difference = ToFloat(Neighbour(x, up)) - ToFloat(x);
  return up ? difference : -difference;
}

// x rounded to nearest, ties toward +infinity: round to nearest even, then
// the tie moved up (any 16-bit type).
template <typename T>
OPTAX_PAGED_MASTER T RoundTiesUpByNeighbour(float x) {
  const T rounded = FromFloat<T>(x);
  // Exact: x is within half a gap of its rounding. (Past the finite range
  // `below` is -inf or NaN: no tie.)
  const float below = x - ToFloat(rounded);
  // & and |, not && and ||: no short circuit, no control flow.
  const bool tie = IsFinite16(rounded) & (below > 0.0f) &
                   (below == 0.5f * GapToward(rounded, true));
  return tie ? Neighbour(rounded, true) : rounded;
}

// x rounded to nearest, ties toward +infinity. bf16 is float32's top half,
// so on its bits: adding half the dropped range (0x8000) and truncating
// rounds a tie up in magnitude, which is toward +infinity for a positive x;
// adding 0x7fff rounds a negative x's tie down in magnitude, toward
// +infinity too. Five instructions where RoundTiesUpByNeighbour's
// conversions, gap and neighbours take about thirty on the GPU; the same
// bits for every float32 (tests/master_weights_header_test.py), the tie just
// below -max included (-infinity there, as RNE rounds it and no finite tie
// is seen), and NaN quietened as FromFloat does.
template <typename T>
OPTAX_PAGED_MASTER T RoundTiesUp(float x) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    const uint32_t bits = FloatBits(x);
    const uint32_t rounded = (bits + 0x8000u - (bits >> 31)) >> 16;
    const uint32_t result = bits == 0xff7f8000u ? 0xff80u : rounded;
    return x != x ? FromFloat<BFloat16>(x)
                  : BFloat16{static_cast<uint16_t>(result)};
  } else {
    return RoundTiesUpByNeighbour<T>(x);
  }
}

// x / gap for a finite gap (a power of two: 2^-133 to 2^120 for bf16,
// float16's within), rounded as that division, by a product with the gap's
// reciprocal: the division is an IEEE one on the GPU (-prec-div), a dozen
// instructions and a slow path, and it showed in the master kernel's
// profile. A normal power of two 2^(E-127) has the reciprocal 2^(127-E),
// whose exponent field is 254 - E. Gaps below 2^-126 are float32 subnormals
// whose reciprocals overflow: x and the gap are first scaled by 2^64, which
// is exact (an overflow of x is a quotient far past any correction's limit,
// where the division's result clamps the same way). The product then rounds
// the exact quotient once, as the division does.
OPTAX_PAGED_MASTER float DivideByGap(float x, float gap) {
  const bool tiny = gap < 0x1p-60f;
  const float scale = tiny ? 0x1p64f : 1.0f;
  const float reciprocal = BitsToFloat(0x7f000000u - FloatBits(gap * scale));
  return (x * scale) * reciprocal;
}

template <int kBits>
OPTAX_PAGED_MASTER float CorrectionUnits() {
  return kBits == 16 ? 65536.0f : 256.0f;
}

// float32 bits as a signed count of representable values from zero: +0
// and -0 are 0, and each next float toward +infinity is one more (bits are
// sign and magnitude, and within a sign consecutive floats are consecutive
// patterns, across binades and subnormals too). Infinities are one past the
// largest finite values; NaNs lie beyond and are never used as counts.
OPTAX_PAGED_MASTER int32_t OrderedBits(uint32_t bits) {
  const int32_t magnitude = static_cast<int32_t>(bits & 0x7fffffffu);
  return (bits >> 31) != 0 ? -magnitude : magnitude;
}

OPTAX_PAGED_MASTER uint32_t BitsFromOrdered(int32_t ordered) {
  return ordered < 0 ? 0x80000000u | static_cast<uint32_t>(-ordered)
                     : static_cast<uint32_t>(ordered);
}

// Whether a correction of this sign points from `param` past the largest
// finite value, where the gap is infinite.
OPTAX_PAGED_MASTER bool OutwardAtMax(BFloat16 param, bool up) {
  const bool negative = (param.bits & 0x8000u) != 0;
  return (param.bits & 0x7fffu) == 0x7f7fu && up != negative;
}

// The correction of `master` against `param` (0 where either is not finite
// or the gap is infinite: the correction cannot reach past the largest
// finite parameter), by the gap: any 16-bit type.
template <int kBits, typename T>
OPTAX_PAGED_MASTER int32_t EncodeCorrectionByGap(float master, T param) {
  constexpr float kLimit = kBits == 16 ? 32767.0f : 127.0f;
  const float offset = master - ToFloat(param);
  const float gap = GapToward(param, offset > 0.0f);
  // Divided first: offset * 2^16 overflowed for parameters past 2^111.
  const float units = DivideByGap(offset, gap) * CorrectionUnits<kBits>();
  const bool usable = IsFinite16(param) & (units == units) & (gap < INFINITY);
  // Comparisons, not fminf/fmaxf (library calls on the host); a NaN or
  // unusable value becomes 0 before the conversion, which is then defined.
  const float low = units < -kLimit - 1.0f ? -kLimit - 1.0f : units;
  const float clamped = low > kLimit ? kLimit : low;
  return static_cast<int32_t>(rintf(usable ? clamped : 0.0f));
}

// The same correction, for bf16 on the bits. bf16 is float32's top half, so
// a unit of a 16-bit correction (gap / 2^16) is one float32 step at the
// master, and master - param counted in float32 steps (OrderedBits' counts)
// is the 16-bit correction; an 8-bit one is that count / 256 rounded to
// nearest even. Integer instructions where the division by the gap and the
// float-to-integer conversions issued at a quarter of the rate; the same
// value for every master and parameter (tests/master_weights_header_test.py).
// Past one gap from the parameter both clamp: the count is limited to
// +-2^16 first so that no difference overflows.
template <int kBits>
OPTAX_PAGED_MASTER int32_t EncodeCorrectionOnBits(float master,
                                                  BFloat16 param) {
  constexpr int32_t kLimit = kBits == 16 ? 32767 : 127;
  constexpr int32_t kReach = 1 << 16;
  const int32_t from = OrderedBits(static_cast<uint32_t>(param.bits) << 16);
  const int32_t to = OrderedBits(FloatBits(master));
  const int32_t reached =
      to < from - kReach ? from - kReach : (to > from + kReach ? from + kReach : to);
  const int32_t steps = reached - from;
  int32_t units = steps;
  if constexpr (kBits == 8) {
    // Round to nearest even: add just under half, plus one where the
    // quotient's last bit is odd (arithmetic shifts floor negative counts).
    units = (steps + 127 + ((steps >> 8) & 1)) >> 8;
  }
  const int32_t low = units < -kLimit - 1 ? -kLimit - 1 : units;
  const int32_t clamped = low > kLimit ? kLimit : low;
  const bool usable = IsFinite16(param) & (master == master) &
                      !OutwardAtMax(param, steps > 0);
  return usable ? clamped : 0;
}

template <int kBits, typename T>
OPTAX_PAGED_MASTER int32_t EncodeCorrection(float master, T param) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return EncodeCorrectionOnBits<kBits>(master, param);
  } else {
    return EncodeCorrectionByGap<kBits>(master, param);
  }
}

template <int kBits, typename T>
OPTAX_PAGED_MASTER float DecodeMasterByGap(T param, int32_t correction) {
  const float p = ToFloat(param);
  const float gap = GapToward(param, correction > 0);
  // The unit first (exact: gap / 2^16 is at least 2^-149), so that no
  // product overflows (q * gap did for parameters past 2^111).
  const float master = AddRounded(
      p, static_cast<float>(correction) * (gap / CorrectionUnits<kBits>()));
  return (correction == 0) | !IsFinite16(param) ? p : master;
}

// DecodeMasterByGap for bf16 on the bits: the parameter's count plus the
// correction in float32 steps (see EncodeCorrectionOnBits); infinity where
// the correction points past the largest finite parameter, as the infinite
// gap gives.
template <int kBits>
OPTAX_PAGED_MASTER float DecodeMasterOnBits(BFloat16 param,
                                            int32_t correction) {
  const uint32_t p = static_cast<uint32_t>(param.bits) << 16;
  const uint32_t master = BitsFromOrdered(
      OrderedBits(p) + correction * (1 << (16 - kBits)));
  const uint32_t infinity = (p & 0x80000000u) | 0x7f800000u;
  const uint32_t bits = OutwardAtMax(param, correction > 0) ? infinity : master;
  return BitsToFloat((correction == 0) | !IsFinite16(param) ? p : bits);
}

template <int kBits, typename T>
OPTAX_PAGED_MASTER float DecodeMaster(T param, int32_t correction) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return DecodeMasterOnBits<kBits>(param, correction);
  } else {
    return DecodeMasterByGap<kBits>(param, correction);
  }
}

template <typename T>
struct MasterStep {
  T update;  // what tx.update returns
  T param;   // what optax.apply_updates (or the fused step) makes of it
};

// The step from `param` toward the new master: the update that takes the
// parameter to the master's rounding (ties up), and the parameter that
// update + apply_updates gives, as XLA rounds it: the rounding itself
// unless the update is not exact in T (a step across many binades), when
// the correction is written against the parameter actually reached.
template <typename T>
OPTAX_PAGED_MASTER MasterStep<T> StepToMaster(T param, float master) {
  const T target = RoundTiesUp<T>(master);
  const T update = FromFloat<T>(AddRounded(ToFloat(target), -ToFloat(param)));
  return {update, FromFloat<T>(AddRounded(ToFloat(param), ToFloat(update)))};
}

// One element's share of its block's fingerprint: a wrapping sum over the
// block, so that any order of summation (lanes, threads) agrees. An odd
// multiplier per position: a change of one element always changes the sum.
OPTAX_PAGED_MASTER uint32_t FingerprintTerm(uint32_t bits, int position) {
  return (bits + 1u) * (0x9e3779b1u * (2u * static_cast<uint32_t>(position) + 1u));
}

// Shortcuts for the GPU's lanes of bf16 parameters with 8-bit corrections
// (the 24-bit master), each equal to the general function above only where
// its values lie strictly inside bf16's finite range (|x| below 0x7f7f0000,
// bf16's largest value): there no guard of the general form (infinite gap,
// NaN, the reach clamp, the tie at -max) can apply. The kernel takes them
// for a lane whose parameters and masters are all inside and the general
// functions for any other lane. tests/master_shortcuts_test.py checks each
// against its general form.
inline constexpr uint32_t kBf16LargestBits = 0x7f7f0000u;

OPTAX_PAGED_MASTER bool InsideBf16Range(uint32_t float_bits) {
  return (float_bits & 0x7fffffffu) < kBf16LargestBits;
}

// The same test on the value (false for NaN and infinities too): one
// compare with the absolute-value modifier on the GPU where the bits take
// a mask and a compare.
OPTAX_PAGED_MASTER bool InsideBf16Range(float x) {
  return fabsf(x) < 0x1.fep127f;
}

// OrderedBits as a 32-bit pattern; its own inverse for non-NaN patterns but
// -0 (which it takes to +0).
OPTAX_PAGED_MASTER uint32_t FlipOrdered(uint32_t bits) {
  const uint32_t sign = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  return (bits ^ (sign & 0x7fffffffu)) - sign;
}

// DecodeMasterOnBits<8> of a parameter inside the range, as float bits.
OPTAX_PAGED_MASTER uint32_t DecodeMaster8Inside(uint16_t param_bits,
                                                int32_t correction) {
  const uint32_t p = static_cast<uint32_t>(param_bits) << 16;
  const uint32_t moved =
      FlipOrdered(FlipOrdered(p) + static_cast<uint32_t>(correction) * 256u);
  return correction == 0 ? p : moved;
}

// RoundTiesUp<BFloat16> of a master inside the range, as float bits.
OPTAX_PAGED_MASTER uint32_t RoundTiesUpInside(uint32_t master_bits) {
  return (master_bits - (master_bits >> 31) + 0x8000u) & 0xffff0000u;
}

// EncodeCorrectionOnBits<8>(master, RoundTiesUp<BFloat16>(master)) for a
// master inside the range: the rounding clears the low half of the master's
// ordered count (negation keeps a multiple of 2^16 one), so the master's
// steps past it are that low half, sign-extended, in [-2^15, 2^15).
OPTAX_PAGED_MASTER int32_t EncodeCorrection8Inside(uint32_t master_bits) {
  const int32_t steps =
      static_cast<int32_t>(FlipOrdered(master_bits) << 16) >> 16;
  const int32_t units = (steps + 127 + ((steps >> 8) & 1)) >> 8;
  return units > 127 ? 127 : units;
}

// The sum of FingerprintTerm over a lane's eight 16-bit parameters (element
// 2j in the low half of words[j], 2j + 1 in the high half) at positions
// 8 * lane_in_block + i, regrouped (mod 2^32) over the 32-bit words: with
// b the 16-bit values and h_j the high halves, sum_i (b_i + 1)(2 pos_i + 1)
// = sum_j [w_j (4j + 1) + h_j ((4j + 3) - 2^16 (4j + 1))] + 64
//   + 16 lane_in_block (sum_j w_j - (2^16 - 1) sum_j h_j + 8).
OPTAX_PAGED_MASTER uint32_t LaneFingerprint(const uint32_t words[4],
                                            int lane_in_block) {
  constexpr uint32_t kOdd = 0x9e3779b1u;  // FingerprintTerm's multiplier
  uint32_t by_position = 64u * kOdd;
  uint32_t word_sum = 0;
  uint32_t high_sum = 0;
  for (uint32_t j = 0; j < 4; ++j) {
    const uint32_t high = words[j] >> 16;
    by_position += kOdd * (4u * j + 1u) * words[j] +
                   kOdd * ((4u * j + 3u) - 65536u * (4u * j + 1u)) * high;
    word_sum += words[j];
    high_sum += high;
  }
  const uint32_t lane_weight =
      16u * kOdd * static_cast<uint32_t>(lane_in_block);
  return by_position + lane_weight * (8u + word_sum - 65535u * high_sum);
}

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_MASTER_WEIGHTS_H_
