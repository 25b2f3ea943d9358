// CUDA FFI handler: one launch updates every leaf of a dtype group in place.
//
// Multi-tensor layout: a by-value table of leaves (pointers, sizes, first
// run) and a persistent grid in which each warp owns one run of quantization
// blocks at a time and walks its blocks of 256 elements, 8 contiguous
// elements per lane, loaded and stored with 16-byte vectors. The block
// absmax is reduced with warp shuffles, so no block-wide barrier sits on the
// hot path. A run is one block on the device tier and 32 blocks on the host
// tier, whose absmax then cross the link as one coalesced read and write
// (lane i holds block i's) instead of one 4-byte transaction per block; each
// warp interleaves host runs with device runs so that the link and HBM work
// at once (benchmarks/NOTES.md, host tier). The
// quantization tables live in shared memory; hyperparameters are read from
// device memory, so the host never waits on the device.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_update.h"
#include "element_types.h"
#include "master_weights.h"
#include "optimizer_math.h"
#include "quantization.h"
#include "state_registry.h"
#include "step_stamps.h"
#include "update_validation.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace optax_paged {

namespace {

constexpr int kElementsPerLane = 8;
constexpr int kWarpSize = 32;
static_assert(kElementsPerLane * kWarpSize == kBlockSize,
              "a warp covers exactly one quantization block");
// Threads per block and blocks per SM: 1024 threads an SM cap registers at
// 64 a thread, too few for AdEMAMix's three moments or for a master
// weight's correction and fingerprint beside two moments without spilling
// (ptxas: 88-104 B of stack a thread; benchmarks/NOTES.md); 768 threads an
// SM give them 80.
template <typename Optimizer, int kCorrectionBits>
struct LaunchShape {
  static constexpr bool kRoomy =
      std::is_same_v<Optimizer, AdEMAMix> || kCorrectionBits != 0;
  static constexpr int kThreads = kRoomy ? 256 : 512;
  static constexpr int kBlocksPerMultiprocessor = kRoomy ? 3 : 2;
};
// Leaves per launch: the table rides in the kernel's parameters (up to 32 KB
// since CUDA 12.1); groups with more leaves take several launches.
constexpr int kMaxLeavesPerLaunch = 224;
// Blocks per run on the host tier (at most a warp's lanes).
constexpr int kHostRunBlocks = 32;
static_assert(kHostRunBlocks <= kWarpSize, "one absmax per lane");

struct LeafArgs {
  const void* grad;
  const void* param;
  void* out;
  void* state[kMaxMoments];  // codes (quantized) or fp32 values
  float* absmax[kMaxMoments];
  int64_t size;
  int64_t num_blocks;
  int64_t first_run;  // index of the leaf's first run in the launch
  int32_t run_blocks;  // quantization blocks per run
  int32_t quantized;
  int32_t decay;
  uint32_t id;  // index in the registry entry, for random bits
  int64_t index_offset;  // the shard's first element in the leaf, likewise
  // Master weights (kernels with kCorrectionBits): the correction, and the
  // fingerprints followed by the reset count.
  void* correction;
  uint32_t* fingerprints;
};

struct LaunchArgs {
  // Device-tier leaves first, then host-tier leaves.
  LeafArgs leaves[kMaxLeavesPerLaunch];
  int64_t total_runs;
  int64_t host_runs;  // the last host_runs runs are on the host tier
  int32_t num_leaves;
  int32_t output_mode;
  // The mesh position the call was traced for (device memory) and the one
  // the entry holds; on a mismatch the kernel writes NaN results, leaves
  // the state alone and sets a status word (host memory), which fails the
  // next call on the host. A count that is not the moments' step (the
  // entry's stamps, device memory) is refused the same way.
  const int32_t* position;
  int32_t expected_position;
  int32_t* status;
  uint64_t* stamps;
  uint32_t launch;
  // Device-only launches: the next run of the launch's tail, zeroed on the
  // launch's stream before it; each warp takes its last runs from it, so
  // that the warps of faster SMs take more of them. XLA scratch memory of
  // the call, so that no two launches share one, whatever their streams.
  // XLA frees it when the handler returns, before the kernel has run: its
  // GPU allocator is ordered by the compute stream the handler is given
  // (jaxlib's own cuSOLVER handlers leave their scratch workspaces to
  // pending kernels the same way), and the handler is not marked for
  // command buffers, so no graph keeps the address. 32 bits: it reaches
  // total_runs / 8 + kTailGrab x warps, under 2^32 for any launch whose
  // leaves fit a GPU (2^35 runs would be 8.8T parameters).
  unsigned int* next_run;
};
static_assert(sizeof(LaunchArgs) <= 32000, "kernel parameters over 32 KB");

// [0]: signed map, [1]: unsigned map, [2]: the 4-bit signed map, [3]: unused
// (a kernel copies two tables: their size is a multiple of 16 bytes).
__device__ QuantTables g_tables[4];
// The kernels' shared tables: [0] signed, [1] unsigned (8-bit kernels),
// [2] the 4-bit signed map, [3] unused (4-bit kernels: a kernel copies two).
// Their encode reads g_tables only for a block holding NaN or infinity.
__device__ __align__(16) FiniteCodeTables g_finite_tables[4];
// Runs a warp takes from the launch's tail counter at a time (1 gained less:
// benchmarks/NOTES.md, issue 26).
constexpr int kTailGrab = 4;

// Eight elements of T, as one or two 16-byte vectors.
template <typename T>
struct Vec8 {
  T v[kElementsPerLane];
};

template <typename T>
__device__ __forceinline__ void LoadVec(const T* src, Vec8<T>* dst) {
  static_assert(sizeof(Vec8<T>) % 16 == 0, "vector width");
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Vec8<T>) / 16); ++i) d[i] = s[i];
}

template <typename T>
__device__ __forceinline__ void StoreVec(T* dst, const Vec8<T>& src) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4* s = reinterpret_cast<const uint4*>(&src);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Vec8<T>) / 16); ++i) d[i] = s[i];
}

// bf16 outputs of the non-stochastic modes are rounded two at a time by the
// packed conversion (one F2FP for a pair where FromFloat<BFloat16> spends a
// conversion and a NaN select on each). The select is not needed here: every
// value rounded is the result of the kernel's own arithmetic, whose NaN is
// the canonical 0x7fffffff on NVIDIA GPUs, and the conversion turns that into
// 0x7fff, the select's result for it (benchmarks/experiments/
// bf16x2_nan_probe.cu shows both on the card). The refused path's constant
// NaN keeps FromFloat.
template <typename T, int kMode>
inline constexpr bool kPackedBf16Output =
    std::is_same_v<T, BFloat16> && kMode != kOutputParamsStochastic;

