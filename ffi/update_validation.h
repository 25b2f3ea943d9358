// Validation and routing of an update call, shared by the CPU and CUDA
// handlers (host code only): finds the registry entry, checks the operands
// against it before any memory is touched (so a mismatched call fails
// without corrupting state), and picks the element type.
#ifndef OPTAX_PAGED_FFI_UPDATE_VALIDATION_H_
#define OPTAX_PAGED_FFI_UPDATE_VALIDATION_H_

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <string_view>

#include "element_types.h"
#include "optimizer_math.h"
#include "state_registry.h"
#include "step_stamps.h"
#include "xla/ffi/api/ffi.h"

namespace optax_paged {

inline xla::ffi::Error ValidateUpdateCall(
    std::string_view name, const StateEntry& entry, Platform platform,
    int num_moments, size_t num_hyperparams,
    const xla::ffi::RemainingArgs& args, const xla::ffi::RemainingRets& rets,
    xla::ffi::Span<const int64_t> leaf_indices) {
  namespace ffi = xla::ffi;
  const std::string prefix = std::string(name) + ": ";
  if (entry.released()) {
    return ffi::Error::InvalidArgument(
        prefix + "optimizer state was released; create a new one with "
                 "tx.init(params)");
  }
  if (entry.platform() != platform) {
    return ffi::Error::InvalidArgument(
        prefix + "optimizer state was created for another platform; "
                 "initialise it on the device that runs the update");
  }
  if (entry.num_moments() != num_moments) {
    return ffi::Error::InvalidArgument(
        prefix + "optimizer state belongs to another optimizer");
  }
  if (num_hyperparams != static_cast<size_t>(kNumHyperparams)) {
    return ffi::Error::InvalidArgument(
        prefix + "expected " + std::to_string(kNumHyperparams) +
        " hyperparameters, got " + std::to_string(num_hyperparams));
  }
  const size_t count = leaf_indices.size();
  // One result per leaf, then the receipt (the mesh position's buffer,
  // aliased and never written: the caller makes the new count depend on it).
  if (args.size() != 2 * count || rets.size() != count + 1) {
    return ffi::Error::InvalidArgument(
        prefix + "expected " + std::to_string(count) +
        " gradients, parameters and results (and a receipt) for " +
        std::to_string(count) + " leaves, got " +
        std::to_string(args.size()) + " operands and " +
        std::to_string(rets.size()) + " results");
  }
  if (count == 0) return ffi::Error::Success();
  const ffi::DataType dtype = args.get<ffi::AnyBuffer>(0).value().element_type();
  for (size_t k = 0; k < count; ++k) {
    const int64_t index = leaf_indices[k];
    if (index < 0 || index >= static_cast<int64_t>(entry.leaves().size())) {
      return ffi::Error::InvalidArgument(
          prefix + "leaf index " + std::to_string(index) +
          " is out of range for a state of " +
          std::to_string(entry.leaves().size()) + " leaves");
    }
    const int64_t size = entry.leaves()[index].size;
    const ffi::AnyBuffer grad = args.get<ffi::AnyBuffer>(k).value();
    const ffi::AnyBuffer param = args.get<ffi::AnyBuffer>(count + k).value();
    auto out = rets.get<ffi::AnyBuffer>(k).value();
    const char* mismatch = nullptr;
    int64_t got = 0;
    if (static_cast<int64_t>(grad.element_count()) != size) {
      mismatch = "gradient";
      got = static_cast<int64_t>(grad.element_count());
    } else if (static_cast<int64_t>(param.element_count()) != size) {
      mismatch = "parameter";
      got = static_cast<int64_t>(param.element_count());
    } else if (static_cast<int64_t>(out->element_count()) != size) {
      mismatch = "result";
      got = static_cast<int64_t>(out->element_count());
    }
    if (mismatch != nullptr) {
      return ffi::Error::InvalidArgument(
          prefix + mismatch + " " + std::to_string(index) + " has " +
          std::to_string(got) + " elements, state has " +
          std::to_string(size));
    }
    if (entry.leaves()[index].correction_bits != 0 &&
        dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) {
      return ffi::Error::InvalidArgument(
          prefix + "leaf " + std::to_string(index) +
          " keeps master weights, which need bfloat16 or float16 "
          "parameters");
    }
    if (grad.element_type() != dtype || param.element_type() != dtype ||
        out->element_type() != dtype) {
      return ffi::Error::InvalidArgument(
          prefix + "leaf " + std::to_string(index) +
          ": gradients, parameters and results of one call must share a "
          "dtype");
    }
  }
  return ffi::Error::Success();
}

template <typename T>
struct ElementTag {
  using type = T;
};

// The step a call starts from: the hyperparameters' seed slot carries the
// count after it.
inline int32_t StepBefore(const float* hyperparams) {
  return static_cast<int32_t>(FloatBits(hyperparams[kSeedIndex])) - 1;
}

inline std::string StaleMessage(std::string_view prefix, int32_t count,
                                int32_t step, bool earlier) {
  return std::string(prefix) + (earlier ? "an earlier call" : "this call") +
         " was given a state whose count is " + std::to_string(count) +
         " while its moments are at step " + std::to_string(step) +
         ": the count and the moments come from different points of "
         "training (a count restored without its moments, e.g. by "
         "nnx.update or Orbax on nnx.state(optimizer); a state reset with "
         "jax.tree.map, which resets only the count; an older copy of a "
         "state stepped again after a newer one; or a wrapper that runs the "
         "update and discards its result, as optax.MultiSteps does). The "
         "moments were not changed by that call. Restore with "
         "optax_paged.load_state_dict, reset with tx.init(params), use "
         "optax_paged.accumulate_gradients for accumulation, and step the "
         "state the last step returned.";
}

// Runs `run(ElementTag<T>{}, entry)` for the gradients' element type T, with
// this device's entry of the state found, checked and held (exclusive lock)
// for the whole call. `host_position` and `host_hyperparams` are the
// operands when the handler can read them (CPU): the mesh position the call
// was traced for, and the count, checked against the leaves' step stamps
// (which a successful call then advances). GPU kernels check both themselves
// and leave marks in the entry that fail the next call.
template <typename Optimizer, typename Run>
xla::ffi::Error DispatchUpdate(std::string_view name, Platform platform,
                               int64_t state_id, int64_t ordinal,
                               const int32_t* host_position,
                               const float* host_hyperparams,
                               size_t num_hyperparams,
                               const xla::ffi::RemainingArgs& args,
                               const xla::ffi::RemainingRets& rets,
                               xla::ffi::Span<const int64_t> leaf_indices,
                               Run&& run) {
  namespace ffi = xla::ffi;
  const std::string prefix = std::string(name) + ": ";
  std::shared_ptr<StateEntry> entry = FindStateEntry(state_id, ordinal);
  if (entry == nullptr) {
    if (StateIsLive(state_id)) {
      return ffi::Error::InvalidArgument(
          prefix + "optimizer state " + std::to_string(state_id) +
          " has no shard on device ordinal " + std::to_string(ordinal) +
          ": it was initialised for other devices (jax.pmap, or a mesh "
          "other than the parameters' at init, runs the update there)");
    }
    return ffi::Error::InvalidArgument(
        prefix + "optimizer state " + std::to_string(state_id) +
        " was released; create a new one with tx.init(params)");
  }
  // Exclusive: two steps on one state (two threads, or two dtype groups of
  // one step) take turns, so no block's read-update-write interleaves with
  // another's and no update is lost.
  std::unique_lock<std::shared_mutex> lock(entry->mutex());
  const int32_t expected = entry->placement().position;
  int32_t* status = entry->status();
  // Marks left by an earlier GPU call are reported once, here or by Python.
  const bool marked =
      __atomic_exchange_n(&status[kStatusMisrouted], 0, __ATOMIC_ACQ_REL) != 0;
  if ((host_position != nullptr && *host_position != expected) || marked) {
    return ffi::Error::InvalidArgument(
        prefix + "device ordinal " + std::to_string(ordinal) +
        " holds the state of mesh position " + std::to_string(expected) +
        " but " + (marked ? "an earlier call" : "this call") +
        " received the shard of another position: the devices were "
        "ordered differently than at init (a shard_map over a permuted "
        "mesh?). The state was not updated by that call; use the mesh the "
        "parameters had at init.");
  }
  if (__atomic_exchange_n(&status[kStatusStale], 0, __ATOMIC_ACQ_REL) != 0) {
    return ffi::Error::InvalidArgument(StaleMessage(
        prefix, __atomic_load_n(&status[kStatusStaleCount], __ATOMIC_ACQUIRE),
        __atomic_load_n(&status[kStatusStaleStep], __ATOMIC_ACQUIRE), true));
  }
  if (ffi::Error error =
          ValidateUpdateCall(name, *entry, platform, Optimizer::kNumMoments,
                             num_hyperparams, args, rets, leaf_indices);
      error.failure()) {
    return error;
  }
  if (leaf_indices.size() == 0) return ffi::Error::Success();
  const int32_t step =
      host_hyperparams != nullptr ? StepBefore(host_hyperparams) : 0;
  if (host_hyperparams != nullptr) {
    for (const int64_t index : leaf_indices) {
      const int32_t at = StampStep(entry->stamps()[index]);
      if (entry->leaves()[index].size > 0 && at != step) {
        return ffi::Error::InvalidArgument(
            StaleMessage(prefix, step, at, false));
      }
    }
  }
  ffi::Error result = ffi::Error::Success();
  switch (args.get<ffi::AnyBuffer>(0).value().element_type()) {
    case ffi::F32:
      result = run(ElementTag<float>{}, *entry);
      break;
    case ffi::BF16:
      result = run(ElementTag<BFloat16>{}, *entry);
      break;
    case ffi::F16:
      result = run(ElementTag<Half>{}, *entry);
      break;
    default:
      return ffi::Error::InvalidArgument(
          std::string(name) +
          ": gradients must be float32, bfloat16 or float16");
  }
  if (host_hyperparams != nullptr && !result.failure()) {
    for (const int64_t index : leaf_indices) {
      entry->stamps()[index] = MakeStamp(step + 1, 0);
    }
  }
  return result;
}

}  // namespace optax_paged

#endif  // OPTAX_PAGED_FFI_UPDATE_VALIDATION_H_
