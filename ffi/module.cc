// The nanobind module: FFI capsules, the registry's buffer objects, the
// blockwise quantizer for Python, and a `testing` submodule of hooks for the
// tests. Thin on purpose: Python validates inputs and decides what to
// allocate; this file only converts and forwards.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_codec.h"
#include "cpu_update.h"
#include "element_types.h"
#include "quantization.h"
#include "state_memory.h"
#include "state_registry.h"
#include "state_transfer.h"

#if defined(OPTAX_PAGED_WITH_CUDA)
#include "cuda_update.h"
#endif

namespace nb = nanobind;

namespace optax_paged {
namespace {

template <typename T>
using HostArray = nb::ndarray<nb::numpy, T, nb::ndim<1>>;

template <typename T>
using InputArray = nb::ndarray<const T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// A fresh NumPy array holding a copy of `count` elements at `source`.
template <typename T>
HostArray<T> CopyToNumpy(const T* source, size_t count) {
  T* data = new T[std::max<size_t>(count, 1)];
  if (count > 0) std::memcpy(data, source, count * sizeof(T));
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return HostArray<T>(data, {count}, owner);
}

const QuantTables& TablesFor(bool is_signed) {
  return is_signed ? SignedTables() : UnsignedTables();
}

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict CpuRegistrations() {
  nb::dict targets;
#define OPTAX_PAGED_REGISTER(Optimizer) \
  targets[TargetName<Optimizer>().c_str()] = Capsule(k##Optimizer##UpdateCpu);
  OPTAX_PAGED_OPTIMIZERS(OPTAX_PAGED_REGISTER)
#undef OPTAX_PAGED_REGISTER
  targets[kDeviceOrdinalTarget] = Capsule(kDeviceOrdinalCpu);
  return targets;
}

nb::dict CudaRegistrations() {
  nb::dict targets;
#if defined(OPTAX_PAGED_WITH_CUDA)
#define OPTAX_PAGED_REGISTER(Optimizer) \
  targets[TargetName<Optimizer>().c_str()] = Capsule(k##Optimizer##UpdateCuda);
  OPTAX_PAGED_OPTIMIZERS(OPTAX_PAGED_REGISTER)
#undef OPTAX_PAGED_REGISTER
  targets[kDeviceOrdinalTarget] = Capsule(kDeviceOrdinalCuda);
#endif
  return targets;
}

// The optimizer table, for Python: name -> target, moments, maps, slots.
template <typename Optimizer>
nb::dict TableEntry() {
  nb::dict entry;
  entry["target"] = TargetName<Optimizer>();
  entry["num_moments"] = Optimizer::kNumMoments;
  nb::list signed_moments, slots;
  for (int m = 0; m < Optimizer::kNumMoments; ++m) {
    signed_moments.append(Optimizer::IsSigned(m));
  }
  for (const char* slot : Optimizer::kSlots) slots.append(slot);
  entry["signed"] = nb::tuple(signed_moments);
  entry["slots"] = nb::tuple(slots);
  entry["four_bit"] = kFourBitStatesOf<Optimizer>;
  entry["stochastic_four_bit"] = kStochasticFourBitOf<Optimizer>;
  return entry;
}

nb::dict OptimizerTable() {
  nb::dict table;
#define OPTAX_PAGED_TABLE_ENTRY(Optimizer) \
  table[Optimizer::kName] = TableEntry<Optimizer>();
  OPTAX_PAGED_OPTIMIZERS(OPTAX_PAGED_TABLE_ENTRY)
#undef OPTAX_PAGED_TABLE_ENTRY
  return table;
}

nb::tuple GpuMemoryInfo(int64_t device) {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  DeviceMemoryInfo(device, &free_bytes, &total_bytes);
  return nb::make_tuple(free_bytes, total_bytes);
}

nb::tuple QuantizeBlockwise(InputArray<float> x, bool is_signed) {
  const QuantTables& tables = TablesFor(is_signed);
  const size_t n = x.shape(0);
  const size_t blocks = (n + kBlockSize - 1) / kBlockSize;
  std::vector<uint8_t> codes(n);
  std::vector<float> absmax(blocks);
  const float* data = x.data();
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * kBlockSize;
    const size_t end = std::min(n, begin + kBlockSize);
    // The CPU kernel's block absmax and codec (vector instructions where the
    // processor has them), so the tests of this function are tests of the
    // kernel's codes.
    const float block_max =
        BlockAbsmax(data + begin, static_cast<int64_t>(end - begin));
    EncodeBlock(tables, data + begin, InverseScale(block_max),
                static_cast<int64_t>(end - begin), codes.data() + begin);
    absmax[b] = block_max;
  }
  return nb::make_tuple(CopyToNumpy(codes.data(), n),
                        CopyToNumpy(absmax.data(), blocks));
}

HostArray<float> DequantizeBlockwise(InputArray<uint8_t> codes,
                                     InputArray<float> absmax, bool is_signed) {
  const size_t n = codes.shape(0);
  const size_t blocks = (n + kBlockSize - 1) / kBlockSize;
  if (absmax.shape(0) != blocks) {
    throw std::invalid_argument(
        "dequantize_blockwise: " + std::to_string(n) + " codes need " +
        std::to_string(blocks) + " absmax values, got " +
        std::to_string(absmax.shape(0)));
  }
  const QuantTables& tables = TablesFor(is_signed);
  std::vector<float> out(n);
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * kBlockSize;
    DecodeBlock(tables, codes.data() + begin, absmax.data()[b],
                static_cast<int64_t>(std::min(n, begin + kBlockSize) - begin),
                out.data() + begin);
  }
  return CopyToNumpy(out.data(), n);
}

// Codes of `x * inverse` by the scalar Encode, or by the vector codec when
// `vector` and the processor has it: the tests compare the two exactly.
HostArray<uint8_t> EncodeScaled(InputArray<float> x, float inverse,
                                bool is_signed, bool vector) {
  const QuantTables& tables = TablesFor(is_signed);
  const size_t n = x.shape(0);
  std::vector<uint8_t> codes(n);
  if (vector && HasAvx2()) {
    EncodeBlockAvx2(tables, x.data(), inverse, static_cast<int64_t>(n),
                    codes.data());
  } else {
    for (size_t i = 0; i < n; ++i) codes[i] = Encode(tables, x.data()[i] * inverse);
  }
  return CopyToNumpy(codes.data(), n);
}

// The CPU kernel's 4-bit codec (the processor's path, capped as
// OPTAX_PAGED_CPU_ISA says) over blocks of 128 as a leaf of x.size
// elements holds them: codes and absmax, the signed codes rounded
// stochastically with `key` when `stochastic` (x[0] being element
// `first_index` of the leaf). The tests run it under each cap and compare
// the bits.
nb::tuple QuantizeFourBit(InputArray<float> x, bool is_signed,
                          bool stochastic, uint32_t key,
                          uint64_t first_index) {
  const FourBitCodec& codec = CpuFourBitCodec();
  const int64_t n = static_cast<int64_t>(x.shape(0));
  const int64_t blocks = (n + kFourBitBlockSize - 1) / kFourBitBlockSize;
  std::vector<uint8_t> codes((n + 1) / 2);
  std::vector<float> absmax(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kFourBitBlockSize;
    const int64_t length = std::min<int64_t>(kFourBitBlockSize, n - begin);
    absmax[b] = BlockAbsmax(x.data() + begin, length);
    const float inverse = InverseScale(absmax[b]);
    uint8_t* block_codes = codes.data() + begin / 2;
    if (stochastic) {
      codec.encode_stochastic(x.data() + begin, inverse, length, key,
                              first_index + static_cast<uint64_t>(begin),
                              block_codes);
    } else {
      codec.encode(is_signed, x.data() + begin, inverse, length, block_codes);
    }
  }
  return nb::make_tuple(CopyToNumpy(codes.data(), codes.size()),
                        CopyToNumpy(absmax.data(), absmax.size()));
}

// The values of a leaf of `size` elements from its 4-bit codes and absmax.
HostArray<float> DequantizeFourBit(InputArray<uint8_t> codes,
                                   InputArray<float> absmax, bool is_signed,
                                   int64_t size) {
  const int64_t blocks = (size + kFourBitBlockSize - 1) / kFourBitBlockSize;
  if (size < 0 || static_cast<int64_t>(codes.shape(0)) != (size + 1) / 2 ||
      static_cast<int64_t>(absmax.shape(0)) != blocks) {
    throw std::invalid_argument(
        "dequantize_four_bit: " + std::to_string(size) + " elements need " +
        std::to_string((size + 1) / 2) + " bytes of codes and " +
        std::to_string(blocks) + " absmax values");
  }
  const FourBitCodec& codec = CpuFourBitCodec();
  std::vector<float> out(size);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kFourBitBlockSize;
    codec.decode(is_signed, codes.data() + begin / 2, absmax.data()[b],
                 std::min<int64_t>(kFourBitBlockSize, size - begin),
                 out.data() + begin);
  }
  return CopyToNumpy(out.data(), out.size());
}

// The block absmax of the CPU kernel, by the scalar loop or the AVX2 one.
float BlockAbsmaxOf(InputArray<float> x, bool vector) {
  const int64_t n = static_cast<int64_t>(x.shape(0));
  return vector && HasAvx2() ? BlockAbsmaxAvx2(x.data(), n)
                             : BlockAbsmaxScalar(x.data(), n);
}

std::shared_ptr<StateEntry> CreateState(
    int platform, int num_moments, const std::vector<int64_t>& sizes,
    const std::vector<int>& code_bits, const std::vector<bool>& decay,
    const std::vector<int>& tiers, const std::vector<int64_t>& index_offsets,
    const std::vector<int>& correction_bits, int64_t state_id,
    int64_t ordinal, int32_t position) {
  if (code_bits.size() != sizes.size() || decay.size() != sizes.size() ||
      tiers.size() != sizes.size() || index_offsets.size() != sizes.size() ||
      correction_bits.size() != sizes.size()) {
    throw std::invalid_argument("create_state: per-leaf lists differ in length");
  }
  std::vector<LeafSpec> specs(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] < 0) throw std::invalid_argument("create_state: negative size");
    if (tiers[i] < 0 || tiers[i] > 3) {
      throw std::invalid_argument("create_state: unknown tier");
    }
    if (code_bits[i] != 0 && code_bits[i] != 8 && code_bits[i] != 4) {
      throw std::invalid_argument("create_state: code bits must be 0, 8 or 4");
    }
    if (correction_bits[i] != 0 && correction_bits[i] != 8 &&
        correction_bits[i] != 16) {
      throw std::invalid_argument(
          "create_state: correction bits must be 0, 8 or 16");
    }
    specs[i] = LeafSpec{sizes[i], code_bits[i],
                        static_cast<bool>(decay[i]), static_cast<Tier>(tiers[i]),
                        index_offsets[i], correction_bits[i]};
  }
  std::string error;
  std::shared_ptr<StateEntry> entry =
      CreateStateEntry(Placement{state_id, ordinal, position},
                       static_cast<Platform>(platform), num_moments, specs,
                       &error);
  if (entry == nullptr) throw std::runtime_error("create_state: " + error);
  return entry;
}

