#include "state_transfer.h"

#include <algorithm>
#include <mutex>
#include <shared_mutex>
#include <utility>

#include "state_memory.h"

namespace optax_paged {

namespace {

// Every entry locked exclusively, in the order given (a state's entries, in
// the same order for every caller), while this object lives. A handler holds
// one entry's lock and waits for nothing while it does, so taking several
// here cannot deadlock with steps.
class EntriesLock {
 public:
  explicit EntriesLock(const std::vector<StateEntry*>& entries) {
    locks_.reserve(entries.size());
    for (StateEntry* entry : entries) locks_.emplace_back(entry->mutex());
  }

 private:
  std::vector<std::unique_lock<std::shared_mutex>> locks_;
};

// An entry named twice would be locked twice by one thread.
bool Distinct(const std::vector<StateEntry*>& entries, std::string* error) {
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i] == nullptr ||
        std::find(entries.begin(), entries.begin() + i, entries[i]) !=
            entries.begin() + i) {
      *error = "the entries must be distinct state entries";
      return false;
    }
  }
  return true;
}

size_t DataBytes(const LeafState& leaf, int64_t moment) {
  if (moment == kMasterMoment) return static_cast<size_t>(CorrectionBytes(leaf));
  return leaf.quantized ? static_cast<size_t>(CodeBytes(leaf))
                        : static_cast<size_t>(leaf.size) * sizeof(float);
}

size_t AbsmaxBytes(const LeafState& leaf, int64_t moment) {
  if (moment == kMasterMoment) {
    return static_cast<size_t>(FingerprintBytes(leaf));
  }
  return leaf.quantized ? static_cast<size_t>(leaf.num_blocks) * sizeof(float)
                        : 0;
}

// Where a write of `moment` goes: its codes or values, and its absmax (the
// correction and the fingerprints for kMasterMoment).
std::pair<void*, void*> Targets(const LeafState& leaf, int64_t moment) {
  if (moment == kMasterMoment) return {leaf.correction, leaf.fingerprints};
  const MomentBuffers& buffers = leaf.moments[moment];
  return {leaf.quantized ? static_cast<void*>(buffers.codes)
                         : static_cast<void*>(buffers.values),
          buffers.absmax};
}

bool CopyOut(const LeafState& leaf, int64_t device, const void* source,
             size_t bytes, std::vector<HostBuffer>* out, std::string* error) {
  HostBuffer& buffer = out->emplace_back(bytes);
  return bytes == 0 || CopyStateToHost(buffer.data(), source, bytes,
                                       leaf.tier, device, error);
}

bool CopyEntry(const StateEntry& entry, EntryCopy* copy, std::string* error) {
  if (!entry.ReadSteps(&copy->steps, error)) return false;
  const int64_t device = entry.placement().ordinal;
  copy->leaves.reserve(entry.leaves().size());
  for (const LeafState& leaf : entry.leaves()) {
    LeafCopy& out = copy->leaves.emplace_back();
    out.quantized = leaf.quantized;
    for (int m = 0; m < entry.num_moments(); ++m) {
      const auto [data, absmax] = Targets(leaf, m);
      if (!CopyOut(leaf, device, data, DataBytes(leaf, m), &out.data, error) ||
          (leaf.quantized && !CopyOut(leaf, device, absmax,
                                      AbsmaxBytes(leaf, m), &out.absmax,
                                      error))) {
        return false;
      }
    }
    out.correction_bits = leaf.correction_bits;
    if (leaf.correction_bits != 0 &&
        (!CopyOut(leaf, device, leaf.correction,
                  DataBytes(leaf, kMasterMoment), &out.master, error) ||
         !CopyOut(leaf, device, leaf.fingerprints,
                  AbsmaxBytes(leaf, kMasterMoment), &out.master, error))) {
      return false;
    }
  }
  return true;
}

