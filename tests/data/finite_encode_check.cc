// EncodeFinite (the GPU's encode of a block with a finite absmax) against
// Encode, for both 8-bit maps: every 16th float32 with |x| < 2 (a finite
// absmax gives |x| <= 1 + 2^-23), and every threshold with its 64
// neighbours on each side, where ties and the negative side's nudge live
// (`--all`: every float32, about a minute).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "quantization.h"

using namespace optax_paged;

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 && std::strcmp(argv[1], "--all") == 0 ? 1 : 16;
  const QuantTables* maps[2] = {&SignedTables(), &UnsignedTables()};
  const FiniteCodeTables* finite[2] = {&SignedFiniteCodeTables(),
                                       &UnsignedFiniteCodeTables()};
  uint64_t checked = 0, mismatches = 0;
  auto check = [&](int map, float x) {
    if (!(std::fabs(x) < 2.0f)) return;  // NaN and |x| >= 2 take Encode
    ++checked;
    if (EncodeFinite(*finite[map], x) != Encode(*maps[map], x)) {
      if (mismatches++ < 5) std::printf("map %d x %a\n", map, x);
    }
  };
  for (int map = 0; map < 2; ++map) {
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