const LeafState& CheckedLeaf(const StateEntry& entry, int64_t leaf,
                             int64_t moment) {
  if (entry.released()) {
    throw std::runtime_error("optimizer state was released");
  }
  if (leaf < 0 || leaf >= static_cast<int64_t>(entry.leaves().size())) {
    throw std::out_of_range("leaf index " + std::to_string(leaf) +
                            " out of range");
  }
  if (moment < 0 || moment >= entry.num_moments()) {
    throw std::out_of_range("moment index " + std::to_string(moment) +
                            " out of range");
  }
  return entry.leaves()[leaf];
}

template <typename T>
HostArray<T> CopyStateOut(const LeafState& state, int64_t device,
                          const T* source, size_t count) {
  std::vector<T> host(count);
  std::string error;
  if (count > 0 &&
      !CopyStateToHost(host.data(), source, count * sizeof(T), state.tier,
                       device, &error)) {
    throw std::runtime_error("reading optimizer state: " + error);
  }
  return CopyToNumpy(host.data(), count);
}

nb::tuple ReadMoment(StateEntry& entry, int64_t leaf, int64_t moment) {
  std::unique_lock<std::shared_mutex> lock(entry.mutex());
  const LeafState& state = CheckedLeaf(entry, leaf, moment);
  const MomentBuffers& buffers = state.moments[moment];
  const size_t size = static_cast<size_t>(state.size);
  const int64_t device = entry.placement().ordinal;
  if (state.quantized) {
    return nb::make_tuple(
        CopyStateOut(state, device, buffers.codes,
                     static_cast<size_t>(CodeBytes(state))),
        CopyStateOut(state, device, buffers.absmax,
                     static_cast<size_t>(state.num_blocks)));
  }
  return nb::make_tuple(CopyStateOut(state, device, buffers.values, size),
                        nb::none());
}

