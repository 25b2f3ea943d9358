// master_weights.h's shortcuts for the 24-bit master against the general
// functions they stand for (tests/master_shortcuts_test.py). The decode is
// checked for every parameter inside bf16's range and every correction; the
// rounding and the encode for every float32 master inside the range whose
// pattern is a multiple of 61 or whose low half lies at a rounding edge
// (`--all`: every float32, about a minute); the lane fingerprint for random
// words at every position in the block.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "master_weights.h"

using optax_paged::BFloat16;

namespace {

long decode_checked = 0, decode_bad = 0;
long encode_checked = 0, encode_bad = 0;

long range_bad = 0;

void CheckMaster(uint32_t bits) {
  // The kernel tests the value, the check below the bits: the same answer.
  if (optax_paged::InsideBf16Range(bits) !=
          optax_paged::InsideBf16Range(optax_paged::BitsToFloat(bits)) &&
      range_bad++ < 5) {
    std::printf("range %08x\n", bits);
  }
  if (!optax_paged::InsideBf16Range(bits)) return;
  const float master = optax_paged::BitsToFloat(bits);
  const BFloat16 rounded = optax_paged::RoundTiesUp<BFloat16>(master);
  const int32_t correction =
      optax_paged::EncodeCorrectionOnBits<8>(master, rounded);
  ++encode_checked;
  if ((static_cast<uint32_t>(rounded.bits) << 16) !=
          optax_paged::RoundTiesUpInside(bits) ||
      correction != optax_paged::EncodeCorrection8Inside(bits)) {
    if (encode_bad++ < 5) std::printf("master %08x\n", bits);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool all = argc > 1 && std::strcmp(argv[1], "--all") == 0;
  for (uint32_t p = 0; p < 65536; ++p) {
    if (!optax_paged::InsideBf16Range(p << 16)) continue;
    for (int32_t c = -128; c < 128; ++c) {
      ++decode_checked;
      const float general =
          optax_paged::DecodeMasterOnBits<8>(BFloat16{static_cast<uint16_t>(p)}, c);
      if (optax_paged::FloatBits(general) !=
          optax_paged::DecodeMaster8Inside(static_cast<uint16_t>(p), c)) {
        if (decode_bad++ < 5) std::printf("decode %04x %d\n", p, c);
      }
    }
  }
  std::printf("decode checked: %ld mismatches: %ld\n", decode_checked, decode_bad);

  // The rounding's tie (0x8000), the encode's ties and its clamp (multiples
  // of 128 steps either side of the rounding), and their neighbours.
  const uint32_t edges[] = {0x0000, 0x0001, 0x007f, 0x0080, 0x0081, 0x00ff,
                            0x0100, 0x0101, 0x7f7f, 0x7f80, 0x7f81, 0x7fff,
                            0x8000, 0x8001, 0x807f, 0x8080, 0x8081, 0xff7f,
                            0xff80, 0xff81, 0xfffe, 0xffff};
  if (all) {
    for (uint64_t bits = 0; bits < (1ull << 32); ++bits) {
      CheckMaster(static_cast<uint32_t>(bits));
    }
  } else {
    for (uint64_t bits = 0; bits < (1ull << 32); bits += 61) {
      CheckMaster(static_cast<uint32_t>(bits));
    }
    for (uint32_t high = 0; high < 65536; ++high) {
      for (uint32_t low : edges) CheckMaster(high << 16 | low);
    }
  }
  std::printf("masters checked: %ld mismatches: %ld\n", encode_checked,
              encode_bad + range_bad);

  long fingerprint_bad = 0;
  uint64_t state = 0x243f6a8885a308d3ull;
  auto next = [&state] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(state >> 32);
  };
  for (int trial = 0; trial < 200000; ++trial) {
    uint32_t words[4];
    for (uint32_t& word : words) word = next();
    if (trial % 7 == 0) words[trial % 4] = trial % 2 ? 0xffffffffu : 0u;
    const int lane = trial % 16;
    uint32_t sum = 0;
    for (int i = 0; i < 8; ++i) {
      const uint32_t value = (words[i / 2] >> (16 * (i % 2))) & 0xffffu;
      sum += optax_paged::FingerprintTerm(value, lane * 8 + i);
    }
    if (sum != optax_paged::LaneFingerprint(words, lane) && fingerprint_bad++ < 5) {
      std::printf("fingerprint trial %d\n", trial);
    }
  }
  std::printf("fingerprints checked: 200000 mismatches: %ld\n", fingerprint_bad);
  return decode_bad + encode_bad + range_bad + fingerprint_bad == 0 ? 0 : 1;
}
