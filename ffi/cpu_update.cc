// CPU FFI handler: one call updates every leaf of a dtype group in place.
//
// Operands: the hyperparameter vector, then the gradients, then the
// parameters of the group's leaves. Results: the updates, written over the
// gradients (or, with `output_mode`, the new parameters, written over the
// parameters); XLA aliases them. The moments live in the registry
// entry named by the `state_id` attribute. Work is split into chunks of
// blocks spread over XLA's intra-op thread pool; the calling thread works
// too, so the call finishes even when the pool is busy.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_codec.h"
#include "cpu_update.h"
#include "element_types.h"
#include "master_weights.h"
#include "optimizer_math.h"
#include "quantization.h"
#include "state_registry.h"
#include "update_validation.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace optax_paged {

namespace {

constexpr int64_t kChunkBlocks = 64;            // 16384 elements per task
constexpr int64_t kSingleThreadElements = 1 << 18;

struct Chunk {
  int leaf;           // position within the group
  int64_t first_block;
  int64_t last_block;  // exclusive
};

// A float's magnitude as its bit pattern, sign cleared: non-negative
// floats order as these do (NaN above infinity), so their max is the block
// absmax of BlockAbsmax. Signed, so that the max reductions vectorize
// without SSE4.1's unsigned max.
inline int32_t MagnitudeBits(float x) {
  return static_cast<int32_t>(FloatBits(x) & 0x7fffffffu);
}

template <typename Optimizer, typename T>
struct GroupStep {
  typename Optimizer::Scalars scalars;
  std::vector<const LeafState*> leaves;
  std::vector<const T*> grads;
  std::vector<const T*> params;
  std::vector<T*> outputs;
  std::vector<uint32_t> leaf_ids;  // registry index of each leaf, for random bits
  std::vector<int64_t> index_offsets;  // first element's index in the leaf
  int output_mode;
  uint32_t seed;

  void RunChunk(const Chunk& chunk) const {
    const LeafState& leaf = *leaves[chunk.leaf];
    for (int64_t block = chunk.first_block; block < chunk.last_block; ++block) {
      if (block + 2 < chunk.last_block) Prefetch(leaf, chunk.leaf, block + 2);
      if (leaf.four_bit) {
        FourBitBlock(leaf, chunk.leaf, block);
      } else if (leaf.quantized) {
        QuantizedBlock(leaf, chunk.leaf, block);
      } else {
        FullPrecisionBlock(leaf, chunk.leaf, block);
      }
    }
  }

  // Asks for a block's operands and moments two blocks ahead of its loads,
  // into L2 (prefetcht2): without it each block's first loads waited on
  // memory (perf, 2-core AMD EPYC Zen 4: 30% of the fused step in the
  // copies of the gradients and parameters, 2.76 -> 2.17 ns a parameter on
  // one core; into L1 or one block ahead 2.3-2.4). Inlined by force: GCC
  // finds a function of nothing but prefetches free of side effects and
  // drops the calls.
  __attribute__((always_inline)) inline void Prefetch(
      const LeafState& leaf, int leaf_index, int64_t block) const {
    const int64_t block_size = leaf.four_bit ? kFourBitBlockSize : kBlockSize;
    const int64_t begin = block * block_size;
    const int64_t length = std::min<int64_t>(block_size, leaf.size - begin);
    PrefetchBytes(grads[leaf_index] + begin, length * sizeof(T));
    PrefetchBytes(params[leaf_index] + begin, length * sizeof(T));
    for (int m = 0; m < Optimizer::kNumMoments; ++m) {
      const MomentBuffers& moment = leaf.moments[m];
      if (!leaf.quantized) {
        PrefetchBytes(moment.values + begin, length * sizeof(float));
      } else if (leaf.four_bit) {
        PrefetchBytes(moment.codes + begin / 2, (length + 1) / 2);
      } else {
        PrefetchBytes(moment.codes + begin, length);
      }
    }
    if (leaf.correction_bits != 0) {
      PrefetchBytes(static_cast<const char*>(leaf.correction) +
                        begin * (leaf.correction_bits / 8),
                    length * (leaf.correction_bits / 8));
    }
  }

  __attribute__((always_inline)) static inline void PrefetchBytes(
      const void* start, int64_t bytes) {
    const char* p = static_cast<const char*>(start);
    for (int64_t offset = 0; offset < bytes; offset += 64) {
      __builtin_prefetch(p + offset, 0, 1);
    }
  }

