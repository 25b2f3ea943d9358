// EncodeFinite (the GPU's encode of a block with a finite absmax) against
// Encode, for both 8-bit maps and the 4-bit signed one (through NearestCode
// and EncodeFourBitStochastic too, as the 4-bit kernels call it): every
// 16th float32 with |x| < 2 (a finite
// absmax gives |x| <= 1 + 2^-23), and every threshold with its 64
// neighbours on each side, where ties and the negative side's nudge live
// (`--all`: every float32, about a minute).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

#include "quantization.h"

using namespace optax_paged;

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 && std::strcmp(argv[1], "--all") == 0 ? 1 : 16;
  constexpr int kMaps = 3;
  const QuantTables* maps[kMaps] = {&SignedTables(), &UnsignedTables(),
                                    &SignedFourBitTables()};
  const FiniteCodeTables* finite[kMaps] = {&SignedFiniteCodeTables(),
                                           &UnsignedFiniteCodeTables(),
                                           &SignedFourBitFiniteCodeTables()};
  uint64_t checked = 0, mismatches = 0;
  auto check = [&](int map, float x) {
    if (!(std::fabs(x) < 2.0f)) return;  // NaN and |x| >= 2 take Encode
    ++checked;
    bool same = EncodeFinite(*finite[map], x) == Encode(*maps[map], x) &&
                NearestCode(*finite[map], x) == NearestCode(*maps[map], x);
    if (map == 2) {
      // The stochastic encode rests on the nearest code: a few draws, among
      // them the ends of u's range.
      const uint32_t bits = FloatBits(x);
      for (uint32_t random : {0u, 0xffffffffu, bits * 0x9e3779b9u}) {
        same &= EncodeFourBitStochastic(*finite[map], x, random) ==
                EncodeFourBitStochastic(*maps[map], x, random);
      }
    }
    if (!same && mismatches++ < 5) std::printf("map %d x %a\n", map, x);
  };
  for (int map = 0; map < kMaps; ++map) {
    for (uint64_t bits = 0; bits < (1ull << 32); bits += stride) {
      check(map, BitsToFloat(static_cast<uint32_t>(bits)));
    }
    for (int code = 0; code < 256; ++code) {
      const float threshold = finite[map]->threshold[code];
      if (!std::isfinite(threshold)) continue;
      const uint32_t center = FloatBits(threshold);
      for (int step = -64; step <= 64; ++step) {
        check(map, BitsToFloat(center + static_cast<uint32_t>(step)));
        check(map, -BitsToFloat(center + static_cast<uint32_t>(step)));
      }
    }
  }
  std::printf("finite encode checked: %llu mismatches: %llu\n",
              static_cast<unsigned long long>(checked),
              static_cast<unsigned long long>(mismatches));
  return mismatches == 0 ? 0 : 1;
}