void WriteMoment(StateEntry& entry, int64_t leaf, int64_t moment,
                 nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu> data,
                 nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu> absmax) {
  std::unique_lock<std::shared_mutex> lock(entry.mutex());
  const LeafState& state = CheckedLeaf(entry, leaf, moment);
  const MomentBuffers& buffers = state.moments[moment];
  const size_t data_bytes =
      state.quantized ? static_cast<size_t>(CodeBytes(state))
                      : static_cast<size_t>(state.size) * sizeof(float);
  const size_t absmax_bytes =
      state.quantized ? static_cast<size_t>(state.num_blocks) * sizeof(float) : 0;
  if (data.nbytes() != data_bytes || absmax.nbytes() != absmax_bytes) {
    throw std::invalid_argument(
        "write_moment: leaf " + std::to_string(leaf) + " moment " +
        std::to_string(moment) + " holds " + std::to_string(data_bytes) +
        " + " + std::to_string(absmax_bytes) + " bytes, got " +
        std::to_string(data.nbytes()) + " + " + std::to_string(absmax.nbytes()));
  }
  void* target = state.quantized ? static_cast<void*>(buffers.codes)
                                 : static_cast<void*>(buffers.values);
  std::string error;
  const int64_t device = entry.placement().ordinal;
  if ((data_bytes > 0 && !CopyHostToState(target, data.data(), data_bytes,
                                          state.tier, device, &error)) ||
      (absmax_bytes > 0 &&
       !CopyHostToState(buffers.absmax, absmax.data(), absmax_bytes,
                        state.tier, device, &error))) {
    throw std::runtime_error("writing optimizer state: " + error);
  }
}