  // Runs the element maths over one block whose moments are in `moments`,
  // writing the updates (or new parameters) and the new moments back there,
  // and each new moment's largest magnitude as a bit pattern into
  // `largest` (the block absmax, made in the update loop: a pass over the
  // block fewer).
  void UpdateBlock(int leaf_index, bool decay, int64_t begin, int64_t length,
                   float (*moments)[kBlockSize], uint32_t* largest) const {
#if defined(__x86_64__) && defined(__GNUC__)
    if (HasAvx2()) {
      UpdateBlockAvx2(leaf_index, decay, begin, length, moments, largest);
      return;
    }
#endif
    UpdateBlockBody(leaf_index, decay, begin, length, moments, largest);
  }

#if defined(__x86_64__) && defined(__GNUC__)
  __attribute__((target("avx2"))) void UpdateBlockAvx2(
      int leaf_index, bool decay, int64_t begin, int64_t length,
      float (*moments)[kBlockSize], uint32_t* largest) const {
    UpdateBlockBody(leaf_index, decay, begin, length, moments, largest);
  }
#endif

  // One block's optimizer step on float operands, shared by the plain and
  // the master-weight bodies (their arithmetic must stay the same): the
  // moments in place, the update out, and each moment's largest magnitude
  // (as bits: a max that vectorizes).
  __attribute__((always_inline)) static inline void StepMoments(
      const typename Optimizer::Scalars& s, const float* __restrict grad,
      const float* __restrict param, bool decay, int64_t length,
      float (*moments)[kBlockSize], float* __restrict update,
      uint32_t* largest) {
    constexpr int kMoments = Optimizer::kNumMoments;
    int32_t magnitude[kMoments] = {};
    for (int64_t i = 0; i < length; ++i) {
      float element[kMoments];
      for (int m = 0; m < kMoments; ++m) element[m] = moments[m][i];
      update[i] = Optimizer::Update(s, grad[i], param[i], decay, element);
      for (int m = 0; m < kMoments; ++m) {
        moments[m][i] = element[m];
        magnitude[m] = std::max(magnitude[m], MagnitudeBits(element[m]));
      }
    }
    for (int m = 0; m < kMoments; ++m) largest[m] = magnitude[m];
  }

  __attribute__((always_inline)) inline void UpdateBlockBody(
      int leaf_index, bool decay, int64_t begin, int64_t length,
      float (*moments)[kBlockSize], uint32_t* largest) const {
    if constexpr (!std::is_same_v<T, float>) {
      const LeafState& leaf = *leaves[leaf_index];
      if (leaf.correction_bits == 8) {
        return MasterBlockBody<int8_t>(leaf, leaf_index, decay, begin, length,
                                       moments, largest);
      }
      if (leaf.correction_bits == 16) {
        return MasterBlockBody<int16_t>(leaf, leaf_index, decay, begin,
                                        length, moments, largest);
      }
    }
    // `out` may alias `g` or `p` (the call writes its results over them):
    // the parameters are copied into a local array first (the gradients
    // too, unless already float) and the results written after, so that
    // the update loop sees no aliasing and vectorizes (the same
    // operations, so the same bits).
    const T* g = grads[leaf_index] + begin;
    const T* p = params[leaf_index] + begin;
    T* out = outputs[leaf_index] + begin;
    float grad_copy[kBlockSize], param[kBlockSize], update[kBlockSize];
    for (int64_t i = 0; i < length; ++i) {
      if constexpr (!std::is_same_v<T, float>) grad_copy[i] = ToFloat(g[i]);
      param[i] = ToFloat(p[i]);
    }
    const typename Optimizer::Scalars s = scalars;
    {
      // Float gradients are read where they are (a copy fewer: -5% of the
      // block's time on one core of the Zen 4, gradients in DRAM); nothing
      // writes them in this scope, as __restrict promises.
      const float* __restrict grad;
      if constexpr (std::is_same_v<T, float>) {
        grad = g;
      } else {
        grad = grad_copy;
      }
      StepMoments(s, grad, param, decay, length, moments, update, largest);
    }
    if (output_mode == kOutputParamsStochastic) {
      for (int64_t i = 0; i < length; ++i) {
        const uint32_t random = RandomBits(
            seed, leaf_ids[leaf_index],
            static_cast<uint64_t>(index_offsets[leaf_index] + begin + i));
        out[i] = OutputValue<T>(output_mode, param[i], update[i], random);
      }
    } else {
      for (int64_t i = 0; i < length; ++i) {
        out[i] = OutputValue<T>(output_mode, param[i], update[i], 0u);
      }
    }
  }

