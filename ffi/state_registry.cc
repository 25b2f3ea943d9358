#include "state_registry.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>

namespace optax_paged {

namespace {

constexpr size_t kAlignment = 256;

size_t AlignUp(size_t bytes) {
  return (bytes + kAlignment - 1) / kAlignment * kAlignment;
}

struct StateDevice {
  int64_t state_id;
  int64_t ordinal;
  bool operator==(const StateDevice& other) const {
    return state_id == other.state_id && ordinal == other.ordinal;
  }
};

struct StateDeviceHash {
  size_t operator()(const StateDevice& key) const {
    return std::hash<int64_t>()(key.state_id) * 31 +
           std::hash<int64_t>()(key.ordinal);
  }
};

struct GlobalRegistry {
  std::mutex mutex;
  std::unordered_map<StateDevice, std::weak_ptr<StateEntry>, StateDeviceHash>
      entries;
  std::atomic<int64_t> next_id{1};
};

GlobalRegistry& Global() {
  // Never destroyed: entries may outlive static destruction at exit.
  static GlobalRegistry* registry = new GlobalRegistry;
  return *registry;
}

// Byte layout of one leaf: per moment, codes then absmax (quantized) or fp32
// values, then the master-weight correction and fingerprints, each aligned
// for 16-byte vector access.
size_t LayoutLeaf(LeafState* leaf, int num_moments, uint8_t* base) {
  size_t offset = 0;
  for (int m = 0; m < num_moments; ++m) {
    MomentBuffers& buffers = leaf->moments[m];
    if (leaf->quantized) {
      buffers.codes = base ? base + offset : nullptr;
      offset += AlignUp(static_cast<size_t>(CodeBytes(*leaf)));
      buffers.absmax =
          base ? reinterpret_cast<float*>(base + offset) : nullptr;
      offset += AlignUp(static_cast<size_t>(leaf->num_blocks) * sizeof(float));
    } else {
      buffers.values =
          base ? reinterpret_cast<float*>(base + offset) : nullptr;
      offset += AlignUp(static_cast<size_t>(leaf->size) * sizeof(float));
    }
  }
  if (leaf->correction_bits != 0) {
    leaf->correction = base ? base + offset : nullptr;
    offset += AlignUp(static_cast<size_t>(CorrectionBytes(*leaf)));
    leaf->fingerprints =
        base ? reinterpret_cast<uint32_t*>(base + offset) : nullptr;
    offset += AlignUp(static_cast<size_t>(FingerprintBytes(*leaf)));
  }
  return offset;
}

}  // namespace

StateEntry::StateEntry(int64_t id, Placement placement, Platform platform,
                       int num_moments)
    : id_(id),
      placement_(placement),
      platform_(platform),
      num_moments_(num_moments) {}

StateEntry::~StateEntry() {
  FreeAll();
  FreeState(stamps_, StampTier(), placement_.ordinal);
  FreeStatusWords(status_, platform_ == Platform::kCuda);
}

Tier StateEntry::StampTier() const {
  return platform_ == Platform::kCuda ? Tier::kDevice : Tier::kHost;
}

bool StateEntry::Allocate(const std::vector<LeafSpec>& specs,
                          std::string* error) {
  status_ = AllocateStatusWords(platform_ == Platform::kCuda,
                                placement_.ordinal, kNumStatusWords, error);
  if (status_ == nullptr) return false;
  // Zeroed: fresh moments are at step 0.
  stamps_ = static_cast<uint64_t*>(
      AllocateState(std::max<size_t>(specs.size(), 1) * sizeof(uint64_t),
                    StampTier(), placement_.ordinal, error));
  if (stamps_ == nullptr) return false;
  leaves_.resize(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    LeafState& leaf = leaves_[i];
    leaf.size = specs[i].size;
    leaf.quantized = specs[i].code_bits != 0;
    leaf.four_bit = specs[i].code_bits == 4;
    leaf.num_blocks =
        (specs[i].size + QuantBlockSize(leaf) - 1) / QuantBlockSize(leaf);
    leaf.decay = specs[i].decay;
    leaf.tier = specs[i].tier;
    leaf.index_offset = specs[i].index_offset;
    leaf.correction_bits = specs[i].correction_bits;
    leaf.num_master_blocks =
        (specs[i].size + kMasterBlockSize - 1) / kMasterBlockSize;
    leaf.bytes = LayoutLeaf(&leaf, num_moments_, nullptr);
    void* base = AllocateState(leaf.bytes, leaf.tier, placement_.ordinal, error);
    if (base == nullptr) {
      *error = "leaf " + std::to_string(i) + ": " + *error;
      FreeAll();
      return false;
    }
    leaf.base = base;
    LayoutLeaf(&leaf, num_moments_, static_cast<uint8_t*>(base));
  }
  return true;
}

void StateEntry::FreeAll() {
  for (LeafState& leaf : leaves_) {
    FreeState(leaf.base, leaf.tier, placement_.ordinal);
    leaf.base = nullptr;
    for (MomentBuffers& buffers : leaf.moments) buffers = MomentBuffers{};
    leaf.correction = nullptr;
    leaf.fingerprints = nullptr;
  }
}

void StateEntry::Unregister() {
  GlobalRegistry& global = Global();
  std::lock_guard<std::mutex> lock(global.mutex);
  // The state id may already name a newer entry (ids are reused once their
  // state is gone): only this entry's own slot is cleared.
  auto it = global.entries.find(
      StateDevice{placement_.state_id, placement_.ordinal});
  if (it != global.entries.end()) {
    std::shared_ptr<StateEntry> current = it->second.lock();
    if (current == nullptr || current.get() == this) global.entries.erase(it);
  }
}

void StateEntry::Release() {
  Unregister();
  std::unique_lock<std::shared_mutex> lock(mutex_);
  if (released_) return;
  released_ = true;
  FreeAll();
}

void ReleaseEntries(const std::vector<StateEntry*>& entries) {
  for (StateEntry* entry : entries) entry->Unregister();
  for (StateEntry* entry : entries) entry->Release();
}

bool StateEntry::ReadSteps(std::vector<int32_t>* steps,
                           std::string* error) const {
  std::vector<uint64_t> stamps(leaves_.size());
  if (!stamps.empty() &&
      !CopyStateToHost(stamps.data(), stamps_, stamps.size() * sizeof(uint64_t),
                       StampTier(), placement_.ordinal, error)) {
    return false;
  }
  steps->clear();
  for (size_t i = 0; i < leaves_.size(); ++i) {
    if (leaves_[i].size > 0) steps->push_back(StampStep(stamps[i]));
  }
  return true;
}

bool StateEntry::WriteSteps(int32_t step, std::string* error) {
  const std::vector<uint64_t> stamps(leaves_.size(), MakeStamp(step, 0));
  return stamps.empty() ||
         CopyHostToState(stamps_, stamps.data(),
                         stamps.size() * sizeof(uint64_t), StampTier(),
                         placement_.ordinal, error);
}

size_t StateEntry::total_bytes() const {
  size_t total = 0;
  for (const LeafState& leaf : leaves_) total += leaf.base ? leaf.bytes : 0;
  return total;
}

int64_t NewStateId() { return Global().next_id.fetch_add(1); }

std::shared_ptr<StateEntry> CreateStateEntry(Placement placement,
                                             Platform platform,
                                             int num_moments,
                                             const std::vector<LeafSpec>& specs,
                                             std::string* error) {
  if (num_moments < 1 || num_moments > kMaxMoments) {
    *error = "num_moments must be in [1, " + std::to_string(kMaxMoments) +
             "], got " + std::to_string(num_moments);
    return nullptr;
  }
  GlobalRegistry& global = Global();
  const int64_t id = global.next_id.fetch_add(1);
  auto entry =
      std::make_shared<StateEntry>(id, placement, platform, num_moments);
  if (!entry->Allocate(specs, error)) return nullptr;
  std::lock_guard<std::mutex> lock(global.mutex);
  auto& slot =
      global.entries[StateDevice{placement.state_id, placement.ordinal}];
  if (!slot.expired()) {
    *error = "state " + std::to_string(placement.state_id) +
             " already has an entry on device ordinal " +
             std::to_string(placement.ordinal);
    return nullptr;
  }
  slot = entry;
  return entry;
}

std::shared_ptr<StateEntry> FindStateEntry(int64_t state_id, int64_t ordinal) {
  GlobalRegistry& global = Global();
  std::lock_guard<std::mutex> lock(global.mutex);
  auto it = global.entries.find(StateDevice{state_id, ordinal});
  if (it == global.entries.end()) return nullptr;
  std::shared_ptr<StateEntry> entry = it->second.lock();
  if (entry == nullptr) global.entries.erase(it);
  return entry;
}

bool StateIsLive(int64_t state_id) {
  GlobalRegistry& global = Global();
  std::lock_guard<std::mutex> lock(global.mutex);
  for (auto& [key, weak] : global.entries) {
    if (key.state_id == state_id && !weak.expired()) return true;
  }
  return false;
}

int64_t LiveStateCount() {
  GlobalRegistry& global = Global();
  std::lock_guard<std::mutex> lock(global.mutex);
  int64_t count = 0;
  for (auto& [id, weak] : global.entries) count += weak.expired() ? 0 : 1;
  return count;
}

int64_t LiveStateBytes() {
  GlobalRegistry& global = Global();
  std::lock_guard<std::mutex> lock(global.mutex);
  int64_t bytes = 0;
  for (auto& [id, weak] : global.entries) {
    if (auto entry = weak.lock()) bytes += entry->total_bytes();
  }
  return bytes;
}

}  // namespace optax_paged
