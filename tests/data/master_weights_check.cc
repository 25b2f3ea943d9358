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
// 3. DecodeMasterOnBits and EncodeCorrectionOnBits (bf16 on the bits)
// against DecodeMasterByGap and EncodeCorrectionByGap (the gap arithmetic
// float16 keeps), 8- and 16-bit corrections: every parameter with every
// 8-bit correction and every 13th 16-bit one (all near the ends); every
// parameter against masters around it and around its negation (offsets at
// and beside the rounding boundaries, past one gap, random), the master
// rounded ties up against its rounding and two neighbours each side,
// 4M random pairs, and infinities, NaNs, zeros and the largest values
// against every parameter.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

#include "master_weights.h"

namespace {

using optax_paged::BFloat16;

float FromBits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

uint32_t Bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

long encode_checked = 0, encode_mismatches = 0;
long decode_checked = 0, decode_mismatches = 0;

template <int kBits>
void CheckEncode(uint32_t master, uint16_t param) {
  ++encode_checked;
  const int32_t by_gap =
      optax_paged::EncodeCorrectionByGap<kBits>(FromBits(master), BFloat16{param});
  const int32_t on_bits =
      optax_paged::EncodeCorrectionOnBits<kBits>(FromBits(master), BFloat16{param});
  if (by_gap != on_bits) {
    if (encode_mismatches < 5) {
      std::printf("encode %d bits, master %08x param %04x: by gap %d, on bits %d\n",
                  kBits, master, param, by_gap, on_bits);
    }
    ++encode_mismatches;
  }
}

template <int kBits>
void CheckDecode(uint16_t param, int32_t correction) {
  ++decode_checked;
  const uint32_t by_gap =
      Bits(optax_paged::DecodeMasterByGap<kBits>(BFloat16{param}, correction));
  const uint32_t on_bits =
      Bits(optax_paged::DecodeMasterOnBits<kBits>(BFloat16{param}, correction));
  const bool both_nan = (by_gap & 0x7fffffffu) > 0x7f800000u &&
                        (on_bits & 0x7fffffffu) > 0x7f800000u;
  if (by_gap != on_bits && !both_nan) {
    if (decode_mismatches < 5) {
      std::printf("decode %d bits, param %04x correction %d: by gap %08x, on bits %08x\n",
                  kBits, param, correction, by_gap, on_bits);
    }
    ++decode_mismatches;
  }
}

void CheckCorrectionOnBits() {
  std::mt19937 random(2);
  for (uint32_t p = 0; p < 0x10000u; ++p) {
    for (int q = -128; q < 128; ++q) CheckDecode<8>(p, q);
    for (int q = -32768; q < 32768; q += (q > -32760 && q < 32760) ? 13 : 1) {
      CheckDecode<16>(p, q);
    }
  }
  const int32_t offsets[] = {0,      1,      127,     128,     129,
                             255,    256,    257,     383,     384,
                             385,    0x7f00, 0x7f80,  0x7fff,  0x8000,
                             0x8001, 0xffff, 0x10000, 0x10001, 0x20000,
                             1 << 24};
  auto check_both = [](uint32_t master, uint16_t param) {
    CheckEncode<8>(master, param);
    CheckEncode<16>(master, param);
  };
  for (uint32_t p = 0; p < 0x10000u; ++p) {
    for (uint32_t flip : {0u, 0x80000000u}) {
      const uint32_t base = (p << 16) ^ flip;
      for (int32_t offset : offsets) {
        check_both(base + static_cast<uint32_t>(offset), p);
        check_both(base - static_cast<uint32_t>(offset), p);
      }
      for (int k = 0; k < 24; ++k) {
        check_both(base + static_cast<uint32_t>(
                              static_cast<int32_t>(random() % 0x30000u) - 0x18000),
                   p);
      }
    }
    const uint32_t master = random();
    const uint16_t rounded =
        optax_paged::RoundTiesUp<BFloat16>(FromBits(master)).bits;
    for (int k = -2; k <= 2; ++k) {
      check_both(master, static_cast<uint16_t>(rounded + k));
    }
  }
  for (long k = 0; k < 4000000; ++k) {
    const uint32_t master = random();
    check_both(master, static_cast<uint16_t>(random()));
  }
  const float special[] = {0.0f,           -0.0f,         INFINITY,
                           -INFINITY,      NAN,           -NAN,
                           3.3895314e38f,  -3.3895314e38f, 3.4028235e38f,
                           -3.4028235e38f, 1e-45f,        -1e-45f};
  for (float x : special) {
    for (uint32_t p = 0; p < 0x10000u; ++p) check_both(Bits(x), p);
  }
  std::printf("correction decode checked: %ld mismatches: %ld\n",
              decode_checked, decode_mismatches);
  std::printf("correction encode checked: %ld mismatches: %ld\n",
              encode_checked, encode_mismatches);
}

}  // namespace

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
  CheckCorrectionOnBits();
  return mismatches == 0 && rounding_mismatches == 0 &&
                 encode_mismatches == 0 && decode_mismatches == 0
             ? 0
             : 1;
}