  // The update from master weights (master_weights.h): the master is
  // decoded from the parameter and its correction, unless the block's
  // parameters are not those the correction was written for; the result
  // is what update + apply_updates (or the fused step) makes of the new
  // master, and the correction is written against exactly that parameter.
  template <typename Correction>
  __attribute__((always_inline)) inline void MasterBlockBody(
      const LeafState& leaf, int leaf_index, bool decay, int64_t begin,
      int64_t length, float (*moments)[kBlockSize], uint32_t* largest) const {
    constexpr int kBits = 8 * sizeof(Correction);
    Correction* correction = static_cast<Correction*>(leaf.correction) + begin;
    const T* g = grads[leaf_index] + begin;
    const T* p = params[leaf_index] + begin;
    T* out = outputs[leaf_index] + begin;
    float grad[kBlockSize];
    T param[kBlockSize];
    int32_t offset[kBlockSize];
    for (int64_t i = 0; i < length; ++i) {
      grad[i] = ToFloat(g[i]);
      param[i] = p[i];
      offset[i] = correction[i];
    }
    for (int64_t first = 0; first < length; first += kMasterBlockSize) {
      const int64_t end = std::min<int64_t>(first + kMasterBlockSize, length);
      uint32_t fingerprint = 0;
      int32_t corrected = 0;  // | rather than ||: no branch, a reduction
      for (int64_t i = first; i < end; ++i) {
        fingerprint += FingerprintTerm(Bits16(param[i]),
                                       static_cast<int>(i - first));
        corrected |= offset[i];
      }
      const int64_t block = (begin + first) / kMasterBlockSize;
      if (fingerprint != leaf.fingerprints[block] && corrected != 0) {
        std::fill(offset + first, offset + end, 0);
        __atomic_fetch_add(&leaf.fingerprints[leaf.num_master_blocks], 1u,
                           __ATOMIC_RELAXED);
      }
    }
    // Three loops, each simple enough to vectorize: decode, update, step.
    float master[kBlockSize], update[kBlockSize];
    for (int64_t i = 0; i < length; ++i) {
      master[i] = DecodeMaster<kBits>(param[i], offset[i]);
    }
    const typename Optimizer::Scalars s = scalars;
    StepMoments(s, grad, master, decay, length, moments, update, largest);
    // Bit patterns, not T: a loop storing two structs a step does not
    // vectorize.
    uint16_t result[kBlockSize], written[kBlockSize];
    for (int64_t i = 0; i < length; ++i) {
      const float new_master = AddRounded(master[i], update[i]);
      const MasterStep<T> step = StepToMaster(param[i], new_master);
      result[i] = Bits16(step.update);
      written[i] = Bits16(step.param);
      offset[i] = EncodeCorrection<kBits>(new_master, step.param);
    }
    const uint16_t* chosen = output_mode == kOutputUpdates ? result : written;
    for (int64_t first = 0; first < length; first += kMasterBlockSize) {
      const int64_t end = std::min<int64_t>(first + kMasterBlockSize, length);
      uint32_t fingerprint = 0;
      for (int64_t i = first; i < end; ++i) {
        fingerprint += FingerprintTerm(written[i],
                                       static_cast<int>(i - first));
      }
      leaf.fingerprints[(begin + first) / kMasterBlockSize] = fingerprint;
    }
    for (int64_t i = 0; i < length; ++i) {
      out[i] = FromBits16<T>(chosen[i]);
      correction[i] = static_cast<Correction>(offset[i]);
    }
  }

  // Decode, update, then re-encode against the block's new absmax. Separate
  // passes over the block keep each loop simple enough to vectorize.
  void QuantizedBlock(const LeafState& leaf, int leaf_index,
                      int64_t block) const {
    constexpr int kMoments = Optimizer::kNumMoments;
    const int64_t begin = block * kBlockSize;
    const int64_t length = std::min<int64_t>(kBlockSize, leaf.size - begin);
    float moments[kMoments][kBlockSize];
    for (int m = 0; m < kMoments; ++m) {
      DecodeBlock(TablesOf(m), leaf.moments[m].codes + begin,
                  leaf.moments[m].absmax[block], length, moments[m]);
    }
    uint32_t largest[kMoments];
    UpdateBlock(leaf_index, leaf.decay, begin, length, moments, largest);
    for (int m = 0; m < kMoments; ++m) {
      const float absmax = BitsToFloat(largest[m]);
      EncodeBlock(TablesOf(m), moments[m], InverseScale(absmax), length,
                  leaf.moments[m].codes + begin);
      leaf.moments[m].absmax[block] = absmax;
    }
  }