void SetLeafTier(StateEntry& entry, int64_t leaf, int tier) {
  std::unique_lock<std::shared_mutex> lock(entry.mutex());
  if (entry.released()) throw std::runtime_error("optimizer state was released");
  if (leaf < 0 || leaf >= static_cast<int64_t>(entry.leaves().size())) {
    throw std::out_of_range("leaf index out of range");
  }
  LeafState& state = entry.mutable_leaves()[leaf];
  const Tier target = static_cast<Tier>(tier);
  if (state.tier == target) return;
  if (!IsManaged(state.tier) || !IsManaged(target)) {
    throw std::invalid_argument(
        std::string("cannot move a buffer from tier '") + TierName(state.tier) +
        "' to '" + TierName(target) + "': only paged buffers change tiers");
  }
  std::string error;
  if (!RetierState(state.base, state.bytes, target,
                   entry.placement().ordinal, &error)) {
    throw std::runtime_error("set_leaf_tier: " + error);
  }
  state.tier = target;
}

nb::tuple TakeMarks(StateEntry& entry) {
  int32_t* status = entry.status();
  const bool misrouted =
      __atomic_exchange_n(&status[kStatusMisrouted], 0, __ATOMIC_ACQ_REL) != 0;
  if (__atomic_exchange_n(&status[kStatusStale], 0, __ATOMIC_ACQ_REL) == 0) {
    return nb::make_tuple(misrouted, nb::none());
  }
  return nb::make_tuple(
      misrouted,
      nb::make_tuple(
          __atomic_load_n(&status[kStatusStaleCount], __ATOMIC_ACQUIRE),
          __atomic_load_n(&status[kStatusStaleStep], __ATOMIC_ACQUIRE)));
}

std::vector<int32_t> MomentsSteps(StateEntry& entry) {
  std::unique_lock<std::shared_mutex> lock(entry.mutex());
  if (entry.released()) throw std::runtime_error("optimizer state was released");
  std::vector<int32_t> steps;
  std::string error;
  if (!entry.ReadSteps(&steps, &error)) {
    throw std::runtime_error("reading step stamps: " + error);
  }
  return steps;
}

void SetMomentsStep(StateEntry& entry, int32_t step) {
  std::unique_lock<std::shared_mutex> lock(entry.mutex());
  if (entry.released()) throw std::runtime_error("optimizer state was released");
  std::string error;
  if (!entry.WriteSteps(step, &error)) {
    throw std::runtime_error("writing step stamps: " + error);
  }
}

