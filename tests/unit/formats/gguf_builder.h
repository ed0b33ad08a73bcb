// A minimal GGUF writer for tests and fuzz seeds: every value type, nested arrays, any tensor
// type with raw bytes, and knobs to produce broken files on purpose.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace fleet::formats::testing {

class GgufBuilder {
 public:
  enum Type : uint32_t { U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 };

  explicit GgufBuilder(uint32_t version = 3, uint32_t alignment = 32)
      : version_(version), alignment_(alignment) {}

  // Raw encoders, for composing values (arrays, nested arrays).
  static void Put(std::vector<uint8_t>* b, const void* p, size_t n) {
    auto* c = static_cast<const uint8_t*>(p);
    b->insert(b->end(), c, c + n);
  }
  template <typename T>
  static void PutPod(std::vector<uint8_t>* b, T v) { Put(b, &v, sizeof(T)); }
  static void PutStr(std::vector<uint8_t>* b, const std::string& s) {
    PutPod<uint64_t>(b, s.size());
    Put(b, s.data(), s.size());
  }

  /// Adds a key with an already-encoded value of `type`.
  void KvRaw(const std::string& key, uint32_t type, const std::vector<uint8_t>& value) {
    PutStr(&kv_, key);
    PutPod<uint32_t>(&kv_, type);
    kv_.insert(kv_.end(), value.begin(), value.end());
    ++n_kv_;
  }
  template <typename T>
  void Kv(const std::string& key, uint32_t type, T v) {
    std::vector<uint8_t> b;
    PutPod<T>(&b, v);
    KvRaw(key, type, b);
  }
  void KvStr(const std::string& key, const std::string& v) {
    std::vector<uint8_t> b;
    PutStr(&b, v);
    KvRaw(key, STR, b);
  }
  template <typename T>
  void KvArr(const std::string& key, uint32_t elem_type, const std::vector<T>& items) {
    std::vector<uint8_t> b;
    PutPod<uint32_t>(&b, elem_type);
    PutPod<uint64_t>(&b, items.size());
    for (const T& v : items) PutPod<T>(&b, v);
    KvRaw(key, ARR, b);
  }

  /// Adds a tensor; `ne` in ggml order (innermost first). Offset defaults to the next aligned one.
  void Tensor(const std::string& name, uint32_t ggml_type, std::vector<uint64_t> ne,
              std::vector<uint8_t> data, int64_t offset = -1) {
    uint64_t off = offset >= 0 ? static_cast<uint64_t>(offset) : next_;
    PutStr(&infos_, name);
    PutPod<uint32_t>(&infos_, static_cast<uint32_t>(ne.size()));
    for (uint64_t d : ne) PutPod<uint64_t>(&infos_, d);
    PutPod<uint32_t>(&infos_, ggml_type);
    PutPod<uint64_t>(&infos_, off);
    if (data_.size() < off + data.size()) data_.resize(off + data.size());
    if (!data.empty()) std::memcpy(data_.data() + off, data.data(), data.size());
    next_ = (off + data.size() + alignment_ - 1) / alignment_ * alignment_;
    ++n_tensors_;
  }

  void set_counts(uint64_t n_tensors, uint64_t n_kv) {
    forced_tensors_ = n_tensors;
    forced_kv_ = n_kv;
  }

  std::vector<uint8_t> Build() const {
    std::vector<uint8_t> b = {'G', 'G', 'U', 'F'};
    PutPod<uint32_t>(&b, version_);
    PutPod<uint64_t>(&b, forced_tensors_ ? forced_tensors_ : n_tensors_);
    PutPod<uint64_t>(&b, forced_kv_ ? forced_kv_ : n_kv_);
    b.insert(b.end(), kv_.begin(), kv_.end());
    b.insert(b.end(), infos_.begin(), infos_.end());
    b.resize((b.size() + alignment_ - 1) / alignment_ * alignment_);
    b.insert(b.end(), data_.begin(), data_.end());
    return b;
  }

 private:
  uint32_t version_;
  uint32_t alignment_;
  std::vector<uint8_t> kv_, infos_, data_;
  uint64_t n_kv_ = 0, n_tensors_ = 0, next_ = 0;
  uint64_t forced_tensors_ = 0, forced_kv_ = 0;
};

}  // namespace fleet::formats::testing