  // The same for 4-bit moments, in blocks of 128.
  void FourBitBlock(const LeafState& leaf, int leaf_index,
                    int64_t block) const {
    constexpr int kMoments = Optimizer::kNumMoments;
    const FourBitCodec& codec = CpuFourBitCodec();
    const int64_t begin = block * kFourBitBlockSize;
    const int64_t length =
        std::min<int64_t>(kFourBitBlockSize, leaf.size - begin);
    float moments[kMoments][kBlockSize];
    for (int m = 0; m < kMoments; ++m) {
      codec.decode(Optimizer::IsSigned(m), leaf.moments[m].codes + begin / 2,
                   leaf.moments[m].absmax[block], length, moments[m]);
    }
    uint32_t largest[kMoments];
    UpdateBlock(leaf_index, leaf.decay, begin, length, moments, largest);
    for (int m = 0; m < kMoments; ++m) {
      const float absmax = BitsToFloat(largest[m]);
      uint8_t* codes = leaf.moments[m].codes + begin / 2;
      if (kStochasticFourBitOf<Optimizer> && Optimizer::IsSigned(m)) {
        codec.encode_stochastic(
            moments[m], InverseScale(absmax), length,
            StateRoundingKey(seed, leaf_ids[leaf_index]),
            static_cast<uint64_t>(index_offsets[leaf_index] + begin), codes);
      } else {
        codec.encode(Optimizer::IsSigned(m), moments[m], InverseScale(absmax),
                     length, codes);
      }
      leaf.moments[m].absmax[block] = absmax;
    }
  }

  void FullPrecisionBlock(const LeafState& leaf, int leaf_index,
                          int64_t block) const {
    constexpr int kMoments = Optimizer::kNumMoments;
    const int64_t begin = block * kBlockSize;
    const int64_t length = std::min<int64_t>(kBlockSize, leaf.size - begin);
    float moments[kMoments][kBlockSize];
    for (int m = 0; m < kMoments; ++m) {
      std::copy_n(leaf.moments[m].values + begin, length, moments[m]);
    }
    uint32_t largest[kMoments];
    UpdateBlock(leaf_index, leaf.decay, begin, length, moments, largest);
    for (int m = 0; m < kMoments; ++m) {
      std::copy_n(moments[m], length, leaf.moments[m].values + begin);
    }
  }