// Why `write` does not fit its entry, or "" if it does.
std::string WriteMismatch(const std::vector<StateEntry*>& entries,
                          const MomentWrite& write) {
  if (write.entry >= entries.size()) {
    return "entry index " + std::to_string(write.entry) + " out of range";
  }
  const StateEntry& entry = *entries[write.entry];
  if (write.leaf < 0 ||
      write.leaf >= static_cast<int64_t>(entry.leaves().size())) {
    return "leaf index " + std::to_string(write.leaf) + " out of range";
  }
  const LeafState& leaf = entry.leaves()[write.leaf];
  if (write.moment == kMasterMoment && leaf.correction_bits == 0) {
    return "leaf " + std::to_string(write.leaf) + " has no master weights";
  }
  if (write.moment != kMasterMoment &&
      (write.moment < 0 || write.moment >= entry.num_moments())) {
    return "moment index " + std::to_string(write.moment) + " out of range";
  }
  if (write.data_bytes != DataBytes(leaf, write.moment) ||
      write.absmax_bytes != AbsmaxBytes(leaf, write.moment)) {
    return "leaf " + std::to_string(write.leaf) + " moment " +
           std::to_string(write.moment) + " holds " +
           std::to_string(DataBytes(leaf, write.moment)) + " + " +
           std::to_string(AbsmaxBytes(leaf, write.moment)) + " bytes, got " +
           std::to_string(write.data_bytes) + " + " +
           std::to_string(write.absmax_bytes);
  }
  return "";
}

bool AnyReleased(const std::vector<StateEntry*>& entries, std::string* error) {
  for (const StateEntry* entry : entries) {
    if (entry->released()) {
      *error = "optimizer state was released";
      return true;
    }
  }
  return false;
}

}  // namespace

HostBuffer::HostBuffer(size_t bytes)
    : data_(new uint8_t[std::max<size_t>(bytes, 1)]), bytes_(bytes) {}

TransferStatus CopyEntriesToHost(const std::vector<StateEntry*>& entries,
                                 std::vector<EntryCopy>* copies,
                                 std::string* error) {
  if (!Distinct(entries, error)) return TransferStatus::kInvalid;
  EntriesLock lock(entries);
  if (AnyReleased(entries, error)) return TransferStatus::kReleased;
  copies->clear();
  copies->resize(entries.size());
  for (size_t e = 0; e < entries.size(); ++e) {
    if (!CopyEntry(*entries[e], &(*copies)[e], error)) {
      return TransferStatus::kFailed;
    }
  }
  return TransferStatus::kOk;
}

TransferStatus WriteEntriesFromHost(const std::vector<StateEntry*>& entries,
                                    const std::vector<MomentWrite>& writes,
                                    int32_t step, std::string* error) {
  if (!Distinct(entries, error)) return TransferStatus::kInvalid;
  EntriesLock lock(entries);
  if (AnyReleased(entries, error)) return TransferStatus::kReleased;
  for (const MomentWrite& write : writes) {
    *error = WriteMismatch(entries, write);
    if (!error->empty()) return TransferStatus::kInvalid;
  }
  for (const MomentWrite& write : writes) {
    StateEntry& entry = *entries[write.entry];
    const LeafState& leaf = entry.leaves()[write.leaf];
    const auto [data, absmax] = Targets(leaf, write.moment);
    const int64_t device = entry.placement().ordinal;
    if ((write.data_bytes > 0 &&
         !CopyHostToState(data, write.data, write.data_bytes, leaf.tier,
                          device, error)) ||
        (write.absmax_bytes > 0 &&
         !CopyHostToState(absmax, write.absmax, write.absmax_bytes,
                          leaf.tier, device, error))) {
      return TransferStatus::kFailed;
    }
  }
  for (StateEntry* entry : entries) {
    if (!entry->WriteSteps(step, error)) return TransferStatus::kFailed;
  }
  return TransferStatus::kOk;
}

}  // namespace optax_paged