__device__ __forceinline__ uint32_t PackBf16Pair(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// OutputValue<BFloat16, kMode> of two neighbouring elements, the same bits.
template <int kMode>
__device__ __forceinline__ void OutputBf16Pair(float param0, float update0,
                                               float param1, float update1,
                                               BFloat16* out) {
  uint32_t bits = PackBf16Pair(update0, update1);
  if constexpr (kMode == kOutputParams) {
    // update + apply: the update rounded to bf16, then p + u rounded.
    bits = PackBf16Pair(AddRounded(param0, BitsToFloat(bits << 16)),
                        AddRounded(param1, BitsToFloat(bits & 0xffff0000u)));
  }
  out[0] = BFloat16{static_cast<uint16_t>(bits)};
  out[1] = BFloat16{static_cast<uint16_t>(bits >> 16)};
}

// The master-weight lanes that take master_weights.h's shortcuts: bf16 with
// 8-bit corrections (the 24-bit master), writing parameters.
template <typename T, int kCorrectionBits, int kMode>
inline constexpr bool kMasterShortcut = std::is_same_v<T, BFloat16> &&
                                        kCorrectionBits == 8 &&
                                        kMode == kOutputParams;

// Whether the launch's AdamW takes neither nesterov nor eps_root, whose
// branches then leave the master kernels' element loop (PlainScalars).
template <typename Optimizer>
__device__ __forceinline__ bool IsPlain(const typename Optimizer::Scalars& s) {
  if constexpr (std::is_same_v<Optimizer, AdamW>) {
    return !s.nesterov && !(s.eps_root != 0.0f);
  } else {
    return false;
  }
}

// The scalars of a launch for which IsPlain holds, with those two as
// constants: the same values, known to the compiler.
template <typename Optimizer>
__device__ __forceinline__ typename Optimizer::Scalars PlainScalars(
    typename Optimizer::Scalars s) {
  if constexpr (std::is_same_v<Optimizer, AdamW>) {
    s.nesterov = false;
    s.eps_root = 0.0f;
  }
  return s;
}

// A lane's share of its half-warp's fingerprint: FingerprintTerm summed over
// its parameters, a full lane's over its four 32-bit words at once.
template <typename T, typename Full>
__device__ __forceinline__ uint32_t LaneFingerprintOf(const Vec8<T>& p,
                                                      Full full_lane, int count,
                                                      int lane) {
  static_assert(sizeof(T) == 2, "master weights are kept for 16-bit parameters");
  if (full_lane) {
    uint32_t words[4];
    memcpy(words, &p, sizeof(words));
    return LaneFingerprint(words, lane % 16);
  }
  uint32_t sum = 0;
  for (int i = 0; i < count; ++i) {
    sum += FingerprintTerm(Bits16(p.v[i]), (lane % 16) * kElementsPerLane + i);
  }
  return sum;
}

// DecodeMaster<8> of a lane of bf16 parameters, by the shortcut where all
// eight lie inside bf16's range. (Templates on the lambda's mode, and the
// parameter type, so that update_elements' discarded branches of other
// instantiations are never checked against float parameters.)
template <int kMode, typename T>
__device__ __forceinline__ void DecodeLaneMasters(
    const Vec8<T>& p, const int32_t offset[kElementsPerLane],
    float masters[kElementsPerLane]) {
  static_assert(std::is_same_v<T, BFloat16>, "the shortcuts are bf16's");
  bool inside = true;
#pragma unroll
  for (int i = 0; i < kElementsPerLane; ++i) {
    inside &= InsideBf16Range(ToFloat(p.v[i]));
  }
  // A branch, not a select per element: the general decode is not computed
  // for the lanes (nearly all) that do not need it.
  if (inside) {
#pragma unroll
    for (int i = 0; i < kElementsPerLane; ++i) {
      masters[i] = BitsToFloat(DecodeMaster8Inside(p.v[i].bits, offset[i]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < kElementsPerLane; ++i) {
      masters[i] = DecodeMaster<8>(p.v[i], offset[i]);
    }
  }
}

// StepToMaster and EncodeCorrection<8> for a lane of bf16 parameters, by
// the shortcuts where every new master lies inside bf16's range and every
// parameter reaches its master's rounding (the usual step); else element by
// element by the general functions. The update and the parameter are
// rounded two at a time (PackBf16Pair: finite values only here).
template <int kMode, typename T>
__device__ __forceinline__ void StepLaneToMasters(
    const float new_masters[kElementsPerLane], Vec8<T>* p,
    int32_t offset[kElementsPerLane]) {
  static_assert(std::is_same_v<T, BFloat16>, "the shortcuts are bf16's");
  uint32_t words[kElementsPerLane / 2];
  int32_t corrections[kElementsPerLane];
  bool shortcut = true;
#pragma unroll
  for (int j = 0; j < kElementsPerLane / 2; ++j) {
    const uint32_t master0 = FloatBits(new_masters[2 * j]);
    const uint32_t master1 = FloatBits(new_masters[2 * j + 1]);
    shortcut &= InsideBf16Range(new_masters[2 * j]) &
                InsideBf16Range(new_masters[2 * j + 1]);
    const uint32_t target0 = RoundTiesUpInside(master0);
    const uint32_t target1 = RoundTiesUpInside(master1);
    const float param0 = ToFloat(p->v[2 * j]);
    const float param1 = ToFloat(p->v[2 * j + 1]);
    const uint32_t update = PackBf16Pair(AddRounded(BitsToFloat(target0), -param0),
                                         AddRounded(BitsToFloat(target1), -param1));
    words[j] = PackBf16Pair(AddRounded(param0, BitsToFloat(update << 16)),
                            AddRounded(param1, BitsToFloat(update & 0xffff0000u)));
    shortcut &= words[j] == ((target0 >> 16) | (target1 & 0xffff0000u));
    corrections[2 * j] = EncodeCorrection8Inside(master0);
    corrections[2 * j + 1] = EncodeCorrection8Inside(master1);
  }
  if (shortcut) {
#pragma unroll
    for (int j = 0; j < kElementsPerLane / 2; ++j) {
      p->v[2 * j] = BFloat16{static_cast<uint16_t>(words[j])};
      p->v[2 * j + 1] = BFloat16{static_cast<uint16_t>(words[j] >> 16)};
    }
#pragma unroll
    for (int i = 0; i < kElementsPerLane; ++i) offset[i] = corrections[i];
  } else {
#pragma unroll
    for (int i = 0; i < kElementsPerLane; ++i) {
      const MasterStep<BFloat16> step = StepToMaster(p->v[i], new_masters[i]);
      p->v[i] = step.param;
      offset[i] = EncodeCorrection<8>(new_masters[i], step.param);
    }
  }
}

__device__ __forceinline__ int FindLeaf(const LaunchArgs& args, int64_t run) {
  int lo = 0;
  int hi = args.num_leaves - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.leaves[mid].first_run <= run) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The sum and the "or" of a value over each half-warp (xor offsets below 16
// stay in it).
__device__ __forceinline__ uint32_t HalfWarpSum(uint32_t x) {
#pragma unroll
  for (int offset = 8; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ bool HalfWarpAny(bool x) {
  uint32_t bit = x ? 1u : 0u;
#pragma unroll
  for (int offset = 8; offset > 0; offset /= 2) {
    bit |= __shfl_xor_sync(0xffffffffu, bit, offset);
  }
  return bit != 0;
}

// kFourBit: the launch's quantized leaves hold 4-bit codes in blocks of 128,
// two blocks a warp (a half-warp each); tables[0] is then the 4-bit signed
// map's. kCorrectionBits: 8 or 16 when the launch's (16-bit) parameters keep
// master weights, each half-warp then one fingerprint block; else 0.
template <typename Optimizer, typename T, bool kTiered, bool kFourBit,
          int kCorrectionBits>
__global__ void __launch_bounds__(
    LaunchShape<Optimizer, kCorrectionBits>::kThreads,
    LaunchShape<Optimizer, kCorrectionBits>::kBlocksPerMultiprocessor)
    UpdateKernel(const __grid_constant__ LaunchArgs args,
                 const float* __restrict__ hyperparams) {
  constexpr int kMoments = Optimizer::kNumMoments;
  __shared__ __align__(16) FiniteCodeTables tables[2];
  {
    const int4* src =
        reinterpret_cast<const int4*>(g_finite_tables + (kFourBit ? 2 : 0));
    int4* dst = reinterpret_cast<int4*>(tables);
    constexpr int kTableBytes = sizeof(FiniteCodeTables) * 2;
    static_assert(kTableBytes % sizeof(int4) == 0, "table size");
    for (int i = threadIdx.x; i < static_cast<int>(kTableBytes / sizeof(int4));
         i += blockDim.x) {
      dst[i] = src[i];
    }
  }
  const typename Optimizer::Scalars launch_scalars = Optimizer::Load(hyperparams);
  const uint32_t seed = FloatBits(hyperparams[kSeedIndex]);
  const bool misrouted = *args.position != args.expected_position;
  if (misrouted && blockIdx.x == 0 && threadIdx.x == 0) {
    args.status[kStatusMisrouted] = 1;
  }
  // Every block checks every leaf's stamp before any block of this launch
  // could write one; see StampAccepts. L1 is not coherent across SMs, so
  // the stamps are read from L2.
  const int32_t step = static_cast<int32_t>(seed) - 1;
  bool stale = false;
  for (int k = threadIdx.x; k < args.num_leaves; k += blockDim.x) {
    const uint64_t stamp = __ldcg(
        reinterpret_cast<const unsigned long long*>(args.stamps) +
        args.leaves[k].id);
    if (!StampAccepts(stamp, step, args.launch)) {
      stale = true;
      args.status[kStatusStaleCount] = step;
      args.status[kStatusStaleStep] = StampStep(stamp);
      __threadfence_system();
      args.status[kStatusStale] = 1;
    }
  }
  stale = __syncthreads_or(stale);
  const bool refused = misrouted || stale;
  if (!refused) {
    for (int k = threadIdx.x; k < args.num_leaves; k += blockDim.x) {
      __stcg(reinterpret_cast<unsigned long long*>(args.stamps) +
                 args.leaves[k].id,
             static_cast<unsigned long long>(MakeStamp(step + 1, args.launch)));
    }
  }
  __syncthreads();

  const int lane = threadIdx.x % kWarpSize;
  constexpr int kWarpsPerBlock =
      LaunchShape<Optimizer, kCorrectionBits>::kThreads / kWarpSize;
  const int warp = static_cast<int>(blockIdx.x) * kWarpsPerBlock +
                   static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(gridDim.x) * kWarpsPerBlock;
  // In a run, lane b holds block b's absmax: read before the run, written
  // after it.
  float run_absmax[kMoments];
  // A lone block (device tier) reads and writes its absmax itself; a
  // block of a host run takes it from lane `slot` of run_absmax and leaves
  // the new one there. Two copies of the body, so that the device tier's
  // keeps its registers free of the run's bookkeeping.
  auto update_block = [&](auto in_run, const LeafArgs& leaf,
                          int64_t local_block, int slot) {
    const int64_t first = local_block * kBlockSize + lane * kElementsPerLane;
    const int count = static_cast<int>(
        max(int64_t{0}, min(int64_t{kElementsPerLane}, leaf.size - first)));
    const T* grad = static_cast<const T*>(leaf.grad) + first;
    const T* param = static_cast<const T*>(leaf.param) + first;
    T* out = static_cast<T*>(leaf.out) + first;
    if (refused) {
      for (int i = 0; i < count; ++i) out[i] = FromFloat<T>(BitsToFloat(0x7fc00000u));
      return;
    }

    // Whether the lane's eight elements all lie in the leaf: every lane of
    // a block but the leaf's last. `full_lane` is std::true_type or
    // std::false_type (two copies of the body: the full one tests nothing
    // per load and store, and keeps the shared tables' base in a uniform
    // register; benchmarks/NOTES.md, issue 26) or, in tiered launches, a
    // bool (one copy: there the second one cost spills, and the link sets
    // the pace).
    auto update_lane = [&](auto full_lane) {
      Vec8<T> g{}, p{};
      if (full_lane) {
        LoadVec(grad, &g);
        LoadVec(param, &p);
      } else {
        for (int i = 0; i < count; ++i) {
          g.v[i] = grad[i];
          p.v[i] = param[i];
        }
      }

      // The master weights' corrections, zeroed where the half-warp's
      // parameters are not those they were written for (master_weights.h).
      using Correction =
          std::conditional_t<kCorrectionBits == 16, int16_t, int8_t>;
      int32_t offset[kElementsPerLane] = {};
      const int64_t master_block = 2 * local_block + lane / 16;
      const bool master_live = master_block * kMasterBlockSize < leaf.size;
      if constexpr (kCorrectionBits != 0) {
        const Correction* source =
            static_cast<const Correction*>(leaf.correction) + first;
        Correction c[kElementsPerLane] = {};
        if (full_lane) {
          if constexpr (sizeof(Correction) == 2) {
            *reinterpret_cast<uint4*>(c) = *reinterpret_cast<const uint4*>(source);
          } else {
            *reinterpret_cast<uint2*>(c) = *reinterpret_cast<const uint2*>(source);
          }
        } else {
          for (int i = 0; i < count; ++i) c[i] = source[i];
        }
        bool corrected = false;
#pragma unroll
        for (int i = 0; i < kElementsPerLane; ++i) {
          offset[i] = c[i];
          if (i < count) corrected = corrected || c[i] != 0;
        }
        const uint32_t fingerprint =
            HalfWarpSum(LaneFingerprintOf(p, full_lane, count, lane));
        corrected = HalfWarpAny(corrected);
        const uint32_t saved = master_live ? leaf.fingerprints[master_block] : 0u;
        if (fingerprint != saved && corrected) {
#pragma unroll
          for (int i = 0; i < kElementsPerLane; ++i) offset[i] = 0;
          if (lane % 16 == 0) {
            atomicAdd(leaf.fingerprints +
                          (leaf.size + kMasterBlockSize - 1) / kMasterBlockSize,
                      1u);
          }
        }
      }

      float moments[kMoments][kElementsPerLane];
      float old_absmax[kMoments];
      // 4 bits: lanes 0-15 hold quantization block 2 * local_block, lanes
      // 16-31 the next one, which may lie past the leaf's end.
      const int64_t half_block = 2 * local_block + lane / 16;
      [[maybe_unused]] const bool half_live =
          half_block * kFourBitBlockSize < leaf.size;
      if (kFourBit && leaf.quantized) {
        if constexpr (kFourBit) {  // `tables`: the 4-bit map's
#pragma unroll
          for (int m = 0; m < kMoments; ++m) {
            old_absmax[m] = half_live ? leaf.absmax[m][half_block] : 0.0f;
            const uint8_t* codes =
                static_cast<const uint8_t*>(leaf.state[m]) + first / 2;
            uint32_t packed = 0;
            if (full_lane) {
              packed = *reinterpret_cast<const uint32_t*>(codes);
            } else {
              for (int i = 0; i < (count + 1) / 2; ++i) {
                packed |= static_cast<uint32_t>(codes[i]) << (8 * i);
              }
            }
#pragma unroll
            for (int i = 0; i < kElementsPerLane; ++i) {
              moments[m][i] = DecodeFourBit(tables[0], Optimizer::IsSigned(m),
                                            (packed >> (4 * i)) & 0xfu,
                                            old_absmax[m]);
            }
          }
        }
      } else if (!kFourBit && leaf.quantized) {
#pragma unroll
        for (int m = 0; m < kMoments; ++m) {
          const auto& t = tables[Optimizer::IsSigned(m) ? 0 : 1];
          if constexpr (decltype(in_run)::value) {
            old_absmax[m] = __shfl_sync(0xffffffffu, run_absmax[m], slot);
          } else {
            old_absmax[m] = leaf.absmax[m][local_block];
          }
          const uint8_t* codes = static_cast<const uint8_t*>(leaf.state[m]) + first;
          uint8_t c[kElementsPerLane] = {};
          if (full_lane) {
            *reinterpret_cast<uint2*>(c) = *reinterpret_cast<const uint2*>(codes);
          } else {
            for (int i = 0; i < count; ++i) c[i] = codes[i];
          }
#pragma unroll
          for (int i = 0; i < kElementsPerLane; ++i) {
            moments[m][i] = Decode(t.values, c[i], old_absmax[m]);
          }
        }
      } else {
#pragma unroll
        for (int m = 0; m < kMoments; ++m) {
          const float* values = static_cast<const float*>(leaf.state[m]) + first;
          if (full_lane) {
            LoadVec(values, reinterpret_cast<Vec8<float>*>(moments[m]));
          } else {
            for (int i = 0; i < count; ++i) moments[m][i] = values[i];
          }
        }
      }

      Vec8<T> result;
      const bool decay = leaf.decay != 0;
      // The output mode is uniform over the launch: one copy of the element
      // loop per mode keeps its test and the random bits' setup out of the
      // loop, where they cost a bf16 element several instructions.
      auto update_elements = [&](auto mode, auto plain) {
        constexpr int kMode = decltype(mode)::value;
        // `plain` (std::true_type): AdamW without nesterov and eps_root, as
        // constants, so that their branches leave the element loop.
        const typename Optimizer::Scalars scalars =
            decltype(plain)::value ? PlainScalars<Optimizer>(launch_scalars)
                                   : launch_scalars;
        // Each even element's operands wait here for its odd neighbour.
        [[maybe_unused]] float params_f[kElementsPerLane];
        [[maybe_unused]] float updates[kElementsPerLane];
        constexpr bool kShortcut = kMasterShortcut<T, kCorrectionBits, kMode>;
        // The 24-bit master's shortcuts (master_weights.h) for a lane whose
        // parameters lie inside bf16's range; any other lane decodes, and
        // every lane may step, by the general functions.
        [[maybe_unused]] float masters[kElementsPerLane];
        [[maybe_unused]] float new_masters[kElementsPerLane];
        if constexpr (kShortcut) DecodeLaneMasters<kMode>(p, offset, masters);
#pragma unroll
        for (int i = 0; i < kElementsPerLane; ++i) {
          float element[kMoments];
#pragma unroll
          for (int m = 0; m < kMoments; ++m) element[m] = moments[m][i];
          if constexpr (kShortcut) {
            const float update = Optimizer::Update(
                scalars, ToFloat(g.v[i]), masters[i], decay, element);
            new_masters[i] = AddRounded(masters[i], update);
          } else if constexpr (kCorrectionBits != 0) {
            // The step is the master's; p then holds the parameter written.
            const float master = DecodeMaster<kCorrectionBits>(p.v[i], offset[i]);
            const float update = Optimizer::Update(scalars, ToFloat(g.v[i]),
                                                   master, decay, element);
            const float new_master = AddRounded(master, update);
            const MasterStep<T> step = StepToMaster(p.v[i], new_master);
            result.v[i] = kMode == kOutputUpdates ? step.update : step.param;
            p.v[i] = step.param;
            offset[i] = EncodeCorrection<kCorrectionBits>(new_master, step.param);
          } else {
            const float param_f = ToFloat(p.v[i]);
            const float update = Optimizer::Update(scalars, ToFloat(g.v[i]),
                                                   param_f, decay, element);
            uint32_t random = 0u;
            if constexpr (kMode == kOutputParamsStochastic) {
              random = RandomBits(
                  seed, leaf.id,
                  static_cast<uint64_t>(leaf.index_offset + first + i));
            }
            if constexpr (kPackedBf16Output<T, kMode>) {
              params_f[i] = param_f;
              updates[i] = update;
              if (i % 2 == 1) {
                OutputBf16Pair<kMode>(params_f[i - 1], updates[i - 1], param_f,
                                      update, &result.v[i - 1]);
              }
            } else {
              result.v[i] = OutputValue<T, kMode>(param_f, update, random);
            }
          }
#pragma unroll
          for (int m = 0; m < kMoments; ++m) moments[m][i] = element[m];
        }
        if constexpr (kShortcut) {
          StepLaneToMasters<kMode>(new_masters, &p, offset);
          result = p;
        }
      };
      constexpr std::false_type kGeneral{};
      if (args.output_mode == kOutputParams) {
        constexpr std::integral_constant<int, kOutputParams> kParams{};
        if (kCorrectionBits != 0 && IsPlain<Optimizer>(launch_scalars)) {
          update_elements(kParams, std::true_type{});
        } else {
          update_elements(kParams, kGeneral);
        }
      } else if (args.output_mode == kOutputUpdates) {
        update_elements(std::integral_constant<int, kOutputUpdates>{}, kGeneral);
      } else {
        update_elements(std::integral_constant<int, kOutputParamsStochastic>{},
                        kGeneral);
      }
      if (full_lane) {
        StoreVec(out, result);
      } else {
        for (int i = 0; i < count; ++i) out[i] = result.v[i];
      }
      if constexpr (kCorrectionBits != 0) {
        Correction c[kElementsPerLane];
#pragma unroll
        for (int i = 0; i < kElementsPerLane; ++i) {
          c[i] = static_cast<Correction>(offset[i]);
        }
        const uint32_t fingerprint =
            HalfWarpSum(LaneFingerprintOf(p, full_lane, count, lane));
        if (lane % 16 == 0 && master_live) {
          leaf.fingerprints[master_block] = fingerprint;
        }
        Correction* target = static_cast<Correction*>(leaf.correction) + first;
        if (full_lane) {
          if constexpr (sizeof(Correction) == 2) {
            *reinterpret_cast<uint4*>(target) = *reinterpret_cast<const uint4*>(c);
          } else {
            *reinterpret_cast<uint2*>(target) = *reinterpret_cast<const uint2*>(c);
          }
        } else {
          for (int i = 0; i < count; ++i) target[i] = c[i];
        }
      }

      if (kFourBit && leaf.quantized) {
        if constexpr (kFourBit) {  // `tables`: the 4-bit map's
#pragma unroll
          for (int m = 0; m < kMoments; ++m) {
            // A full lane takes unrolled loops; a partial one leaves its codes
            // past the leaf's end zero (the CPU's padding nibble).
            unsigned largest = 0;
            if (full_lane) {
#pragma unroll
              for (int i = 0; i < kElementsPerLane; ++i) {
                largest = max(largest, FloatBits(moments[m][i]) & 0x7fffffffu);
              }
            } else {
              for (int i = 0; i < count; ++i) {
                largest = max(largest, FloatBits(moments[m][i]) & 0x7fffffffu);
              }
            }
            // The maximum over the half-warp (xor offsets below 16 stay in it).
#pragma unroll
            for (int offset = 8; offset > 0; offset /= 2) {
              largest = max(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
            }
            const float absmax = BitsToFloat(largest);
            const float inverse = InverseScale(absmax);
            // Constant for an unrolled moment: one of the two encodes is compiled.
            const bool stochastic =
                kStochasticFourBitOf<Optimizer> && Optimizer::IsSigned(m);
            const uint32_t key = stochastic ? StateRoundingKey(seed, leaf.id) : 0u;
            const uint64_t index = static_cast<uint64_t>(leaf.index_offset + first);
            // The signed map's nearest code: from the shared FiniteCodeTables
            // where the half-block's absmax is finite, else by Encode on the
            // global QuantTables (a block holding NaN or infinity).
            auto encode = [&](const auto& signed_tables) {
              uint32_t packed = 0;
#pragma unroll
              for (int i = 0; i < kElementsPerLane; ++i) {
                const float scaled = moments[m][i] * inverse;
                uint8_t code;
                if (stochastic) {
                  code = EncodeFourBitStochastic(
                      signed_tables, scaled, StateRoundingBits(key, index + i));
                } else if (Optimizer::IsSigned(m)) {
                  code = NearestCode(signed_tables, scaled);
                } else {
                  code = EncodeLinear16(scaled);
                }
                packed |= static_cast<uint32_t>(code) << (4 * i);
              }
              return packed;
            };
            uint32_t packed = largest < 0x7f800000u ? encode(tables[0])
                                                     : encode(g_tables[2]);
            if (!full_lane) packed &= (1u << (4 * count)) - 1u;
            uint8_t* codes = static_cast<uint8_t*>(leaf.state[m]) + first / 2;
            if (full_lane) {
              *reinterpret_cast<uint32_t*>(codes) = packed;
            } else {
              for (int i = 0; i < (count + 1) / 2; ++i) {
                codes[i] = static_cast<uint8_t>(packed >> (8 * i));
              }
            }
            if (lane % 16 == 0 && half_live) leaf.absmax[m][half_block] = absmax;
          }
        }
      } else if (!kFourBit && leaf.quantized) {
#pragma unroll
        for (int m = 0; m < kMoments; ++m) {
          // Bit patterns of non-negative floats order as their values and NaN
          // patterns sit above infinity: an integer max is the absmax, NaN if
          // the block holds one, as on the CPU.
          unsigned largest = 0;
          if (full_lane) {
#pragma unroll
            for (int i = 0; i < kElementsPerLane; ++i) {
              largest = max(largest, FloatBits(moments[m][i]) & 0x7fffffffu);
            }
          } else {
            for (int i = 0; i < count; ++i) {
              largest = max(largest, FloatBits(moments[m][i]) & 0x7fffffffu);
            }
          }
          largest = __reduce_max_sync(0xffffffffu, largest);
          const float absmax = BitsToFloat(largest);
          const float inverse = InverseScale(absmax);
          uint8_t c[kElementsPerLane] = {};
          if constexpr (!kFourBit) {  // `tables`: FiniteCodeTables
            if (largest < 0x7f800000u) {  // a finite absmax: |x| <= 1 + 2^-23
              const FiniteCodeTables& t = tables[Optimizer::IsSigned(m) ? 0 : 1];
#pragma unroll
              for (int i = 0; i < kElementsPerLane; ++i) {
                c[i] = EncodeFinite(t, moments[m][i] * inverse);
              }
            } else {
              const QuantTables& t = g_tables[Optimizer::IsSigned(m) ? 0 : 1];
#pragma unroll
              for (int i = 0; i < kElementsPerLane; ++i) {
                c[i] = Encode(t, moments[m][i] * inverse);
              }
            }
          }
          uint8_t* codes = static_cast<uint8_t*>(leaf.state[m]) + first;
          if (full_lane) {
            *reinterpret_cast<uint2*>(codes) = *reinterpret_cast<const uint2*>(c);
          } else {
            for (int i = 0; i < count; ++i) codes[i] = c[i];
          }
          if constexpr (decltype(in_run)::value) {
            if (lane == slot) run_absmax[m] = absmax;
          } else if (lane == 0) {
            leaf.absmax[m][local_block] = absmax;
          }
        }
      } else {
#pragma unroll
        for (int m = 0; m < kMoments; ++m) {
          float* values = static_cast<float*>(leaf.state[m]) + first;
          if (full_lane) {
            StoreVec(values, *reinterpret_cast<const Vec8<float>*>(moments[m]));
          } else {
            for (int i = 0; i < count; ++i) values[i] = moments[m][i];
          }
        }
      }
    };
    if constexpr (kTiered) {
      update_lane(count == kElementsPerLane);
    } else if (count == kElementsPerLane) {
      update_lane(std::true_type{});
    } else {
      update_lane(std::false_type{});
    }
  };

  if constexpr (!kTiered) {
    // Every leaf on the device: a run is a block (its own kernel, so that
    // its registers hold none of the host runs' bookkeeping).
    // A warp's runs increase, so its leaf only moves forward: a cursor
    // instead of a binary search over the leaves per block (~10 thread
    // instructions a parameter at 168 leaves).
    //
    // The first seven eighths of each warp's share in a grid stride, the
    // rest from the counter, kTailGrab runs a take: a static split leaves
    // the warps of slower SMs finishing last (a tail), while a counter for
    // every run is held up by its own atomics.
    const int64_t fixed = args.total_runs / warps * 7 / 8 * warps;
    int leaf_index = 0;
    auto update_run = [&](int64_t run) {
      while (leaf_index + 1 < args.num_leaves &&
             args.leaves[leaf_index + 1].first_run <= run) {
        ++leaf_index;
      }
      const LeafArgs& leaf = args.leaves[leaf_index];
      update_block(std::false_type{}, leaf, run - leaf.first_run, 0);
    };
    auto take = [&] {
      unsigned int next = 0;
      if (lane == 0) next = atomicAdd(args.next_run, static_cast<unsigned int>(kTailGrab));
      return fixed + static_cast<int64_t>(__shfl_sync(0xffffffffu, next, 0));
    };
    // One loop over both phases, so that the update's body is compiled once.
    int left = 0;  // runs of the last take after `run`
    int64_t run = warp;
    if (run >= fixed) {
      run = take();
      left = kTailGrab - 1;
    }
    // A warp's runs increase from its first one (the counter's too, and
    // they all come after the stride's).
    if (run < args.total_runs) leaf_index = FindLeaf(args, run);
    while (run < args.total_runs) {
      update_run(run);
      if (left > 0) {
        --left;
        ++run;
      } else if (run + warps < fixed) {
        run += warps;
      } else {
        run = take();
        left = kTailGrab - 1;
      }
    }
  } else {
    // Each warp takes every warps-th device run and every warps-th host run,
    // and interleaves its two shares evenly (a Bresenham spread), so that
    // every warp keeps both the link and HBM busy. One schedule over all runs
    // would alias with the grid stride: at some budgets every host run falls
    // to the same few warps, and the link idles.
    // 32-bit counters (a warp's runs fit), to keep the registers for the
    // update: every 64-bit value live across the loop costs two.
    const int64_t device_runs = args.total_runs - args.host_runs;
    const int own_device = static_cast<int>(
        warp < device_runs ? (device_runs - warp + warps - 1) / warps : 0);
    const int own_host = static_cast<int>(
        warp < args.host_runs ? (args.host_runs - warp + warps - 1) / warps
                              : 0);
    const int steps = own_device + own_host;
    int host_done = 0;
    for (int step = 0; step < steps; ++step) {
      const bool host =
          own_device == 0 ||
          (own_host != 0 &&
           static_cast<int>((static_cast<int64_t>(step) + 1) * own_host /
                            steps) > host_done);
      const int64_t run =
          host ? args.total_runs - args.host_runs + warp + host_done++ * warps
               : warp + static_cast<int64_t>(step - host_done) * warps;
      const int leaf_index = FindLeaf(args, run);
      const LeafArgs& leaf = args.leaves[leaf_index];
      const int64_t run_first = (run - leaf.first_run) * leaf.run_blocks;
      const int run_length = static_cast<int>(
          min(int64_t{leaf.run_blocks}, leaf.num_blocks - run_first));
      if (leaf.run_blocks == 1) {
        update_block(std::false_type{}, leaf, run_first, 0);
        continue;
      }
      const bool runs_absmax = leaf.quantized && !refused;
#pragma unroll
      for (int m = 0; m < kMoments; ++m) {
        run_absmax[m] = runs_absmax && lane < run_length
                            ? leaf.absmax[m][run_first + lane]
                            : 0.0f;
      }
      for (int b = 0; b < run_length; ++b) {
        // Opaque to the compiler, so that the leaf's fields are read again
        // for each block instead of held in registers across the run.
        int index = leaf_index;
        asm volatile("" : "+r"(index));
        update_block(std::true_type{}, args.leaves[index], run_first + b, b);
      }
      if (runs_absmax && lane < run_length) {
#pragma unroll
        for (int m = 0; m < kMoments; ++m) {
          leaf.absmax[m][run_first + lane] = run_absmax[m];
        }
      }
    }
  }

}

// __device__ globals exist once per GPU, so each GPU gets its own copy of
// the tables (a copy made on GPU 0 leaves GPU 1's zero) and its own SM
// count. Handlers run with their device current.
constexpr int kMaxDevices = 64;

cudaError_t EnsureDeviceTables(int device) {
  static std::mutex mutex;
  static std::array<bool, kMaxDevices> copied{};
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mutex);
  if (copied[device]) return cudaSuccess;
  const QuantTables host[4] = {SignedTables(), UnsignedTables(),
                               SignedFourBitTables(), UnsignedTables()};
  cudaError_t status = cudaMemcpyToSymbol(g_tables, host, sizeof(host));
  if (status == cudaSuccess) {
    const FiniteCodeTables finite[4] = {
        SignedFiniteCodeTables(), UnsignedFiniteCodeTables(),
        SignedFourBitFiniteCodeTables(), UnsignedFiniteCodeTables()};
    status = cudaMemcpyToSymbol(g_finite_tables, finite, sizeof(finite));
  }
  copied[device] = status == cudaSuccess;
  return status;
}

int MultiprocessorCount(int device) {
  static std::array<std::atomic<int>, kMaxDevices> counts{};
  if (device < 0 || device >= kMaxDevices) return 1;
  int count = counts[device].load();
  if (count == 0) {
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    count = count > 0 ? count : 1;
    counts[device].store(count);
  }
  return count;
}

// One launch of the kernel compiled for (tiers, code width, master weights)
// over `runs` runs: a warp a run, at most one wave of blocks.
template <typename Optimizer, typename T, int kCorrectionBits>
void Launch(bool tiered, bool four_bit, int64_t runs, int device,
            cudaStream_t stream, const LaunchArgs& launch,
            const float* hyperparams) {
  using Shape = LaunchShape<Optimizer, kCorrectionBits>;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kWarpsPerBlock = kThreads / kWarpSize;
  const int grid = static_cast<int>(std::min<int64_t>(
      (runs + kWarpsPerBlock - 1) / kWarpsPerBlock,
      static_cast<int64_t>(MultiprocessorCount(device)) *
          Shape::kBlocksPerMultiprocessor));
  if (!tiered &&
      cudaMemsetAsync(launch.next_run, 0, sizeof(unsigned int), stream) !=
          cudaSuccess) {
    return;  // the caller's cudaGetLastError reports it
  }
  if constexpr (kFourBitStatesOf<Optimizer>) {
    if (four_bit) {
      if (tiered) {
        UpdateKernel<Optimizer, T, true, true, kCorrectionBits>
            <<<grid, kThreads, 0, stream>>>(launch, hyperparams);
      } else {
        UpdateKernel<Optimizer, T, false, true, kCorrectionBits>
            <<<grid, kThreads, 0, stream>>>(launch, hyperparams);
      }
      return;
    }
  }
  if (tiered) {
    UpdateKernel<Optimizer, T, true, false, kCorrectionBits>
        <<<grid, kThreads, 0, stream>>>(launch, hyperparams);
  } else {
    UpdateKernel<Optimizer, T, false, false, kCorrectionBits>
        <<<grid, kThreads, 0, stream>>>(launch, hyperparams);
  }
}

template <typename Optimizer, typename T>
ffi::Error LaunchGroup(cudaStream_t stream, int device,
                       const float* hyperparams, const int32_t* position,
                       ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                       StateEntry& entry,
                       ffi::Span<const int64_t> leaf_indices,
                       int output_mode, ffi::ScratchAllocator& scratch) {
  // Every launch is planned, checked and given its run counter before the
  // first one starts, so that a refused call leaves the state as it was
  // (a step with more than kMaxLeavesPerLaunch leaves takes several).
  struct PlannedLaunch {
    std::unique_ptr<LaunchArgs> args;
    bool four_bit;
    int correction_bits;
  };
  std::vector<PlannedLaunch> planned;
  const size_t count = leaf_indices.size();
  for (size_t start = 0; start < count; start += kMaxLeavesPerLaunch) {
    const size_t stop = std::min(count, start + kMaxLeavesPerLaunch);
    auto launch = std::make_unique<LaunchArgs>();
    launch->output_mode = output_mode;
    launch->position = position;
    launch->expected_position = entry.placement().position;
    launch->status = entry.status();
    launch->stamps = entry.stamps();
    int64_t runs = 0;
    int64_t device_runs = 0;
    int num_leaves = 0;
    bool four_bit = false;
    int correction_bits = -1;  // of the launch's leaves (all alike)
    // Device-tier leaves in the first pass, host-tier leaves in the second.
    for (const bool host_pass : {false, true}) {
      if (host_pass) device_runs = runs;
      for (size_t k = start; k < stop; ++k) {
        const LeafState& state = entry.leaves()[leaf_indices[k]];
        if (state.size == 0 || (state.tier == Tier::kManagedHost) != host_pass) {
          continue;
        }
        LeafArgs& leaf = launch->leaves[num_leaves++];
        leaf.grad = args.get<ffi::AnyBuffer>(k).value().untyped_data();
        leaf.param = args.get<ffi::AnyBuffer>(count + k).value().untyped_data();
        leaf.out = rets.get<ffi::AnyBuffer>(k).value()->untyped_data();
        for (int m = 0; m < kMaxMoments; ++m) {
          leaf.state[m] = state.quantized
                              ? static_cast<void*>(state.moments[m].codes)
                              : static_cast<void*>(state.moments[m].values);
          leaf.absmax[m] = state.moments[m].absmax;
        }
        leaf.size = state.size;
        // A warp's 256 elements are two 4-bit blocks; 4-bit leaves take no
        // host runs (a run's absmax are one a lane), so their host tier
        // moves each absmax on its own.
        four_bit = four_bit || state.four_bit;
        leaf.num_blocks = state.four_bit
                              ? (state.size + kBlockSize - 1) / kBlockSize
                              : state.num_blocks;
        leaf.run_blocks = host_pass && !state.four_bit ? kHostRunBlocks : 1;
        leaf.first_run = runs;
        leaf.quantized = state.quantized ? 1 : 0;
        leaf.decay = state.decay ? 1 : 0;
        leaf.id = static_cast<uint32_t>(leaf_indices[k]);
        leaf.index_offset = state.index_offset;
        leaf.correction = state.correction;
        leaf.fingerprints = state.fingerprints;
        if (correction_bits < 0) correction_bits = state.correction_bits;
        if (state.correction_bits != correction_bits) {
          return ffi::Error::InvalidArgument(
              std::string(Optimizer::kName) +
              ": leaves of one dtype group must all keep master weights of "
              "one width, or none");
        }
        runs += (leaf.num_blocks + leaf.run_blocks - 1) / leaf.run_blocks;
      }
    }
    if (num_leaves == 0) continue;
    launch->num_leaves = num_leaves;
    launch->total_runs = runs;
    launch->host_runs = runs - device_runs;
    if (four_bit && !kFourBitStatesOf<Optimizer>) {
      return ffi::Error::InvalidArgument(
          std::string(Optimizer::kName) + " has no 4-bit kernels");
    }
    planned.push_back({std::move(launch), four_bit, correction_bits});
  }
  if (planned.empty()) return ffi::Error::Success();
  std::optional<void*> counters =
      scratch.Allocate(planned.size() * sizeof(unsigned int),
                       alignof(unsigned int));
  if (!counters.has_value()) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(Optimizer::kName) +
                          ": no scratch memory for the launches' run counters");
  }
  for (size_t k = 0; k < planned.size(); ++k) {
    LaunchArgs& launch = *planned[k].args;
    const bool four_bit = planned[k].four_bit;
    const int correction_bits = planned[k].correction_bits;
    const int64_t runs = launch.total_runs;
    launch.launch = entry.NextLaunch();
    launch.next_run = static_cast<unsigned int*>(*counters) + k;
    const bool tiered = launch.host_runs != 0;
    if constexpr (std::is_same_v<T, float>) {
      Launch<Optimizer, T, 0>(tiered, four_bit, runs, device, stream,
                              launch, hyperparams);
    } else if (correction_bits == 8) {
      Launch<Optimizer, T, 8>(tiered, four_bit, runs, device, stream,
                              launch, hyperparams);
    } else if (correction_bits == 16) {
      Launch<Optimizer, T, 16>(tiered, four_bit, runs, device, stream,
                               launch, hyperparams);
    } else {
      Launch<Optimizer, T, 0>(tiered, four_bit, runs, device, stream,
                              launch, hyperparams);
    }
    if (cudaError_t status = cudaGetLastError(); status != cudaSuccess) {
      return ffi::Error::Internal(std::string("optax_paged kernel launch: ") +
                                  cudaGetErrorString(status));
    }
  }
  return ffi::Error::Success();
}

template <typename Optimizer>
ffi::Error UpdateImpl(cudaStream_t stream, int32_t ordinal,
                      ffi::Buffer<ffi::F32> hyperparams,
                      ffi::Buffer<ffi::S32> position,
                      ffi::RemainingArgs args, ffi::RemainingRets rets,
                      int64_t state_id, ffi::Span<const int64_t> leaf_indices,
                      int64_t output_mode, std::string_view name,
                      ffi::ScratchAllocator& scratch) {
  if (position.element_count() != 1) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": position must be one int32");
  }
  return DispatchUpdate<Optimizer>(
      name, Platform::kCuda, state_id, ordinal, /*host_position=*/nullptr,
      /*host_hyperparams=*/nullptr, hyperparams.element_count(), args, rets,
      leaf_indices, [&](auto tag, StateEntry& entry) {
        using T = typename decltype(tag)::type;
        if (cudaError_t status = EnsureDeviceTables(ordinal);
            status != cudaSuccess) {
          return ffi::Error::Internal(std::string(name) + ": copying tables: " +
                                      cudaGetErrorString(status));
        }
        return LaunchGroup<Optimizer, T>(
            stream, ordinal, hyperparams.typed_data(), position.typed_data(),
            args, rets, entry, leaf_indices, static_cast<int>(output_mode),
            scratch);
      });
}

__global__ void WriteOrdinalKernel(int32_t* out, int32_t ordinal) {
  *out = ordinal;
}

}  // namespace

// Not command-buffer compatible: each call looks the state up in the
// registry on the host, which a replayed CUDA graph would skip.
#define OPTAX_PAGED_CUDA_HANDLER(Optimizer)                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                           \
      k##Optimizer##UpdateCuda,                                            \
      ([](cudaStream_t stream, int32_t ordinal,                            \
          ffi::ScratchAllocator scratch,                                   \
          ffi::Buffer<ffi::F32> hyperparams, ffi::Buffer<ffi::S32> position, \
          ffi::RemainingArgs args, ffi::RemainingRets rets,                \
          int64_t state_id, ffi::Span<const int64_t> leaf_indices,         \
          int64_t output_mode) {                                           \
        return UpdateImpl<Optimizer>(stream, ordinal, hyperparams,         \
                                     position, args, rets, state_id,       \
                                     leaf_indices, output_mode,            \
                                     TargetName<Optimizer>(), scratch);    \
      }),                                                                  \
      ffi::Ffi::Bind()                                                     \
          .Ctx<ffi::PlatformStream<cudaStream_t>>()  /* XLA's stream */    \
          .Ctx<ffi::DeviceOrdinal>()                 /* this GPU */        \
          .Ctx<ffi::ScratchAllocator>()              /* run counters */    \
          .Arg<ffi::Buffer<ffi::F32>>()              /* hyperparams */     \
          .Arg<ffi::Buffer<ffi::S32>>()              /* mesh position */   \
          .RemainingArgs()                           /* grads, params */   \
          .RemainingRets()                           /* updates/params */  \
          .Attr<int64_t>("state_id")                 /* registry entry */  \
          .Attr<ffi::Span<const int64_t>>("leaf_indices")                  \
          .Attr<int64_t>("output_mode"));            /* OutputMode */

OPTAX_PAGED_OPTIMIZERS(OPTAX_PAGED_CUDA_HANDLER)

// The device ordinal this handler sees (see kDeviceOrdinalCpu).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kDeviceOrdinalCuda,
    ([](cudaStream_t stream, int32_t ordinal, ffi::Buffer<ffi::S32> pin,
        ffi::Result<ffi::Buffer<ffi::S32>> out) {
      (void)pin;
      WriteOrdinalKernel<<<1, 1, 0, stream>>>(out->typed_data(), ordinal);
      if (cudaError_t status = cudaGetLastError(); status != cudaSuccess) {
        return ffi::Error::Internal(std::string("optax_paged device probe: ") +
                                    cudaGetErrorString(status));
      }
      return ffi::Error::Success();
    }),
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  /* XLA's stream */
        .Ctx<ffi::DeviceOrdinal>()                 /* this GPU */
        .Arg<ffi::Buffer<ffi::S32>>()              /* places the call */
        .Ret<ffi::Buffer<ffi::S32>>())             /* the ordinal */;

}  // namespace optax_paged