// A host copy as a NumPy array of T, which takes over its bytes.
template <typename T>
HostArray<T> AdoptToNumpy(HostBuffer& buffer) {
  const size_t count = buffer.bytes() / sizeof(T);
  uint8_t* bytes = buffer.Release();
  nb::capsule owner(
      bytes, [](void* p) noexcept { delete[] static_cast<uint8_t*>(p); });
  return HostArray<T>(reinterpret_cast<T*>(bytes), {count}, owner);
}

void ThrowTransferError(TransferStatus status, const std::string& error) {
  if (status == TransferStatus::kReleased ||
      status == TransferStatus::kInvalid) {
    throw std::invalid_argument(error);
  }
  throw std::runtime_error("optimizer state transfer: " + error);
}

// Per entry: (steps of its non-empty leaves, per leaf per moment (codes,
// absmax) or (fp32 values, None), per leaf (correction, fingerprints and
// reset count) or None), all read under every entry's lock.
nb::list ReadEntries(const std::vector<StateEntry*>& entries) {
  std::vector<EntryCopy> copies;
  std::string error;
  TransferStatus status;
  {
    nb::gil_scoped_release unlocked;
    status = CopyEntriesToHost(entries, &copies, &error);
  }
  if (status != TransferStatus::kOk) ThrowTransferError(status, error);
  nb::list out;
  for (EntryCopy& copy : copies) {
    nb::list leaves;
    nb::list masters;
    for (LeafCopy& leaf : copy.leaves) {
      nb::list moments;
      for (size_t m = 0; m < leaf.data.size(); ++m) {
        if (leaf.quantized) {
          moments.append(nb::make_tuple(AdoptToNumpy<uint8_t>(leaf.data[m]),
                                        AdoptToNumpy<float>(leaf.absmax[m])));
        } else {
          moments.append(
              nb::make_tuple(AdoptToNumpy<float>(leaf.data[m]), nb::none()));
        }
      }
      leaves.append(moments);
      if (leaf.correction_bits == 8) {
        masters.append(nb::make_tuple(AdoptToNumpy<int8_t>(leaf.master[0]),
                                      AdoptToNumpy<uint32_t>(leaf.master[1])));
      } else if (leaf.correction_bits == 16) {
        masters.append(nb::make_tuple(AdoptToNumpy<int16_t>(leaf.master[0]),
                                      AdoptToNumpy<uint32_t>(leaf.master[1])));
      } else {
        masters.append(nb::none());
      }
    }
    out.append(nb::make_tuple(copy.steps, leaves, masters));
  }
  return out;
}

using HostBytes =
    nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Writes (entry index, leaf, moment, data bytes, absmax bytes) and stamps
// every leaf with `step`, under every entry's lock; checks all first.
void WriteEntries(
    const std::vector<StateEntry*>& entries,
    const std::vector<std::tuple<size_t, int64_t, int64_t, HostBytes,
                                 HostBytes>>& writes,
    int32_t step) {
  std::vector<MomentWrite> plain;
  plain.reserve(writes.size());
  for (const auto& [entry, leaf, moment, data, absmax] : writes) {
    plain.push_back(MomentWrite{entry, leaf, moment, data.data(), data.nbytes(),
                                absmax.data(), absmax.nbytes()});
  }
  std::string error;
  TransferStatus status;
  {
    nb::gil_scoped_release unlocked;
    status = WriteEntriesFromHost(entries, plain, step, &error);
  }
  if (status != TransferStatus::kOk) ThrowTransferError(status, error);
}

// Blocks whose master-weight corrections were dropped because their
// parameters changed outside the optimizer, over every leaf (waits for the
// device).
int64_t MasterWeightResets(StateEntry& entry) {
  std::unique_lock<std::shared_mutex> lock(entry.mutex());
  if (entry.released()) return 0;
  int64_t total = 0;
  for (const LeafState& leaf : entry.leaves()) {
    if (leaf.correction_bits == 0) continue;
    uint32_t count = 0;
    std::string error;
    if (!CopyStateToHost(&count, leaf.fingerprints + leaf.num_master_blocks,
                         sizeof(count), leaf.tier, entry.placement().ordinal,
                         &error)) {
      throw std::runtime_error("reading master-weight resets: " + error);
    }
    total += count;
  }
  return total;
}