  static const QuantTables& TablesOf(int moment) {
    return Optimizer::IsSigned(moment) ? SignedTables() : UnsignedTables();
  }
};

// Shared by the calling thread and pool tasks; tasks that start after all
// chunks are taken touch nothing but this object.
struct ChunkQueue {
  std::vector<Chunk> chunks;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  template <typename Step>
  void Drain(const Step& step) {
    for (size_t i = next.fetch_add(1); i < chunks.size();
         i = next.fetch_add(1)) {
      step.RunChunk(chunks[i]);
      if (done.fetch_add(1) + 1 == chunks.size()) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }

  void Wait() {
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [this] { return done.load() == chunks.size(); });
  }
};

template <typename Optimizer, typename T>
ffi::Error RunGroup(ffi::ThreadPool& pool, const float* hyperparams,
                    ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                    const StateEntry& entry,
                    ffi::Span<const int64_t> leaf_indices, int output_mode) {
  const size_t count = leaf_indices.size();
  auto step = std::make_shared<GroupStep<Optimizer, T>>();
  step->scalars = Optimizer::Load(hyperparams);
  step->output_mode = output_mode;
  step->seed = FloatBits(hyperparams[kSeedIndex]);
  auto queue = std::make_shared<ChunkQueue>();
  int64_t total_elements = 0;
  for (size_t k = 0; k < count; ++k) {
    const LeafState& leaf = entry.leaves()[leaf_indices[k]];
    step->leaves.push_back(&leaf);
    step->leaf_ids.push_back(static_cast<uint32_t>(leaf_indices[k]));
    step->index_offsets.push_back(leaf.index_offset);
    step->grads.push_back(static_cast<const T*>(
        args.get<ffi::AnyBuffer>(k).value().untyped_data()));
    step->params.push_back(static_cast<const T*>(
        args.get<ffi::AnyBuffer>(count + k).value().untyped_data()));
    step->outputs.push_back(static_cast<T*>(
        rets.get<ffi::AnyBuffer>(k).value()->untyped_data()));
    for (int64_t b = 0; b < leaf.num_blocks; b += kChunkBlocks) {
      queue->chunks.push_back(Chunk{static_cast<int>(k), b,
                                    std::min(b + kChunkBlocks, leaf.num_blocks)});
    }
    total_elements += leaf.size;
  }
  if (queue->chunks.empty()) return ffi::Error::Success();
  const int64_t helpers =
      total_elements < kSingleThreadElements
          ? 0
          : std::min<int64_t>(pool.num_threads(),
                              static_cast<int64_t>(queue->chunks.size()) - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([queue, step] { queue->Drain(*step); });
  }
  queue->Drain(*step);
  queue->Wait();
  return ffi::Error::Success();
}

template <typename Optimizer>
ffi::Error UpdateImpl(ffi::ThreadPool pool, int32_t ordinal,
                      ffi::Buffer<ffi::F32> hyperparams,
                      ffi::Buffer<ffi::S32> position,
                      ffi::RemainingArgs args, ffi::RemainingRets rets,
                      int64_t state_id, ffi::Span<const int64_t> leaf_indices,
                      int64_t output_mode, std::string_view name) {
  if (position.element_count() != 1) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": position must be one int32");
  }
  return DispatchUpdate<Optimizer>(
      name, Platform::kCpu, state_id, ordinal, position.typed_data(),
      hyperparams.typed_data(), hyperparams.element_count(), args, rets,
      leaf_indices, [&](auto tag, const StateEntry& entry) {
        using T = typename decltype(tag)::type;
        return RunGroup<Optimizer, T>(pool, hyperparams.typed_data(), args,
                                      rets, entry, leaf_indices,
                                      static_cast<int>(output_mode));
      });
}

}  // namespace

// One handler per optimizer of the table; all share the binding below.
#define OPTAX_PAGED_CPU_HANDLER(Optimizer)                                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                           \
      k##Optimizer##UpdateCpu,                                             \
      ([](ffi::ThreadPool pool, int32_t ordinal,                           \
          ffi::Buffer<ffi::F32> hyperparams, ffi::Buffer<ffi::S32> position, \
          ffi::RemainingArgs args, ffi::RemainingRets rets,                \
          int64_t state_id, ffi::Span<const int64_t> leaf_indices,         \
          int64_t output_mode) {                                           \
        return UpdateImpl<Optimizer>(pool, ordinal, hyperparams, position, \
                                     args, rets, state_id, leaf_indices,   \
                                     output_mode,                          \
                                     TargetName<Optimizer>());             \
      }),                                                                  \
      ffi::Ffi::Bind()                                                     \
          .Ctx<ffi::ThreadPool>()                    /* intra-op pool */   \
          .Ctx<ffi::DeviceOrdinal>()                 /* this device */     \
          .Arg<ffi::Buffer<ffi::F32>>()              /* hyperparams */     \
          .Arg<ffi::Buffer<ffi::S32>>()              /* mesh position */   \
          .RemainingArgs()                           /* grads, params */   \
          .RemainingRets()                           /* updates/params */  \
          .Attr<int64_t>("state_id")                 /* registry entry */  \
          .Attr<ffi::Span<const int64_t>>("leaf_indices")                  \
          .Attr<int64_t>("output_mode"));            /* OutputMode */

OPTAX_PAGED_OPTIMIZERS(OPTAX_PAGED_CPU_HANDLER)

// The device ordinal this handler sees, so Python can learn the mapping
// from JAX devices to the ordinals the update handlers look entries up by.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kDeviceOrdinalCpu,
    ([](int32_t ordinal, ffi::Buffer<ffi::S32> pin,
        ffi::Result<ffi::Buffer<ffi::S32>> out) {
      (void)pin;
      out->typed_data()[0] = ordinal;
      return ffi::Error::Success();
    }),
    ffi::Ffi::Bind()
        .Ctx<ffi::DeviceOrdinal>()      /* this device */
        .Arg<ffi::Buffer<ffi::S32>>()   /* places the call on a device */
        .Ret<ffi::Buffer<ffi::S32>>())  /* the ordinal */;

}  // namespace optax_paged
