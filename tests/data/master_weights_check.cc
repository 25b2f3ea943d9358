// ffi/master_weights.h's shortcuts against what they replace:
// 1. DivideByGap against IEEE division, for every
// power-of-two gap from 2^-149 to 2^126 (bf16's and float16's gaps lie
// within) and random float32 bit patterns plus special values. A result may
// differ only where both are past every correction's limit (|q| > 2^16)
// with the same sign: EncodeCorrection clamps both alike.
// 2. RoundTiesUp<BFloat16> (on the bits) against RoundTiesUpByNeighbour
// (round to nearest even, then the tie moved up): every float32 whose low
// half is a tie or next to one, and every 97th bit pattern. (All 2^32 agree;
// that loop takes a core 12 s.)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

#include "master_weights.h"

int main() {
  std::mt19937 random(1);
  const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-45f,
                           -1e-45f, 1e-40f, 3.4e38f, -3.4e38f, 0.5f, 1.0f,
                           1.5f, 2.5f, -3.0f, 127.0f, 128.0f, 32767.0f};
  constexpr int kSpecial = sizeof(special) / sizeof(special[0]);
  long mismatches = 0, checked = 0;
  for (int e = -149; e <= 126; ++e) {
    const float gap = std::ldexp(1.0f, e);
    for (int k = 0; k < 20000; ++k) {
      float x;
      if (k < kSpecial) {
        x = special[k];
      } else {
        const uint32_t bits = random();
        std::memcpy(&x, &bits, sizeof(x));
      }
      const float ours = optax_paged::DivideByGap(x, gap);
      const float divided = x / gap;
      const bool same = std::memcmp(&ours, &divided, sizeof(float)) == 0 ||
                        (std::isnan(ours) && std::isnan(divided));
      const bool both_clamped =
          std::fabs(ours) > 65536.0f && std::fabs(divided) > 65536.0f &&
          std::signbit(ours) == std::signbit(divided);
      if (!same && !both_clamped) {
        if (mismatches < 5) {
          std::printf("gap 2^%d x %a: division %a, DivideByGap %a\n", e, x,
                      divided, ours);
        }
        ++mismatches;
      }
      ++checked;
    }
  }
  std::printf("division checked: %ld mismatches: %ld\n", checked, mismatches);

  long rounding_mismatches = 0, rounded = 0;
  auto check_rounding = [&](uint32_t bits) {
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    const uint16_t ours = optax_paged::RoundTiesUp<optax_paged::BFloat16>(x).bits;
    const uint16_t general =
        optax_paged::RoundTiesUpByNeighbour<optax_paged::BFloat16>(x).bits;
    if (ours != general) {
      if (rounding_mismatches < 5) {
        std::printf("bits %08x: RoundTiesUp %04x, by neighbour %04x\n", bits,
                    ours, general);
      }
      ++rounding_mismatches;
    }
    ++rounded;
  };
  const uint32_t low_halves[] = {0x0000u, 0x0001u, 0x7fffu,
                                 0x8000u, 0x8001u, 0xffffu};
  for (uint32_t high = 0; high < 0x10000u; ++high) {
    for (uint32_t low : low_halves) check_rounding(high << 16 | low);
  }
  for (uint64_t bits = 0; bits < (uint64_t{1} << 32); bits += 97) {
    check_rounding(static_cast<uint32_t>(bits));
  }
  std::printf("rounding checked: %ld mismatches: %ld\n", rounded,
              rounding_mismatches);
  return mismatches == 0 && rounding_mismatches == 0 ? 0 : 1;
}
