// DivideByGap (ffi/master_weights.h) against IEEE division, for every
// power-of-two gap from 2^-149 to 2^126 (bf16's and float16's gaps lie
// within) and random float32 bit patterns plus special values. A result may
// differ only where both are past every correction's limit (|q| > 2^16)
// with the same sign: EncodeCorrection clamps both alike.
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
  std::printf("checked: %ld mismatches: %ld\n", checked, mismatches);
  return mismatches == 0 ? 0 : 1;
}