nb::dict LeafInfo(const StateEntry& entry, int64_t leaf) {
  if (leaf < 0 || leaf >= static_cast<int64_t>(entry.leaves().size())) {
    throw std::out_of_range("leaf index out of range");
  }
  const LeafState& state = entry.leaves()[leaf];
  nb::dict info;
  info["size"] = state.size;
  info["num_blocks"] = state.num_blocks;
  info["quantized"] = state.quantized;
  info["code_bits"] = state.quantized ? (state.four_bit ? 4 : 8) : 32;
  info["decay"] = state.decay;
  info["correction_bits"] = state.correction_bits;
  info["tier"] = TierName(state.tier);
  info["bytes"] = entry.released() ? size_t{0} : state.bytes;
  return info;
}

}  // namespace

NB_MODULE(_optax_paged_ext, m) {
  m.doc() = "optax_paged's compiled core: FFI handlers and state buffers.";
  // States held by JAX caches or module globals can outlive this module at
  // interpreter exit; that is not a leak worth a report (the registry's own
  // tests check that released and collected states free their memory).
  nb::set_leak_warnings(false);
  m.attr("BLOCK_SIZE") = kBlockSize;
  m.attr("MASTER_BLOCK_SIZE") = kMasterBlockSize;
  m.attr("MASTER_MOMENT") = kMasterMoment;
  m.attr("NUM_HYPERPARAMS") = kNumHyperparams;
#if defined(OPTAX_PAGED_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
  m.attr("CUDA_VERSION") = OPTAX_PAGED_CUDA_VERSION;
  m.attr("CUDA_ARCHITECTURES") = OPTAX_PAGED_CUDA_ARCHITECTURES;
  m.attr("CPU_ONLY_REASON") = nb::none();
#else
  m.attr("WITH_CUDA") = false;
  m.attr("CUDA_VERSION") = nb::none();
  m.attr("CUDA_ARCHITECTURES") = nb::none();
  // Why the build has no CUDA handlers (CMakeLists.txt says it in words).
  m.attr("CPU_ONLY_REASON") = OPTAX_PAGED_CPU_ONLY_REASON;
#endif
  m.def("cpu_registrations", &CpuRegistrations);
  m.def("optimizer_table", &OptimizerTable,
        "name -> {target, num_moments, signed, slots, four_bit, "
        "stochastic_four_bit} for "
        "every optimizer.");
  m.attr("SEED_INDEX") = kSeedIndex;
  m.attr("MAX_MOMENTS") = kMaxMoments;
  m.attr("DEVICE_ORDINAL_TARGET") = kDeviceOrdinalTarget;
  m.attr("OUTPUT_MODES") = nb::make_tuple(
      static_cast<int>(kOutputUpdates), static_cast<int>(kOutputParams),
      static_cast<int>(kOutputParamsStochastic));
  nb::dict tiers;
  for (Tier tier : {Tier::kHost, Tier::kManagedDevice, Tier::kManagedHost,
                    Tier::kDevice}) {
    tiers[TierName(tier)] = static_cast<int>(tier);
  }
  m.attr("TIER_CODES") = tiers;
  m.def("cuda_registrations", &CudaRegistrations);
  m.def("gpu_memory_info", &GpuMemoryInfo, nb::arg("device"),
        "(free, total) bytes of GPU `device`; (0, 0) without it.");
  m.def("new_state_id", &NewStateId,
        "A fresh state id, which the state's entries (one per device) "
        "share.");
  m.def("dynamic_map", [](bool is_signed) {
    return CopyToNumpy(TablesFor(is_signed).values, 256);
  }, nb::arg("signed"));
  m.def("quantize_blockwise", &QuantizeBlockwise, nb::arg("x"),
        nb::arg("signed"));
  m.def("dequantize_blockwise", &DequantizeBlockwise, nb::arg("codes"),
        nb::arg("absmax"), nb::arg("signed"));
  m.def("has_avx2", &HasAvx2);
  m.def("live_state_bytes", &LiveStateBytes);

  // Used by the tests alone: they compare the vector codecs with the scalar
  // ones and count registry entries for leaks. They ship in this module
  // because CI has no compiler to build a separate test extension.
  nb::module_ testing = m.def_submodule(
      "testing", "Hooks for optax_paged's tests; not a public interface.");
  testing.def("max_midpoints_per_bucket", [](bool is_signed) {
    return TablesFor(is_signed).max_midpoints_per_bucket;
  }, nb::arg("signed"));
  testing.def("encode_scaled", &EncodeScaled, nb::arg("x"), nb::arg("inverse"),
              nb::arg("signed"), nb::arg("vector"));
  testing.def("block_absmax", &BlockAbsmaxOf, nb::arg("x"), nb::arg("vector"));
  testing.def("encode_scaled_avx512", [](InputArray<float> x, float inverse,
                                         bool is_signed) {
    if (!HasAvx512()) throw std::runtime_error("this CPU has no AVX-512");
    const size_t n = x.shape(0);
    std::vector<uint8_t> codes(n);
    EncodeBlockAvx512(TablesFor(is_signed), x.data(), inverse,
                      static_cast<int64_t>(n), codes.data());
    return CopyToNumpy(codes.data(), n);
  }, nb::arg("x"), nb::arg("inverse"), nb::arg("signed"));
  testing.def("has_avx512", &HasAvx512);
  testing.def("quantize_four_bit", &QuantizeFourBit, nb::arg("x"),
              nb::arg("signed"), nb::arg("stochastic"), nb::arg("key"),
              nb::arg("first_index"));
  testing.def("dequantize_four_bit", &DequantizeFourBit, nb::arg("codes"),
              nb::arg("absmax"), nb::arg("signed"), nb::arg("size"));
  testing.def("live_state_count", &LiveStateCount);

  nb::class_<StateEntry>(m, "StateEntry")
      .def_prop_ro("id", &StateEntry::id)
      .def_prop_ro("ordinal",
                   [](const StateEntry& e) { return e.placement().ordinal; })
      .def_prop_ro("position",
                   [](const StateEntry& e) { return e.placement().position; })
      .def("take_marks", &TakeMarks,
           "Clears and returns the marks GPU kernels left: (misrouted, "
           "(count, step) of a stale call or None).")
      .def("moments_steps", &MomentsSteps,
           "The step each non-empty leaf's moments are at.",
           nb::call_guard<nb::gil_scoped_release>())
      .def("set_moments_step", &SetMomentsStep, nb::arg("step"),
           nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("num_leaves",
                   [](const StateEntry& e) { return e.leaves().size(); })
      .def_prop_ro("num_moments", &StateEntry::num_moments)
      .def_prop_ro("total_bytes", &StateEntry::total_bytes)
      .def_prop_ro("released", &StateEntry::released)
      .def("leaf_info", &LeafInfo, nb::arg("leaf"))
      .def("master_weight_resets", &MasterWeightResets,
           nb::call_guard<nb::gil_scoped_release>())
      .def("read_moment", &ReadMoment, nb::arg("leaf"), nb::arg("moment"))
      .def("write_moment", &WriteMoment, nb::arg("leaf"), nb::arg("moment"),
           nb::arg("data"), nb::arg("absmax"))
      .def("set_leaf_tier", &SetLeafTier, nb::arg("leaf"), nb::arg("tier"),
           nb::call_guard<nb::gil_scoped_release>())
      .def("release", &StateEntry::Release,
           nb::call_guard<nb::gil_scoped_release>());
  m.def("read_entries", &ReadEntries, nb::arg("entries"),
        "Every moment and step stamp of a state's entries, read under all "
        "their locks at once.");
  m.def("write_entries", &WriteEntries, nb::arg("entries"), nb::arg("writes"),
        nb::arg("step"),
        "Writes (entry, leaf, moment, data, absmax) bytes and stamps every "
        "leaf with `step`, under all the entries' locks; checks every write "
        "before the first.");
  m.def("release_entries", &ReleaseEntries, nb::arg("entries"),
        "Releases a state's entries: all leave the registry before any is "
        "freed.",
        nb::call_guard<nb::gil_scoped_release>());
  m.def("create_state", &CreateState, nb::arg("platform"),
        nb::arg("num_moments"), nb::arg("sizes"), nb::arg("code_bits"),
        nb::arg("decay"), nb::arg("tiers"), nb::arg("index_offsets"),
        nb::arg("correction_bits"), nb::arg("state_id"), nb::arg("ordinal"), nb::arg("position"));
}

}  // namespace optax_paged
